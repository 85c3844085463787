from typer.testing import CliRunner

from helpers import write_image
from corpus import make_bad_images
from emolens.cli import EXIT_ERROR, EXIT_SOME_FAILED, app
from emolens.taxonomy import MIKELS

runner = CliRunner(env={"COLUMNS": "240"})


def test_list_models_names_the_baseline():
    result = runner.invoke(app, ["list-models"])
    assert result.exit_code == 0 and "global" in result.output


def make_ldl(root):
    lines = ["images-name " + " ".join(MIKELS.classes)]
    for i in range(6):
        votes = [0] * 8
        votes[i % 8] = 5
        votes[7] = 1
        lines.append(f"{i}.jpg " + " ".join(map(str, votes)))
        if i < 5:
            write_image(root / "images" / f"{i}.jpg", seed=i)
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")


def test_datasets_info_counts_and_missing(tmp_path):
    make_ldl(tmp_path)
    result = runner.invoke(app, ["datasets", "info", f"flickr_ldl={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "5 images" in result.output and "1 listed image(s) are missing" in result.output
    assert "polarity: 4 positive, 1 negative" in result.output
    assert "mean distribution" in result.output


def test_datasets_info_check_images_reports_bad_files_and_goes_on(tmp_path):
    make_ldl(tmp_path)
    make_bad_images(tmp_path / "bad")
    (tmp_path / "images" / "3.jpg").write_bytes(b"")
    (tmp_path / "images" / "4.jpg").write_bytes((tmp_path / "bad" / "truncated.jpg").read_bytes())
    result = runner.invoke(app, ["datasets", "info", f"flickr_ldl={tmp_path}", "--check-images"])
    assert result.exit_code == EXIT_SOME_FAILED
    assert "3 readable, 2 unreadable" in result.output
    assert "3.jpg" in result.output and "empty file" in result.output


def test_datasets_info_bad_spec_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["datasets", "info", f"nope={tmp_path}"])
    assert result.exit_code == EXIT_ERROR and "unknown dataset kind" in result.output


def test_a_failed_export_leaves_stdout_to_the_results(tmp_path):
    """apse does not export to ONNX: the exporter's graph dump must not reach stdout (valid JSON, a clean
    summary), and the reason is one line on stderr."""
    import json
    import os
    import subprocess
    import sys

    from helpers import tiny_model
    from emolens.weights import save_model

    save_model(tiny_model("apse"), tmp_path / "apse.safetensors")
    photo = write_image(tmp_path / "in" / "a.png", seed=1, size=(50, 40))
    env = {**os.environ, "EMOLENS_CACHE": str(tmp_path / "cache"), "COLUMNS": "400"}

    def emolens(*args):
        return subprocess.run([sys.executable, "-m", "emolens", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    done = emolens("predict", str(photo), "--model", str(tmp_path / "apse.safetensors"), "--format", "json")
    assert done.returncode == 0, done.stderr
    assert [p["source"] for p in json.loads(done.stdout)["predictions"]] == [str(photo)]
    said = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(said) == 2 and said[0].startswith("exporting the model") and "cannot export to ONNX" in said[1]
    done = emolens("index", str(tmp_path / "in"), "--db", str(tmp_path / "db"), "--model",
                   str(tmp_path / "apse.safetensors"))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and "1 image(s) in the index" in done.stdout
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 2

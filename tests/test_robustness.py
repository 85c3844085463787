"""The bad-input corpus through every entry point: each bad item is reported with its path and reason,
the good ones get their results, and the exit code tells "some failed" (3) from "all good" (0) and
"could not run" (2)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from corpus import make_awkward_names, make_bad_images, make_good_images, make_odd_paths
from helpers import make_ldl_dataset, tiny_model
from emolens.cli import EXIT_ERROR, EXIT_SOME_FAILED, app
from emolens.runtime import export_onnx
from emolens.server import Limits, create_app
from emolens.weights import save_model

runner = CliRunner(env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good = set(make_good_images(root / "photos" / "good")) | set(make_awkward_names(root / "photos" / "names"))
    bad = {**make_bad_images(root / "photos" / "bad"), **make_odd_paths(root / "photos" / "odd")}
    models = tmp_path_factory.mktemp("models")
    model = tiny_model().eval()
    export_onnx(model, models / "m.onnx")
    save_model(model, models / "torch.safetensors")
    return root / "photos", good, bad, models


def names(paths) -> set[str]:
    return {os.path.basename(p) for p in paths}


def assert_reported(output: str, bad: dict[str, str]):
    """Every bad file is named in the report beside a reason containing its word."""
    flat = " ".join(output.split())
    for name, word in bad.items():
        assert name in flat, name
        assert word in flat, word


def test_predict(corpus):
    folder, good, bad, models = corpus
    result = runner.invoke(app, ["predict", str(folder), "--model", str(models / "m.onnx"), "--format", "json",
                                 "--workers", "0"])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    payload = json.loads(result.stdout)
    assert names(p["source"] for p in payload["predictions"]) == good
    errors = {os.path.basename(e["source"]): e["reason"] for e in payload["errors"]}
    assert set(errors) == set(bad) and all(word in errors[n] for n, word in bad.items())
    only_good = runner.invoke(app, ["predict", str(folder / "good"), "--model", str(models / "m.onnx")])
    assert only_good.exit_code == 0, only_good.output
    no_model = runner.invoke(app, ["predict", str(folder / "good"), "--model", str(models / "missing.onnx")])
    assert no_model.exit_code == EXIT_ERROR and "missing.onnx" in no_model.output


def test_index_and_search(corpus, tmp_path):
    folder, good, bad, models = corpus
    result = runner.invoke(app, ["index", str(folder), "--db", str(tmp_path / "db"), "--model", str(models / "m.onnx")])
    assert result.exit_code == EXIT_SOME_FAILED
    assert f"{len(good)} image(s) in the index" in result.output
    assert_reported(result.output, bad)
    again = runner.invoke(app, ["index", str(folder), "--db", str(tmp_path / "db"), "--model", str(models / "m.onnx")])
    assert again.exit_code == EXIT_SOME_FAILED and "0 added, 0 updated" in again.output
    # the summary adds up: every file is either in the index unchanged or one that could not be used
    assert f"0 removed, {len(good)} unchanged, {len(bad)} could not be used" in " ".join(again.output.split())
    assert_reported(again.output, bad)  # failures remembered and reported again, not retried
    for name, word in bad.items():
        path = folder / ("bad" if os.path.lexists(folder / "bad" / name) else "odd") / name
        found = runner.invoke(app, ["search", str(path), "--db", str(tmp_path / "db"), "--model", str(models / "m.onnx")])
        assert found.exit_code == EXIT_ERROR and name in found.output and word in " ".join(found.output.split())
    query = next(p for p in (folder / "good").iterdir())
    ok = runner.invoke(app, ["search", str(query), "--db", str(tmp_path / "db"), "--model", str(models / "m.onnx"),
                             "--format", "json", "-k", "3"])
    assert ok.exit_code == 0 and len(json.loads(ok.stdout)["hits"]) == 3



def test_explain(corpus, tmp_path):
    folder, good, bad, models = corpus
    result = runner.invoke(app, ["explain", str(folder), "--model", str(models / "torch.safetensors"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == EXIT_SOME_FAILED
    assert len(list((tmp_path / "out").glob("*.png"))) == len(good)
    assert_reported(result.output, bad)


def test_datasets_info_and_training_leave_bad_images_out(corpus, tmp_path):
    folder, good, bad, models = corpus
    spec = make_ldl_dataset(tmp_path / "data", per_class=8)
    images = sorted((tmp_path / "data" / "images").iterdir(), key=lambda p: int(p.stem))
    broken = {}
    for target, source in zip(images, sorted((folder / "bad").iterdir())):
        target.write_bytes(source.read_bytes())  # corpus bytes under a dataset image's name
        broken[target.name] = bad[source.name]
    info = runner.invoke(app, ["datasets", "info", spec, "--check-images"])
    assert info.exit_code == EXIT_SOME_FAILED
    assert f"{len(images) - len(broken)} readable, {len(broken)} unreadable" in info.output
    assert_reported(info.output, broken)

    from emolens.data import load_dataset, make_protocol
    from emolens.engine import TrainConfig, fit

    ds = load_dataset(spec)
    fold = make_protocol(ds, "split", seed=0, fractions=(0.5, 0.25, 0.25)).folds[0]
    result = fit(tiny_model(), ds, fold, tmp_path / "run", TrainConfig(epochs=1, batch_size=4, workers=0),
                 progress=False)
    by_name = {ds.samples[i].path.name: reason for i, reason in result.bad_images.items()}
    seen = set(fold.train) | set(fold.val)
    expected = {n: w for n, w in broken.items() if any(ds.samples[i].path.name == n for i in seen)}
    assert set(by_name) == set(expected) and all(w in by_name[n] for n, w in expected.items())
    assert np.isfinite(result.history[0]["train_loss"])
    cli = runner.invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(tmp_path / "cli"),
                              "--backbone", "test_efficientnet", "--backbone-weights", "none", "--epochs", "1",
                              "--batch-size", "4", "--workers", "0"])
    assert cli.exit_code == EXIT_SOME_FAILED, cli.output  # trained, but some images were left out
    left_out = json.loads((tmp_path / "cli" / "metrics.json").read_text())["bad_images"]
    assert {Path(p).name for p in left_out} == set(broken)  # training, validation and test images alike
    assert_reported(cli.output, broken)


def test_server(corpus):
    folder, good, bad, models = corpus
    client = TestClient(create_app(models / "m.onnx", None, Limits(max_upload_bytes=2_000_000, max_files=64)),
                        base_url="http://127.0.0.1",
                        raise_server_exceptions=False)
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK)]
    # A client can only send text names: undecodable bytes arrive as U+FFFD.
    sent = [p.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for p in files]
    uploads = [("files", (name, p.read_bytes(), "application/octet-stream")) for name, p in zip(sent, files)]
    answered = {}
    for path, name, upload in zip(files, sent, uploads):
        r = client.post("/api/predict", files=[upload])
        answered[path.name] = r.status_code
        if r.status_code == 200:
            assert r.json()["results"][0]["filename"] == name
        else:
            assert r.status_code == 400 and r.json()["error"].startswith(path.name + ":")
            assert bad[path.name] in r.json()["error"]
    assert {n for n, code in answered.items() if code == 200} == good
    assert {n for n, code in answered.items() if code != 200} == {n for n in bad if n in answered}


def test_server_never_reads_a_client_named_path(corpus, tmp_path):
    _, _, _, models = corpus
    secret = tmp_path / "secret.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (255, 0, 0)).save(secret)
    client = TestClient(create_app(models / "m.onnx", None), base_url="http://127.0.0.1", raise_server_exceptions=False)
    # an empty upload named after a real image on the server's disk: only the (empty) bytes count
    r = client.post("/api/predict", files=[("files", (str(secret), b"", "image/png"))])
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = client.post("/api/predict", files=[("files", ("../../" + secret.name, b"not an image", "image/png"))])
    assert r.status_code == 400 and "not an image" in r.json()["error"]
    assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


def test_the_robustness_report_runs_without_pytest():
    """`benchmarks/robustness.py` takes the corpus and the tiny datasets from tests/, on a plain install."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = ("import runpy, sys\nsys.modules['pytest'] = None  # as on an install without the test extra\n"
              "sys.argv = ['robustness.py', '--help']\n"
              "try:\n    runpy.run_path('benchmarks/robustness.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
              "import helpers\nprint('imported', helpers.make_ldl_dataset.__name__)")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported make_ldl_dataset" in done.stdout, done.stderr

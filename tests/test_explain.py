import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import write_image
from helpers import tiny_model
from emolens.cli import EXIT_ERROR, EXIT_SOME_FAILED, app
from emolens.explain import Explainer, explain_files, output_names
from emolens.models import list_models
from emolens.weights import save_model

runner = CliRunner()

# The smallest configuration that still shows every map a model has.
EXPLAIN_SPECS = {"apse": "apse", "global": "global", "maiafa": "maiafa:width=16,groups=2",
                 "mlrcnn": "mlrcnn:fpn=16,representation=32,k=4,proposals=20",
                 "multigap": "multigap:streams=test_resnet,gru=4"}


def test_every_registered_model_is_covered():
    assert set(EXPLAIN_SPECS) == set(list_models())


@pytest.mark.parametrize("name", sorted(EXPLAIN_SPECS))
def test_explain_writes_one_readable_png_per_image(tmp_path, name):
    model = tiny_model(EXPLAIN_SPECS[name])
    images = [write_image(tmp_path / "in" / f"{i}.png", seed=i, size=(70, 50)) for i in range(2)]
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    written, errors = explain_files(model, [*images, tmp_path / "in" / "broken.jpg"], tmp_path / "out")
    assert [p.name for p in written] == ["0.png", "1.png"]
    assert [e.path for e in errors] == [str(tmp_path / "in" / "broken.jpg")]
    for p in written:
        with Image.open(p) as img:
            img.load()
            assert img.format == "PNG" and img.width > img.height > 100


def test_maps_per_stream_are_normalised_and_follow_the_target():
    model = tiny_model("multigap:streams=test_resnet").eval()
    image = Image.new("RGB", (90, 60), (120, 30, 200))
    result = Explainer(model).explain(image, target="fear")
    assert result.emotion == "fear" and len(result.maps) == 2  # one Grad-CAM per stream
    for m in result.maps.values():
        assert m.shape == (model.preprocessing.size,) * 2 and m.min() >= 0 and m.max() <= 1
    assert sum(result.distribution.values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("method", ["gradcam++", "scorecam"])
def test_other_cam_methods(method):
    result = Explainer(tiny_model().eval(), method).explain(Image.new("RGB", (40, 40), (10, 200, 10)))
    assert list(result.maps) == ["Grad-CAM"] and result.maps["Grad-CAM"].shape == (160, 160)


def test_output_names_are_distinct_and_safe():
    assert output_names(["a/x.jpg", "b/x.jpg", "c/we ird\u00e9?.png"]) == ["x.png", "x-2.png", "we_ird\u00e9_.png"]


def test_cli_explain_exit_codes(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "m.safetensors")
    good = write_image(tmp_path / "in" / "ok.png", seed=1, size=(30, 30))
    result = runner.invoke(app, ["explain", str(good), "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "ok.png").is_file()
    (tmp_path / "in" / "bad.png").write_bytes(b"")
    result = runner.invoke(app, ["explain", str(tmp_path / "in"), "--model", str(tmp_path / "m.safetensors"),
                                 "--out", str(tmp_path / "o2")])
    assert result.exit_code == EXIT_SOME_FAILED and "bad.png" in result.output
    result = runner.invoke(app, ["explain", str(good), "--model", str(tmp_path / "m.safetensors"), "--out",
                                 str(tmp_path / "o3"), "--target", "joy"])
    assert result.exit_code == EXIT_ERROR and "joy" in result.output

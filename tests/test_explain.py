import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import write_image
from helpers import tiny_model
from emolens.cli import EXIT_ERROR, EXIT_SOME_FAILED, app
from emolens.explain import Explainer, explain_files, output_names, render
from emolens.models import list_models
from emolens.predict import Predictor
from emolens.taxonomy import MIKELS
from emolens.weights import load_model, save_model

runner = CliRunner()

# The smallest configuration that still shows every map a model has.
EXPLAIN_SPECS = {"apse": "apse", "global": "global", "maiafa": "maiafa:width=16,groups=2",
                 "mlrcnn": "mlrcnn:fpn=16,representation=32,k=4,proposals=20",
                 "multigap": "multigap:streams=test_resnet,gru=4",
                 "joint": "joint:trunk=maiafa/width=16/groups=2,spaces=mikels+affect"}


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


@pytest.mark.parametrize("method,title", [("gradcam++", "Grad-CAM++"), ("scorecam", "Score-CAM")])
def test_other_cam_methods_give_their_own_maps_under_their_own_name(method, title):
    model = tiny_model().eval()
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    plain = Explainer(model, "gradcam").explain(image, target="awe")
    other = Explainer(model, method).explain(image, target="awe")
    assert list(plain.maps) == ["Grad-CAM"] and list(other.maps) == [title]
    assert other.maps[title].shape == (160, 160)
    assert not np.allclose(other.maps[title], plain.maps["Grad-CAM"], atol=1e-3)


def test_the_target_changes_what_is_explained():
    model = tiny_model().eval()
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    awe, fear = (Explainer(model).explain(image, target=t) for t in ("awe", "fear"))
    assert (awe.emotion, fear.emotion) == ("awe", "fear")
    assert not np.allclose(awe.maps["Grad-CAM"], fear.maps["Grad-CAM"], atol=1e-3)
    assert awe.distribution == fear.distribution  # the prediction itself does not depend on the target


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_explanation_shows_what_predict_scores(tmp_path, backend):
    """Same file, same model: the explanation's distribution is Predictor's, its view the model's input."""
    save_model(tiny_model(), tmp_path / "m.safetensors")
    photo = write_image(tmp_path / "wide.png", seed=7, size=(300, 170))
    (predicted,), _ = Predictor(tmp_path / "m.safetensors", backend=backend).predict([photo])
    explained = Explainer(load_model(tmp_path / "m.safetensors")).explain(photo)
    assert list(explained.distribution) == list(predicted.distribution)
    np.testing.assert_allclose(list(explained.distribution.values()), list(predicted.distribution.values()),
                               atol=1e-5 if backend == "torch" else 1e-4)
    assert explained.image.size == (160, 160)


def test_cli_explain_uses_the_method_and_target_asked_for(tmp_path, monkeypatch):
    import emolens.explain as explain_module

    seen = []
    monkeypatch.setattr(explain_module, "render", lambda explanation, taxonomy, path: seen.append(explanation) or path)
    save_model(tiny_model(), tmp_path / "m.safetensors")
    photo = write_image(tmp_path / "in" / "p.png", seed=2, size=(40, 30))
    result = runner.invoke(app, ["explain", str(photo), "--model", str(tmp_path / "m.safetensors"), "--out",
                                 str(tmp_path / "o"), "--method", "gradcam++", "--target", "fear"])
    assert result.exit_code == 0, result.output
    assert [(e.emotion, list(e.maps)) for e in seen] == [("fear", ["Grad-CAM++"])]


def test_a_mistyped_model_path_is_no_such_file(tmp_path):
    photo = write_image(tmp_path / "p.png", seed=2, size=(40, 30))
    result = runner.invoke(app, ["explain", str(photo), "--model", str(tmp_path / "runs" / "g1x"), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == EXIT_ERROR
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "no such file" in said and "untrained head" not in said


def test_the_png_has_a_polarity_legend_and_a_colour_scale(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    explanation = Explainer(tiny_model().eval()).explain(Image.new("RGB", (40, 40), (10, 200, 10)))
    render(explanation, MIKELS, tmp_path / "x.png")
    (fig,) = figures
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend())
    assert [t.get_text() for t in legend.get_texts()] == ["positive", "negative"]
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


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


def test_concurrent_explanations_match_one_at_a_time():
    """Grad-CAM hooks the model's layers: explanations running at once on one model must not mix."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_model("global").eval()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 80, 3), dtype=np.uint8)) for i in range(12)]
    alone = [Explainer(model).explain(image).maps["Grad-CAM"] for image in images]
    explainers = [Explainer(model) for _ in range(6)]  # as the server's worker threads would share one model
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda i: explainers[i % 6].explain(images[i]).maps["Grad-CAM"], range(12)))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_explanation_keeps_the_images_name(tmp_path):
    photo = write_image(tmp_path / "kept.png", seed=5, size=(40, 30))
    result = Explainer(tiny_model("maiafa:width=16,groups=2").eval()).explain(photo)  # a model with its own maps
    assert result.source == str(photo) and "region map D" in result.maps


def test_the_cli_says_which_image_each_png_explains_and_words_its_refusals(tmp_path):
    import json

    from emolens.runtime import export_onnx

    model = tiny_model().eval()
    save_model(model, tmp_path / "m.safetensors")
    export_onnx(model, tmp_path / "export" / "m.onnx")
    for folder, seed in (("a", 1), ("b", 2)):
        write_image(tmp_path / folder / "same.png", seed=seed, size=(40, 30))
    args = ["explain", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "why")]
    result = runner.invoke(app, [*args, "--model", str(tmp_path / "m.safetensors")])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "b/same.png -> same-2.png" in said and "explanations.json" in said, said
    manifest = json.loads((tmp_path / "why" / "explanations.json").read_text())
    assert [(e["source"].split("/")[-2], e["png"]) for e in manifest["explanations"]] == [
        ("a", "same.png"), ("b", "same-2.png")]
    onnx = runner.invoke(app, [*args, "--model", str(tmp_path / "export" / "m.onnx")])
    said = " ".join(onnx.output.split())
    assert onnx.exit_code == EXIT_ERROR and "an ONNX export cannot be explained" in said and ".safetensors" in said
    joy = runner.invoke(app, [*args, "--model", str(tmp_path / "m.safetensors"), "--target", "joy"])
    said = " ".join(joy.output.split())
    assert joy.exit_code == EXIT_ERROR and "'joy' is not a class" in said and "\"'joy'" not in said, said

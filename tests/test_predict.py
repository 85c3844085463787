import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import write_image
from corpus import make_bad_images, make_good_images
from helpers import tiny_model
from emolens.checkpoints import CheckpointError
from emolens.cli import EXIT_ERROR, EXIT_SOME_FAILED, app
from emolens.predict import Prediction, Predictor
from emolens.storage import default_weights_path
from emolens.taxonomy import MIKELS
from emolens.weights import load_model, save_model

runner = CliRunner(env={"COLUMNS": "240"})


@pytest.fixture(scope="module")
def predictor():
    return Predictor(batch_size=4, workers=0)


def test_default_model_is_embedded_small_and_describes_itself():
    model = load_model()
    # of the bundled backbone it keeps only the stages it tuned
    assert model.meta["include_backbone"] == ["backbone.net.blocks.5", "backbone.net.blocks.6", "backbone.net.conv_head",
                                              "backbone.net.bn2"]
    assert default_weights_path().stat().st_size < 8 * 2**20 and model.taxonomy.classes == MIKELS.classes
    assert model.spec["task"] == "joint" and "cv_mean" in model.meta["card"]
    assert model.spaces[:2] == ["mikels", "emotion6"] and "affect@oasis" in model.spaces


def test_predictor_on_a_folder_of_good_and_bad_files(tmp_path, predictor):
    good = make_good_images(tmp_path)
    bad = make_bad_images(tmp_path / "bad")
    from emolens.images import scan_images

    preds, errors = predictor.predict(scan_images([tmp_path]).files)
    assert {p.source.split("/")[-1] for p in preds} == set(good)
    assert {e.source.split("/")[-1] for e in errors} == set(bad)
    for p in preds:
        assert isinstance(p, Prediction) and set(p.distribution) == set(MIKELS.classes)
        assert sum(p.distribution.values()) == pytest.approx(1.0, abs=1e-4)
        assert p.probability == max(p.distribution.values()) and p.emotion in MIKELS.classes
        share = sum(p.distribution[c] for c in MIKELS.classes[:4])  # the default calibrates it with valence
        assert p.positive_probability == pytest.approx(float(predictor.calibration(share, p.valence)), abs=1e-4)
        assert p.polarity == ("positive" if p.positive_probability >= 0.5 else "negative")


def test_predictor_takes_pil_images_and_matches_files(tmp_path, predictor):
    path = write_image(tmp_path / "a.png", seed=3, size=(64, 48))
    from_file, _ = predictor.predict(path)
    from_pil, _ = predictor.predict([Image.open(path)])
    for c in MIKELS.classes:
        assert from_file[0].distribution[c] == pytest.approx(from_pil[0].distribution[c], abs=1e-5)


def test_batching_does_not_change_results(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", seed=i, size=(50, 40)) for i in range(5)]
    one = Predictor(batch_size=1, workers=0).predict(paths)[0]
    many = Predictor(batch_size=4, workers=0).predict(paths)[0]
    for a, b in zip(one, many):
        assert a.source == b.source and a.emotion == b.emotion
        assert a.probability == pytest.approx(b.probability, abs=1e-4)


def test_save_and_load_round_trip_and_mismatch(tmp_path):
    model = tiny_model("global:dropout=0.3").eval()
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(tmp_path / "m.safetensors")
    assert again.spec == model.spec
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x)["logits"], again(x)["logits"])
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["spec"]["taxonomy"] = {"name": "x", "classes": ["a", "b"], "polarity": [1, 0]}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="no model weights"):
        load_model(tmp_path / "absent")


def test_cli_predict_exit_codes_and_formats(tmp_path):
    write_image(tmp_path / "ok" / "a.png", seed=1)
    write_image(tmp_path / "ok" / "b.jpg", seed=2)
    result = runner.invoke(app, ["predict", str(tmp_path / "ok"), "--format", "json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["predictions"]) == 2 and data["errors"] == []

    (tmp_path / "ok" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    result = runner.invoke(app, ["predict", str(tmp_path / "ok"), str(tmp_path / "gone.jpg"), "--format", "csv"])
    assert result.exit_code == EXIT_SOME_FAILED
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:3] == ["source", "emotion", "probability"] and len(rows) == 3
    assert "broken.jpg" in result.stderr and "gone.jpg" in result.stderr

    listing = "\n".join(str(p) for p in sorted((tmp_path / "ok").glob("*.png"))) + "\n"
    result = runner.invoke(app, ["predict", "-"], input=listing)
    assert result.exit_code == 0 and "a.png" in result.stdout

    assert runner.invoke(app, ["predict"]).exit_code == EXIT_ERROR
    assert runner.invoke(app, ["predict", str(tmp_path / "ok" / "a.png"), "--model", str(tmp_path / "nomodel")]).exit_code == EXIT_ERROR


def test_cli_predict_demo_needs_no_user_data():
    result = runner.invoke(app, ["predict", "--demo", "--format", "json"])
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)["predictions"]
    assert len(preds) >= 2 and all(p["polarity"] in ("positive", "negative") for p in preds)


def fixed_output_model(distribution, taxonomy="mikels"):
    """A model that gives ``distribution`` for any image (zero weights, log-probability biases)."""
    model = tiny_model(taxonomy=taxonomy).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(distribution).log())
    return model


@pytest.mark.parametrize("taxonomy,distribution,emotion,polarity", [
    # top class negative (anger 0.45), positive classes 0.55 in all: positive
    ("mikels", [0.2, 0.2, 0.15, 0.0001, 0.45, 0.0001, 0.0001, 0.0001], "anger", "positive"),
    ("mikels", [0.4, 0.0001, 0.0001, 0.0001, 0.2, 0.2, 0.2, 0.0001], "amusement", "negative"),
    # Emotion6: surprise and neutral have no polarity; joy 0.2 against 0.1 negative mass
    ("emotion6", [0.05, 0.02, 0.03, 0.2, 0.0001, 0.3, 0.4], "neutral", "positive"),
])
def test_polarity_is_the_side_of_the_positive_share(tmp_path, taxonomy, distribution, emotion, polarity):
    image = write_image(tmp_path / "a.png", seed=1, size=(30, 20))
    (pred,), _ = Predictor(fixed_output_model(distribution, taxonomy)).predict([image])
    assert pred.emotion == emotion and pred.polarity == polarity
    assert (pred.positive_probability >= 0.5) == (polarity == "positive")


def test_polarity_and_positive_probability_never_disagree(tmp_path):
    images = [write_image(tmp_path / f"{i}.png", seed=i, size=(40, 30)) for i in range(64)]
    logits = np.log(np.random.default_rng(0).dirichlet(np.full(8, 0.3), size=64)).astype(np.float32)
    predictor = Predictor(tiny_model(), batch_size=64)
    predictor.runner = lambda batch: {"logits": logits[:len(batch)]}  # many distributions, both sides
    preds, _ = predictor.predict(images)
    assert {p.polarity for p in preds} == {"positive", "negative"}
    assert any(MIKELS.polarity[MIKELS.index(p.emotion)] != (p.polarity == "positive") for p in preds)
    for p in preds:
        assert p.polarity == ("positive" if p.positive_probability >= 0.5 else "negative")


#: The embedded default model on the photos scikit-learn ships: a guard on the shipped weights and the
#: whole preprocessing path. Update these figures when the default model is retrained on purpose.
DEFAULT_MODEL_ON_SAMPLES = {
    "china.jpg": {"amusement": 0.162677, "awe": 0.367757, "contentment": 0.329893, "excitement": 0.139073,
                  "anger": 0.000063, "disgust": 0.000144, "fear": 0.000128, "sadness": 0.000265},
    "flower.jpg": {"amusement": 0.116142, "awe": 0.233164, "contentment": 0.522481, "excitement": 0.115742,
                   "anger": 0.001063, "disgust": 0.002159, "fear": 0.004076, "sadness": 0.005172},
}
#: Its valence and arousal there (common scale).
DEFAULT_AFFECT_ON_SAMPLES = {"china.jpg": (0.547715, -0.026776), "flower.jpg": (0.516051, -0.207736)}


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_the_default_model_gives_its_known_output_on_known_photos(backend):
    from emolens.cli import demo_images

    preds, errors = Predictor(backend=backend).predict(demo_images())
    assert not errors
    got = {Path(p.source).name: p for p in preds}
    assert set(got) == set(DEFAULT_MODEL_ON_SAMPLES)
    for name, expected in DEFAULT_MODEL_ON_SAMPLES.items():
        assert list(got[name].distribution) == list(expected)
        assert list(got[name].distribution.values()) == pytest.approx(list(expected.values()), abs=2e-4), name
        assert (got[name].valence, got[name].arousal) == pytest.approx(DEFAULT_AFFECT_ON_SAMPLES[name], abs=2e-4)


def test_the_predict_table_fits_an_80_column_terminal(tmp_path):
    write_image(tmp_path / "photos" / "a-rather-long-file-name-for-a-photo.png", seed=1)
    narrow = CliRunner(env={"COLUMNS": "80"})
    result = narrow.invoke(app, ["predict", str(tmp_path / "photos"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert any("photo" in line for line in lines) and any(c in result.stdout for c in MIKELS.classes)


def test_the_first_prediction_with_a_model_says_it_is_exporting(tmp_path):
    save_model(tiny_model(), tmp_path / "m.safetensors")
    photo = write_image(tmp_path / "a.png", seed=1)
    first = runner.invoke(app, ["predict", str(photo), "--model", str(tmp_path / "m.safetensors")])
    again = runner.invoke(app, ["predict", str(photo), "--model", str(tmp_path / "m.safetensors")])
    assert first.exit_code == again.exit_code == 0
    assert "exporting the model" in first.stderr and "exporting" not in again.stderr


def test_inference_commands_take_a_device_and_refuse_an_absent_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    photo = write_image(tmp_path / "a.png", seed=1)
    save_model(tiny_model(), tmp_path / "m.safetensors")
    model = ["--model", str(tmp_path / "m.safetensors")]
    for args in (["predict", str(photo), "--backend", "torch"], ["explain", str(photo), "--out", str(tmp_path / "o")],
                 ["index", str(photo), "--db", str(tmp_path / "db")]):
        result = runner.invoke(app, [*args, *model, "--device", "cuda"])
        assert result.exit_code == EXIT_ERROR and "no CUDA GPU" in " ".join(result.output.split()), args
    ok = runner.invoke(app, ["predict", str(photo), *model, "--backend", "torch", "--device", "cpu", "--format", "json"])
    assert ok.exit_code == 0 and len(json.loads(ok.stdout)["predictions"]) == 1


def test_every_path_sees_a_large_jpeg_as_predict_does(tmp_path):
    """A large JPEG decodes at a reduced scale in predict, the training engine, explain and the server alike."""
    from fastapi.testclient import TestClient

    from helpers import make_ldl_dataset
    from emolens.data import load_dataset
    from emolens.engine import TrainConfig
    from emolens.engine.trainer import embed
    from emolens.explain import Explainer
    from emolens.images import load_image
    from emolens.runtime import export_onnx
    from emolens.server import create_app

    torch.manual_seed(0)
    model = tiny_model().eval()
    with torch.no_grad():
        model.classifier.weight.mul_(3000)  # logits of order 1: small changes of the input show
    pre = model.preprocessing
    dataset = load_dataset(make_ldl_dataset(tmp_path / "ldl", per_class=1, classes=(0, 2), size=(1400, 1000)))
    paths = [s.path for s in dataset.samples]
    predictor = Predictor(model, backend="torch", keep=("embedding",))
    prepared = predictor.prepare(paths[0])
    assert pre.load(paths[0]).size == (350, 250)
    assert np.abs(prepared - pre(load_image(paths[0]))).max() > 0.03  # the full decode would give another input
    np.testing.assert_array_equal(prepared, pre(pre.load(paths[0])))

    predictions, _ = predictor.predict(paths)
    by_predict = np.stack([p.outputs["embedding"] for p in predictions])
    by_predict /= np.linalg.norm(by_predict, axis=1, keepdims=True)
    by_engine = embed(model, dataset, [[0, 1]], TrainConfig(workers=0), progress=False)[0][1]
    np.testing.assert_allclose(by_engine, by_predict, atol=1e-5)
    frozen = TrainConfig(workers=0, freeze_backbone=True)  # through the on-disk feature cache (fp16)
    by_cache = embed(model, dataset, [[0, 1]], frozen, cache_dir=tmp_path / "cache", progress=False)[0][1]
    np.testing.assert_allclose(by_cache, by_predict, atol=2e-3)

    view = Explainer(model).explain(paths[0]).image
    assert np.array_equal(np.asarray(view), np.asarray(pre.crop(pre.load(paths[0]))))

    export_onnx(model, tmp_path / "m.onnx")
    client = TestClient(create_app(tmp_path / "m.onnx", None), base_url="http://127.0.0.1")
    served = client.post("/api/predict", files=[("files", ("a.jpg", Path(paths[0]).read_bytes(), "image/jpeg"))])
    assert served.json()["results"][0]["distribution"] == pytest.approx(predictions[0].distribution, abs=1e-3)


def test_a_card_that_describes_a_huge_model_is_refused_before_any_allocation(tmp_path):
    """The card is checked against the weight file's header on the meta device: no memory is taken."""
    import subprocess
    import sys

    from helpers import rated_model

    save_model(rated_model(), tmp_path / "m.safetensors")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["spec"]["args"]["embed"] = 2_000_000  # 4 GB of head weights at least, were they built
    (tmp_path / "m.json").write_text(json.dumps(meta))
    script = ("from emolens.weights import load_model\nfrom emolens.storage import CheckpointError\n"
              f"try:\n    load_model({str(tmp_path / 'm.safetensors')!r})\nexcept CheckpointError as e:\n    print(e)\n"
              # VmHWM, the peak of this process's own memory: ru_maxrss keeps the peak of the image that exec
              # replaced, which a vfork()ed child shares with its parent (a large pytest process).
              "print('peak', next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    said, peak = done.stdout.rsplit("peak", 1)
    assert "does not fit these weights" in said and "of another shape" in said, done.stdout + done.stderr
    assert int(peak) < 2 * 2**20, f"peak RSS {int(peak) / 2**20:.1f} GiB"  # KiB: importing torch takes ~0.5 GiB

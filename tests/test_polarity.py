"""Polarity as a calibrated probability: fitted with the classes weighed equally, carried by the model card
into every path (PyTorch, ONNX, explain), one definition everywhere."""

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from helpers import rated_model, write_image
from emolens.explain import Explainer
from emolens.polarity import PolarityCalibration, fit_polarity_calibration
from emolens.predict import Predictor
from emolens.runtime import export_onnx
from emolens.weights import load_model, save_model


def skewed_signals(n: int = 2000, seed: int = 0):
    """Images 80% positive; a positive share that leans positive whatever the image, and a valence that
    reads the image with noise."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.8
    valence = np.clip(np.where(positive, 0.25, -0.25) + rng.normal(0, 0.3, n), -1, 1)
    share = 1 / (1 + np.exp(-(1.5 + np.where(positive, 1.0, -1.0) + rng.normal(0, 1.5, n))))
    return share, valence, positive


def test_the_calibration_puts_the_balanced_threshold_at_one_half():
    share, valence, positive = skewed_signals()
    calibration = fit_polarity_calibration(share, valence, positive)
    assert calibration.valence_weight > 0 and calibration.share_weight > 0 and calibration.bias < 0
    by_share = balanced_accuracy_score(positive, share >= 0.5)
    calibrated = calibration(share, valence)
    assert balanced_accuracy_score(positive, calibrated >= 0.5) > by_share + 0.1
    assert 0.4 < (calibrated >= 0.5).mean() < 0.9  # no longer nearly everything positive
    again = PolarityCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    np.testing.assert_allclose(again(share, valence), calibrated)
    with pytest.raises(ValueError, match="positive and negative"):
        fit_polarity_calibration(share, valence, np.ones_like(positive))


def test_a_cards_calibration_reaches_every_path(tmp_path):
    model = rated_model().eval()
    calibration = PolarityCalibration(share_weight=0.5, valence_weight=4.0, bias=-0.3)
    save_model(model, tmp_path / "m.safetensors", card={"polarity_calibration": calibration.to_dict()})
    export_onnx(load_model(tmp_path / "m.safetensors"), tmp_path / "export" / "m.onnx")
    photos = [write_image(tmp_path / f"{i}.png", seed=i, size=(64, 48)) for i in range(6)]
    runs = {name: Predictor(source, backend=backend).predict(photos)[0] for name, source, backend in (
        ("torch", tmp_path / "m.safetensors", "torch"), ("onnx", tmp_path / "export" / "m.onnx", "onnx"))}
    for p in runs["torch"]:
        share = sum(p.distribution[c] for c in ("amusement", "awe", "contentment", "excitement"))
        assert p.positive_probability == pytest.approx(float(calibration(share, p.valence)), abs=1e-6)
    assert [p.positive_probability for p in runs["onnx"]] == pytest.approx(
        [p.positive_probability for p in runs["torch"]], abs=1e-4)
    assert {p.polarity for p in runs["torch"]} == {"positive", "negative"}  # this calibration splits them
    explainer = Explainer(load_model(tmp_path / "m.safetensors"))
    assert [explainer.explain(path).polarity for path in photos] == [p.polarity for p in runs["torch"]]


def test_without_a_calibration_the_positive_share_stays(tmp_path):
    save_model(rated_model().eval(), tmp_path / "m.safetensors")
    found, _ = Predictor(tmp_path / "m.safetensors", backend="torch").predict(
        [write_image(tmp_path / "a.png", seed=1, size=(64, 48))])
    share = sum(found[0].distribution[c] for c in ("amusement", "awe", "contentment", "excitement"))
    assert found[0].positive_probability == pytest.approx(share, abs=1e-6)


def test_the_default_model_carries_its_calibration():
    card = load_model("default").meta["card"]
    assert set(card["polarity_calibration"]) >= {"share_weight", "valence_weight", "bias", "fitted_on"}
    assert Predictor().calibration == PolarityCalibration.from_dict(card["polarity_calibration"])

"""benchmarks/linear_probe.py on a run of `emolens train`: the probe fits what the features hold."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import TINY_BACKBONE, load_benchmark, make_ldl_dataset
from emolens.cli import app
from emolens.data import load_dataset
from emolens.predict import Predictor


def test_the_probe_fits_features_that_tell_the_classes_apart_and_scores_the_run_s_own_classifier(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=12)  # four classes, each its own colour
    trained = CliRunner().invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(tmp_path / "run"),
                                       "--epochs", "1", "--backbone", TINY_BACKBONE, "--backbone-weights", "none",
                                       "--workers", "0", "--batch-size", "8"])
    assert trained.exit_code == 0, trained.output
    script = load_benchmark("linear_probe")
    report = script.probe(tmp_path / "run", views=2)
    assert report["C"] in script.C_GRID and report["dimensions"] > 0
    assert report["probe"]["train"] >= 0.9  # colour is in the pooled feature of even an untrained backbone
    # A crop of a one-colour image keeps its colour: it moves the feature less than another image would
    assert 0 < report["view_shift"] < 0.5, report["view_shift"]
    assert report["probe_on_views"]["train"] >= 0.9
    card = json.loads((tmp_path / "run" / "best.json").read_text())
    dataset = load_dataset(card["dataset"])
    predictor = Predictor(tmp_path / "run", backend="torch")  # the run's classifier as `emolens predict` runs it
    for part, rows in card["split"].items():
        good, _ = predictor.predict([dataset.samples[i].path for i in rows])
        right = [p.emotion == dataset.taxonomy.classes[dataset.labels[i]] for p, i in zip(good, rows)]
        assert report["classifier"][part] == pytest.approx(sum(right) / len(rows)), part

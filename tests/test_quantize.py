"""int8: the gate, the shipped default's int8 version, the precision option, and int8 exports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import make_ldl_dataset, write_image
from emolens import quantize
from emolens.cli import app
from emolens.predict import Predictor
from emolens.quantize import int8_gate
from emolens.runtime import packaged_default_int8, read_onnx_meta

runner = CliRunner()


def test_the_gate_refuses_a_lost_figure_or_a_changed_top_emotion():
    fp32 = {"accuracy": 0.80, "valence r": 0.70}
    assert int8_gate(fp32, {"accuracy": 0.795, "valence r": 0.71}, 0.98, 100).passed
    lost = int8_gate(fp32, {"accuracy": 0.785, "valence r": 0.70}, 0.98, 100)
    assert not lost.passed and "accuracy 0.7850 against fp32's 0.8000" in lost.reason
    changed = int8_gate(fp32, dict(fp32), 0.96, 100)
    assert not changed.passed and "agrees with fp32 on 0.960 of 100 images" in changed.reason
    assert not int8_gate(fp32, {"accuracy": float("nan"), "valence r": 0.7}, 0.99, 100).passed


def test_the_default_int8_model_runs_under_its_own_identity(tmp_path):
    photo = write_image(tmp_path / "a.jpg", seed=1, size=(80, 60))
    fp32, int8 = Predictor(None), Predictor(None, precision="int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert int8.identity.digest == fp32.identity.digest + "-int8" and "int8" in str(int8.identity)
    a, b = fp32.predict([photo])[0][0], int8.predict([photo])[0][0]
    assert abs(a.valence - b.valence) < 0.1 and max(abs(a.distribution[c] - b.distribution[c])
                                                    for c in a.distribution) < 0.15


def test_a_failed_gate_keeps_fp32_and_says_why(tmp_path, monkeypatch):
    from emolens import runtime

    copy = tmp_path / "default.int8.onnx"
    shutil.copy(packaged_default_int8(), copy)
    meta = read_onnx_meta(packaged_default_int8())
    meta["int8_gate"] = {**meta["int8_gate"], "passed": False, "reason": "int8 loses too much: test"}
    copy.with_suffix(".json").write_text(json.dumps(meta))
    monkeypatch.setattr(runtime, "packaged_default_int8", lambda: copy)
    with pytest.warns(UserWarning, match="running fp32, not int8: int8 loses too much: test"):
        predictor = Predictor(None, precision="int8")
    assert predictor.precision == "fp32" and not predictor.identity.digest.endswith("-int8")


def test_int8_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="int8 runs on ONNX Runtime"):
        Predictor(None, precision="int8", backend="torch")
    with pytest.raises(ValueError, match="unknown precision"):
        Predictor(None, precision="fp16")


def test_an_index_answers_only_the_precision_it_was_built_with_which_its_commands_follow(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    for i in range(3):
        write_image(tmp_path / "photos" / f"{i}.jpg", seed=i, size=(64, 48))
    db = str(tmp_path / "db")
    built = runner.invoke(app, ["index", str(tmp_path / "photos"), "--db", db, "--precision", "int8"])
    assert built.exit_code == 0, built.output
    query = str(tmp_path / "photos" / "0.jpg")
    same = runner.invoke(app, ["search", query, "--db", db, "--precision", "int8", "--format", "json"])
    assert same.exit_code == 0 and len(json.loads(same.stdout)["hits"]) == 2
    followed = runner.invoke(app, ["search", query, "--db", db, "--format", "json"])  # no --precision: the index's
    assert followed.exit_code == 0 and json.loads(followed.stdout) == json.loads(same.stdout)
    other = runner.invoke(app, ["search", query, "--db", db, "--precision", "fp32"])
    assert other.exit_code == 2 and "int8" in other.output
    again = runner.invoke(app, ["index", str(tmp_path / "photos"), "--db", db], env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "3 unchanged" in again.output, again.output
    served = []
    monkeypatch.setattr("uvicorn.run", lambda api, **options: served.append(api))
    assert runner.invoke(app, ["serve", "--db", db]).exit_code == 0
    with TestClient(served[0], base_url="http://127.0.0.1") as client:
        assert client.get("/api/models").json()["precision"] == "int8"
    fresh = runner.invoke(app, ["index", str(tmp_path / "photos"), "--db", str(tmp_path / "new")])
    assert fresh.exit_code == 0 and "fp32" not in fresh.output
    assert runner.invoke(app, ["search", query, "--db", str(tmp_path / "new"), "--precision", "int8"]).exit_code == 2


def test_explain_reports_the_numbers_predict_runs(tmp_path):
    from emolens.explain import Explainer
    from emolens.weights import load_model

    photo = write_image(tmp_path / "a.jpg", seed=3, size=(80, 60))
    int8 = Predictor(None, precision="int8")
    explanation = Explainer(load_model("default"), numbers=int8).explain(photo)
    predicted = int8.predict([photo])[0][0]
    assert explanation.distribution == pytest.approx(predicted.distribution, abs=1e-6)
    assert explanation.affect == pytest.approx((predicted.valence, predicted.arousal), abs=1e-6)
    assert explanation.emotion == predicted.emotion and explanation.polarity == predicted.polarity


@pytest.mark.slow
def test_export_writes_an_int8_model_only_where_it_passes_its_gate(tmp_path, monkeypatch):
    data = make_ldl_dataset(tmp_path / "data", per_class=8, size=(64, 48))
    onnx = tmp_path / "out" / "model.onnx"
    done = runner.invoke(app, ["export", "--onnx", str(onnx), "--precision", "int8", "--data", data,
                               "--calibration", "20"])
    assert done.exit_code == 0, done.output
    meta = read_onnx_meta(onnx)
    assert meta["precision"] == "int8" and meta["int8_gate"]["passed"] and meta["int8_gate"]["images"] == 32
    predictor = Predictor(onnx)
    assert predictor.precision == "int8" and predictor.identity.digest == meta["fp32_model_id"] + "-int8"

    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)  # a bound no model meets
    refused = runner.invoke(app, ["export", "--onnx", str(tmp_path / "no.onnx"), "--precision", "int8", "--data", data,
                                  "--calibration", "20"])
    assert refused.exit_code == 2 and "not written: int8 loses too much" in refused.output
    assert not (tmp_path / "no.onnx").exists()
    assert runner.invoke(app, ["export", "--onnx", str(tmp_path / "x.onnx"), "--precision", "int8"]).exit_code == 2


@pytest.mark.shared_data
@pytest.mark.slow
def test_the_shipped_int8_model_passes_its_gate_on_the_shared_data(shared_data):
    """Re-measured here: an int8 model that loses more than 0.01 on a task or changes the top emotion of more
    than 3% of the shared images fails."""
    from emolens.data import load_dataset
    from emolens.quantize import MAX_LOSS, MIN_AGREEMENT, measure_gate

    datasets = [load_dataset(f"{kind}={shared_data / kind}") for kind in ("flickr_ldl", "oasis", "emotion6")]
    gate = measure_gate(Predictor(None), Predictor(None, precision="int8"), datasets)
    assert gate.images == sum(len(d) for d in datasets) and len(gate.fp32) >= 8
    assert gate.agreement >= MIN_AGREEMENT, gate.reason
    assert all(gate.fp32[k] - gate.int8[k] <= MAX_LOSS for k in gate.fp32), gate.reason
    recorded = read_onnx_meta(packaged_default_int8())["int8_gate"]
    assert recorded["passed"] and recorded["agreement"] == pytest.approx(gate.agreement, abs=1e-9)

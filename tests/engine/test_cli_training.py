import json

from typer.testing import CliRunner

from helpers import TINY_BACKBONE, make_ldl_dataset
from emolens.cli import EXIT_ERROR, app, split_model_list

runner = CliRunner(env={"COLUMNS": "240"})
TINY = ["--backbone", TINY_BACKBONE, "--workers", "0", "--batch-size", "8"]


def test_model_list_keeps_commas_inside_specs():
    assert split_model_list("global global:loss=multitask,lambda=0.4;global:loss=kl") == [
        "global", "global:loss=multitask,lambda=0.4", "global:loss=kl"]


def test_train_then_evaluate_then_resume(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    args = ["train", "--model", "global:loss=multitask,lambda=0.4", "--data", spec, "--out", str(out),
            "--epochs", "2", "--backbone-weights", "none", *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"best_epoch", "val", "test"} and metrics["test"]["n"] > 0
    protocol = json.loads((out / "protocol.json").read_text())
    assert metrics["test"]["n"] == len(protocol["folds"][0]["test"])

    result = runner.invoke(app, ["evaluate", str(out), "--split", "val", "--workers", "0"])
    assert result.exit_code == 0 and "macro_f1" in result.output

    result = runner.invoke(app, [*args[:9], "--epochs", "3", "--backbone-weights", "none", *TINY, "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "epoch 3/3" in result.output and "epoch 1/3" not in result.output


def test_train_rejects_unknown_model_argument(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=3)
    result = runner.invoke(app, ["train", "--model", "global:wings=2", "--data", spec, "--out", str(tmp_path / "r"),
                                 "--backbone-weights", "none", *TINY])
    assert result.exit_code == EXIT_ERROR and "no argument" in result.output


def test_benchmark_runs_models_on_identical_folds(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=5)
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "--data", spec, "--models", "global global:loss=kl", "--task", "distribution",
                                 "--folds", "2", "--epochs", "2", "--freeze-backbone", "--out", str(out), "--backbone-weights", "none", *TINY])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == ["global", "global:loss=kl"]
    for r in res["models"].values():
        assert len(r["folds"]) == 2 and {"accuracy", "kl", "train_seconds", "infer_ms_per_image"} <= set(r["mean"])
    runs = json.loads((out / "global" / "fold1" / "best.json").read_text())["split"]
    assert runs == json.loads((out / "global_loss=kl" / "fold1" / "best.json").read_text())["split"]
    assert "± " in result.output

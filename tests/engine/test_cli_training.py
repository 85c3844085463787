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
    assert result.exit_code == EXIT_ERROR and "epochs 2 -> 3" in result.output, result.output
    result = runner.invoke(app, [*args, "--workers", "1", "--resume"])  # where it runs may change
    assert result.exit_code == 0 and "resuming" in result.output and "epoch 1/2" not in result.output, result.output


def test_train_tuning_the_last_stages_caches_the_frozen_ones_and_scores_the_test_part(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(out), "--epochs", "2",
                                 "--tune-stages", "2", "--optimizer", "adamw", "--backbone-weights", "none", *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "best.json").read_text())["train_config"]["tune_stages"] == 2
    assert [p.name.rsplit("-", 1)[0] for p in (out / "cache").iterdir()] == [f"features-{TINY_BACKBONE}-stages3"]
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] > 0
    both = runner.invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(tmp_path / "both"),
                               "--tune-stages", "2", "--freeze-backbone", "--backbone-weights", "none", *TINY])
    assert both.exit_code == EXIT_ERROR and "exclude each other" in both.output


def test_train_with_cached_views_records_them_and_caches_each(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(out), "--epochs", "1",
                                 "--freeze-backbone", "--cache-views", "2", "--backbone-weights", "none", *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "best.json").read_text())["train_config"]["cache_views"] == 2
    assert len(list((out / "cache").iterdir())) == 3


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
    # a re-run into the folder resumes only what it can finish with the same settings
    again = runner.invoke(app, ["benchmark", "--data", spec, "--models", "global", "--task", "distribution", "--folds", "2",
                                "--epochs", "2", "--freeze-backbone", "--out", str(out), "--backbone-weights", "none",
                                *TINY, "--lr", "0.5", "--optimizer", "adamw"])
    assert again.exit_code == EXIT_ERROR and "optimizer 'sgd' -> 'adamw'; lr None -> 0.5" in again.output, again.output
    assert json.loads((out / "results.json").read_text())["train_config"]["lr"] is None  # what ran stays recorded


def test_a_fold_that_does_not_exist_is_one_error(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    result = runner.invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(tmp_path / "run"),
                                 "--protocol", "kfold", "--folds", "3", "--fold", "7", "--backbone-weights", "none", *TINY])
    assert result.exit_code == EXIT_ERROR
    assert result.output.count("error:") == 1 and "fold 7 does not exist" in result.output


def test_evaluate_refuses_a_dataset_of_other_classes_before_any_work(tmp_path, monkeypatch):
    import emolens.engine.trainer as trainer
    from helpers import tiny_model
    from helpers import write_image
    from emolens.taxonomy import EMOTION6
    from emolens.weights import save_model

    def no_work(*args, **kwargs):
        raise AssertionError("images were read before the labels were checked")

    monkeypatch.setattr(trainer, "_batches_for", no_work)
    save_model(tiny_model(), tmp_path / "m.safetensors")
    root = tmp_path / "emotion6"
    header = "[image_filename]\t[valence]\t[arousal]\t" + "\t".join(f"[prob. {c}]" for c in EMOTION6.classes)
    (root / "images" / "joy").mkdir(parents=True)
    write_image(root / "images" / "joy" / "1.jpg")
    (root / "ground_truth.txt").write_text(header + "\njoy/1.jpg\t7\t5\t0\t0\t0\t1\t0\t0\t0\n")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "m.safetensors"), "--data", f"emotion6={root}",
                                 "--split", "all", "--workers", "0"])
    assert result.exit_code == EXIT_ERROR
    said = " ".join(result.output.split())
    assert "mikels" in said and "emotion6" in said and "Traceback" not in said


def test_train_takes_device_and_precision_and_refuses_an_absent_gpu(tmp_path, monkeypatch):
    import torch

    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    args = ["train", "--model", "global", "--data", spec, "--epochs", "1", "--backbone-weights", "none", *TINY]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "bf16"), "--device", "cpu", "--precision", "bf16",
                                 "--channels-last"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bf16" / "best.json").read_text())["train_config"]["precision"] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"])
    assert result.exit_code == EXIT_ERROR and "no CUDA GPU" in " ".join(result.output.split())
    assert not (tmp_path / "gpu" / "best.safetensors").exists()


def test_train_says_when_p_star_is_a_constant(tmp_path):
    """L_multi reads each image's vote share p*: FI without its votes gets the constant, and metrics.json says so."""
    from recipe_data import make_fi

    for name, spec in (("fi", make_fi(tmp_path / "fi")), ("ldl", make_ldl_dataset(tmp_path / "ldl", per_class=6))):
        result = runner.invoke(app, ["train", "--model", "global:loss=multitask", "--data", spec, "--epochs", "1",
                                     "--out", str(tmp_path / name), "--backbone-weights", "none", *TINY])
        assert result.exit_code == 0, result.output
        notes = json.loads((tmp_path / name / "metrics.json").read_text())["notes"]
        if name == "fi":
            assert len(notes) == 1 and "p* of loss multitask is the constant 0.6" in notes[0] and "note:" in result.output
        else:  # Flickr_LDL has its votes
            assert notes == []

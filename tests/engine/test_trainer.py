import json

import numpy as np
import pytest
import torch

from helpers import make_ldl_dataset, tiny_model
from emolens.checkpoints import CheckpointError
from emolens.data import load_dataset, make_protocol
from emolens.engine import TrainConfig, evaluate, fit, trainer
from emolens.weights import load_model


@pytest.fixture
def tiny(tmp_path):
    ds = load_dataset(make_ldl_dataset(tmp_path / "data", per_class=8))
    fold = make_protocol(ds, "split", seed=0, fractions=(0.6, 0.2, 0.2)).folds[0]
    return ds, fold


def config(**kw):
    base = dict(epochs=4, batch_size=8, workers=0, patience=None, step_size=2, optimizer="adamw", lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_and_the_checkpoint_is_chosen_on_validation(tiny, tmp_path):
    ds, fold = tiny
    model = tiny_model("global:loss=multitask")
    result = fit(model, ds, fold, tmp_path / "run", config(epochs=6), progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    val_losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(val_losses)) + 1
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    assert meta["epoch"] == result.best_epoch and meta["split"]["test"] == fold.test
    # the reloaded best checkpoint reproduces the validation figures of its epoch exactly
    best = load_model(tmp_path / "run")
    again = evaluate(best, ds, fold.val, config())
    chosen = result.history[result.best_epoch - 1]
    for key in ("accuracy", "macro_f1", "kl"):
        assert again[key] == pytest.approx(chosen[f"val_{key}"], abs=1e-6)


def test_test_rows_are_never_evaluated_during_fit(tiny, tmp_path, monkeypatch):
    ds, fold = tiny
    import emolens.engine.trainer as trainer

    seen = []
    real = trainer.evaluate_rows

    def spy(model, batches, rows, *a, **k):
        seen.append(list(rows))
        return real(model, batches, rows, *a, **k)

    monkeypatch.setattr(trainer, "evaluate_rows", spy)
    fit(tiny_model(), ds, fold, tmp_path / "run", config(epochs=2), progress=False)
    assert seen and all(rows == fold.val for rows in seen)


def test_resume_continues_from_the_saved_epoch_with_identical_results(tiny, tmp_path, monkeypatch):
    ds, fold = tiny
    torch.manual_seed(0)
    straight = tiny_model()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    full = fit(straight, ds, fold, tmp_path / "a", config(epochs=4), progress=False)

    interrupted = tiny_model()
    interrupted.load_state_dict(init)
    validations = []

    def killed_in_epoch_three(*args, **kwargs):  # after epoch 2's checkpoint, before epoch 3's
        validations.append(1)
        if len(validations) == 3:
            raise KeyboardInterrupt
        return real_evaluate_rows(*args, **kwargs)

    real_evaluate_rows = trainer.evaluate_rows
    monkeypatch.setattr(trainer, "evaluate_rows", killed_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, ds, fold, tmp_path / "b", config(epochs=4), progress=False)
    monkeypatch.setattr(trainer, "evaluate_rows", real_evaluate_rows)
    resumed = tiny_model()  # a fresh process would start from scratch; resume must restore everything
    part = fit(resumed, ds, fold, tmp_path / "b", config(epochs=4, workers=1), resume=True, progress=False)

    assert [h["epoch"] for h in part.history] == [1, 2, 3, 4]
    assert part.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], rel=1e-5)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_resume_refuses_another_split(tiny, tmp_path):
    ds, fold = tiny
    fit(tiny_model(), ds, fold, tmp_path / "r", config(epochs=1), progress=False)
    other = make_protocol(ds, "split", seed=5, fractions=(0.6, 0.2, 0.2)).folds[0]
    with pytest.raises(CheckpointError, match="another model or split"):
        fit(tiny_model(), ds, other, tmp_path / "r", config(epochs=2), resume=True, progress=False)


def test_resume_refuses_other_training_settings_and_names_them(tiny, tmp_path):
    ds, fold = tiny
    fit(tiny_model(), ds, fold, tmp_path / "r", config(epochs=1), progress=False)
    with pytest.raises(CheckpointError, match=r"optimizer 'adamw' -> 'sgd'; lr 0\.003 -> 0\.5\)"):
        fit(tiny_model(), ds, fold, tmp_path / "r", config(epochs=1, lr=0.5, optimizer="sgd"), resume=True,
            progress=False)
    with pytest.raises(CheckpointError, match="epochs 1 -> 3"):
        fit(tiny_model(), ds, fold, tmp_path / "r", config(epochs=3), resume=True, progress=False)


def test_resume_takes_the_same_init_file_by_another_path_and_refuses_another_file(tiny, tmp_path):
    ds, fold = tiny
    for source in ("a", "b"):
        fit(tiny_model(), ds, fold, tmp_path / source, config(epochs=1), progress=False)
    (tmp_path / "link").symlink_to(tmp_path / "a")  # e.g. an output folder reached through a symlink
    fit(tiny_model(), ds, fold, tmp_path / "r", config(epochs=1, init=str(tmp_path / "a")), progress=False)
    resumed = fit(tiny_model(), ds, fold, tmp_path / "r", config(epochs=1, init=str(tmp_path / "link")),
                  resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1]  # the finished run read back
    with pytest.raises(CheckpointError, match=r"\(init '\S*a' -> '\S*b'\)"):
        fit(tiny_model(), ds, fold, tmp_path / "r", config(epochs=1, init=str(tmp_path / "b")), resume=True,
            progress=False)


def test_frozen_backbone_trains_only_the_head_from_cached_features(tiny, tmp_path):
    ds, fold = tiny
    model = tiny_model("global")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, ds, fold, tmp_path / "run", config(epochs=3, freeze_backbone=True, lr=1e-2), progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(not k.startswith("backbone.") for k in changed)
    assert list((tmp_path / "run" / "cache").glob("features-*/shards.json"))


def test_bad_images_are_left_out_and_reported(tiny, tmp_path):
    ds, fold = tiny
    bad = ds.samples[fold.train[0]].path
    bad.write_bytes(b"broken")
    result = fit(tiny_model(), ds, fold, tmp_path / "run", config(epochs=1), progress=False)
    assert result.bad_images == {fold.train[0]: "not an image file in an accepted format (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF)"}


def test_polarity_and_distribution_tasks(tiny, tmp_path):
    ds, fold = tiny
    pol = fit(tiny_model(task="polarity"), ds, fold, tmp_path / "p", config(epochs=1), progress=False)
    assert "positive_recall" in pol.val_metrics
    dist = fit(tiny_model(task="distribution"), ds, fold, tmp_path / "d", config(epochs=1), progress=False)
    assert "kl" in dist.val_metrics and "wheel_distance" in dist.val_metrics


def test_a_frozen_backbone_trains_on_the_features_of_the_init_runs_backbone(tiny, tmp_path):
    """--init with --freeze-backbone: the cache is made from the transferred backbone, not the fresh one."""
    from emolens.data.transforms import eval_transform
    from emolens.engine.data import cache_key, open_cache, plan_cache
    from emolens.identity import weights_digest
    from emolens.images import load_image

    ds, fold = tiny
    source = tiny_model()
    fit(source, ds, fold, tmp_path / "source", config(epochs=1, lr=0.05), progress=False)  # the backbone trains too
    transferred = load_model(tmp_path / "source")
    fresh = tiny_model()
    assert weights_digest(fresh.backbone.state_dict()) != weights_digest(transferred.backbone.state_dict())
    fit(fresh, ds, fold, tmp_path / "run", config(epochs=1, freeze_backbone=True, init=str(tmp_path / "source")),
        progress=False)
    (cached,) = (tmp_path / "run" / "cache").glob("features-*")
    paths = [s.path for s in ds.samples]
    key = cache_key(paths, transferred.backbone, list(fresh.feature_keys))
    cache = open_cache(plan_cache(transferred.backbone, fresh.feature_keys, key, cached))
    assert cache is not None, "the cache must be keyed by the transferred backbone's weights"
    image = eval_transform(transferred.preprocessing)(load_image(paths[0]))[None]
    with torch.inference_mode():
        expected = transferred.backbone(image)["pooled"][0]
    torch.testing.assert_close(cache.batch(torch.tensor([0]))["pooled"][0], expected, atol=2e-2, rtol=1e-2)


def test_models_reading_other_levels_never_share_a_feature_cache(tiny, tmp_path):
    """apse (strides 8, 32) and maiafa (strides 4-32) in one output folder get a cache each."""
    from emolens.engine.trainer import feature_cache

    ds, _ = tiny
    apse, maiafa = tiny_model("apse"), tiny_model("maiafa:width=16,groups=2")
    maiafa.backbone.load_state_dict(apse.backbone.state_dict())  # one backbone; only the levels differ
    first = feature_cache(apse, ds, tmp_path / "cache", config(), progress=False)
    second = feature_cache(maiafa, ds, tmp_path / "cache", config(), progress=False)
    assert len(list((tmp_path / "cache").glob("features-*"))) == 2
    assert len(first.features["levels"]) == len(apse.backbone.strides)
    assert len(second.features["levels"]) == len(maiafa.backbone.strides)


@pytest.mark.parametrize("select,best_epoch", [("loss", 2), ("accuracy", 3), ("macro_f1", 4),
                                               ("balanced_accuracy", 2), ("kl", 3)])
def test_select_keeps_the_best_validation_epoch_in_the_right_direction(tiny, tmp_path, monkeypatch, select, best_epoch):
    """Scripted validation figures, each with its best at another epoch than its worst: higher is better
    for accuracy, macro-F1 and balanced accuracy; lower for loss and KL."""
    import emolens.engine.trainer as trainer

    script = {"loss": [1.0, 0.5, 0.7, 0.6], "accuracy": [0.2, 0.4, 0.8, 0.6], "macro_f1": [0.5, 0.1, 0.3, 0.9],
              "balanced_accuracy": [0.3, 0.9, 0.1, 0.2], "kl": [0.9, 0.8, 0.2, 0.5]}
    epoch = iter(range(4))

    def scripted(model, batches, rows, targets, loss_fn, rank=0, world=1, retrieval=False):
        e = next(epoch)
        return {k: v[e] for k, v in script.items()} | {"n": float(len(rows))}, {}

    monkeypatch.setattr(trainer, "evaluate_rows", scripted)
    ds, fold = tiny
    result = fit(tiny_model(), ds, fold, tmp_path / "run", config(select=select), progress=False)
    assert result.best_epoch == best_epoch
    assert result.best_score == pytest.approx(script[select][best_epoch - 1])
    assert json.loads((tmp_path / "run" / "best.json").read_text())["epoch"] == best_epoch


def test_learning_rate_schedule_backbone_rate_and_accumulation(tiny, tmp_path, monkeypatch):
    """Warm-up then decay at the given epochs; the backbone at its own rate; one step per `accumulate` batches."""
    ds, fold = tiny
    steps = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    config = TrainConfig(epochs=5, batch_size=4, workers=0, patience=None, optimizer="sgd", lr=0.01, backbone_lr=0.001,
                         warmup_epochs=1, lr_steps=(3, 4), gamma=0.5, accumulate=2)
    result = fit(tiny_model(), ds, fold, tmp_path / "run", config, progress=False)
    head = [h["lr"][0] for h in result.history]
    backbone = [h["lr"][1] for h in result.history]
    assert head == pytest.approx([0.005, 0.01, 0.01, 0.005, 0.0025])
    assert backbone == pytest.approx([0.0005, 0.001, 0.001, 0.0005, 0.00025])
    batches = -(-len(fold.train) // 4)
    assert len(steps) == 5 * -(-batches // 2)


def test_cli_takes_the_papers_hyper_parameters(tmp_path):
    from typer.testing import CliRunner

    from emolens.cli import app

    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    result = CliRunner().invoke(app, [
        "train", "--model", "global", "--data", spec, "--out", str(tmp_path / "run"), "--backbone", "test_efficientnet",
        "--backbone-weights", "none", "--workers", "0", "--epochs", "3", "--batch-size", "4", "--lr", "0.02",
        "--weight-decay", "1e-4", "--lr-steps", "2", "--gamma", "0.1", "--warmup", "0", "--backbone-lr", "0.002",
        "--accumulate", "2", "--patience", "0"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "last.json").read_text())
    assert meta["train_config"]["weight_decay"] == 1e-4 and meta["train_config"]["accumulate"] == 2
    assert [lr for h in meta["history"] for lr in h["lr"]] == pytest.approx([0.02, 0.002, 0.02, 0.002, 0.002, 0.0002])


def test_an_embedding_model_can_be_chosen_on_validation_map(tiny, tmp_path):
    ds, fold = tiny
    result = fit(tiny_model("apse"), ds, fold, tmp_path / "run", config(epochs=2, select="map8"), progress=False)
    assert all(0 <= h["val_map8"] <= 1 and 0 <= h["val_map2"] <= 1 for h in result.history)
    assert result.best_score == max(h["val_map8"] for h in result.history)

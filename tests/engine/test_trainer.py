import json

import numpy as np
import pytest
import torch

from helpers import make_ldl_dataset, tiny_model
from emolens.checkpoints import CheckpointError
from emolens.data import load_dataset, make_protocol
from emolens.engine import TrainConfig, evaluate, fit
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


def test_resume_continues_from_the_saved_epoch_with_identical_results(tiny, tmp_path):
    ds, fold = tiny
    torch.manual_seed(0)
    straight = tiny_model()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    full = fit(straight, ds, fold, tmp_path / "a", config(epochs=4), progress=False)

    interrupted = tiny_model()
    interrupted.load_state_dict(init)
    fit(interrupted, ds, fold, tmp_path / "b", config(epochs=2), progress=False)
    resumed = tiny_model()  # a fresh process would start from scratch; resume must restore everything
    part = fit(resumed, ds, fold, tmp_path / "b", config(epochs=4), resume=True, progress=False)

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


def test_frozen_backbone_trains_only_the_head_from_cached_features(tiny, tmp_path):
    ds, fold = tiny
    model = tiny_model("global")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, ds, fold, tmp_path / "run", config(epochs=3, freeze_backbone=True, lr=1e-2), progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(not k.startswith("backbone.") for k in changed)
    assert list((tmp_path / "run" / "cache").glob("features-*.safetensors"))


def test_bad_images_are_left_out_and_reported(tiny, tmp_path):
    ds, fold = tiny
    bad = ds.samples[fold.train[0]].path
    bad.write_bytes(b"broken")
    result = fit(tiny_model(), ds, fold, tmp_path / "run", config(epochs=1), progress=False)
    assert result.bad_images == {fold.train[0]: "not an image file (format not recognised)"}


def test_polarity_and_distribution_tasks(tiny, tmp_path):
    ds, fold = tiny
    pol = fit(tiny_model(task="polarity"), ds, fold, tmp_path / "p", config(epochs=1), progress=False)
    assert "positive_recall" in pol.val_metrics
    dist = fit(tiny_model(task="distribution"), ds, fold, tmp_path / "d", config(epochs=1), progress=False)
    assert "kl" in dist.val_metrics and "wheel_distance" in dist.val_metrics

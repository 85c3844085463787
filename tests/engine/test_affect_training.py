"""Task va: valence and arousal trained, chosen and scored like any task, reported on the dataset's scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import TINY_BACKBONE, make_ldl_dataset, make_oasis, tiny_model
from emolens.cli import EXIT_ERROR, app
from emolens.data import load_dataset, make_protocol
from emolens.engine import TrainConfig, evaluate, fit
from emolens.taxonomy import AFFECT

runner = CliRunner(env={"COLUMNS": "240"})


def test_a_va_model_trains_and_reports_on_the_datasets_scale(tmp_path):
    ds = load_dataset(make_oasis(tmp_path / "oasis"))
    fold = make_protocol(ds, "split", seed=0, task="va", fractions=(0.6, 0.2, 0.2)).folds[0]
    torch.manual_seed(0)
    model = tiny_model(task="va")
    assert model.taxonomy is AFFECT and model.spec["loss"]["name"] == "mse"
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32))
    assert outputs["affect"].shape == (2, 2) and "distribution" not in outputs
    config = TrainConfig(epochs=3, batch_size=6, workers=0, optimizer="adamw", lr=3e-3, patience=None, select="ccc")
    result = fit(model, ds, fold, tmp_path / "run", config, progress=False)
    assert {"valence_pearson", "arousal_ccc", "ccc", "loss"} <= set(result.val_metrics)
    test = evaluate(model, ds, fold.test, config, progress=False)
    model.eval()
    with torch.no_grad():
        from emolens.data.transforms import eval_transform

        images = torch.stack([eval_transform(model.preprocessing)(Image.open(ds.samples[r].path).convert("RGB"))
                              for r in fold.test])
        predicted = ds.affect_scale.from_common(model(images)["affect"].numpy())
    rated = ds.affect_scale.from_common(ds.affect[fold.test])
    assert test["valence_mae"] == pytest.approx(np.abs(predicted[:, 0] - rated[:, 0]).mean(), rel=1e-4)  # 1-7 scale


def test_va_from_the_command_line_and_a_dataset_without_ratings(tmp_path):
    spec = make_oasis(tmp_path / "oasis", n=24)
    out = tmp_path / "run"
    args = ["train", "--model", "global:loss=ccc", "--data", spec, "--task", "va", "--out", str(out), "--epochs", "1",
            "--backbone", TINY_BACKBONE, "--backbone-weights", "none", "--workers", "0", "--batch-size", "8",
            "--select", "ccc"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {"valence_ccc", "arousal_pearson", "valence_spearman", "arousal_rmse"} <= set(
        json.loads((out / "metrics.json").read_text())["test"])
    result = runner.invoke(app, ["predict", "--model", str(out), str(tmp_path / "oasis" / "images")])
    assert result.exit_code == EXIT_ERROR and "valence and arousal alone" in result.output
    ldl = make_ldl_dataset(tmp_path / "ldl", per_class=3)
    args[args.index(spec)], args[args.index(str(out))] = ldl, str(tmp_path / "r2")
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_ERROR and "no valence and arousal ratings" in result.output

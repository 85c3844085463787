"""Paper recipes: every file in recipes/ runs through `emolens benchmark --recipe` on tiny synthetic data of its
dataset's kind, flags override the recipe, and what a recipe requires is asked for."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from recipe_data import MAKERS, coco_layout_file, data_args
from emolens.backbones import create_backbone
from emolens.cli import EXIT_ERROR, app
from emolens.recipes import load_recipe, with_model_args

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))
BACKBONE = "test_resnet"
TUNABLE_BACKBONE = "test_efficientnet"  # --tune-stages tunes EfficientNet stages
runner = CliRunner(env={"COLUMNS": "240"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Data of every kind a recipe names, and the files recipes require, for a tiny backbone."""
    root = tmp_path_factory.mktemp("recipes")
    backbone = create_backbone(BACKBONE, None)
    torch.save(backbone.net.state_dict(), root / "stream.pth")
    return {"data": {kind: make(root / kind) for kind, make in MAKERS.items()},
            "detector": coco_layout_file(root / "coco.pth", backbone.channels), "stream": root / "stream.pth",
            "root": root}


def smoke_args(recipe, inputs, out: Path) -> list[str]:
    backbone = TUNABLE_BACKBONE if recipe.settings.get("tune_stages") else BACKBONE
    args = ["benchmark", "--recipe", str(recipe.path), *data_args(recipe.dataset, inputs["data"]), "--out", str(out),
            "--limit", "40", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--backbone", backbone,
            "--backbone-weights", "none"]
    if recipe.settings.get("protocol") == "kfold" and len(recipe.settings["models"].split(";")) > 1:
        args += ["--folds", "2"]  # a table of many rows: each row on two folds
    if "model_arg.detector_weights" in recipe.requires:
        args += ["--model-arg", f"detector_weights={inputs['detector']}"]
    if "model_arg.stream_weights" in recipe.requires:
        args += ["--model-arg", f"streams={BACKBONE}", "--model-arg", f"stream_weights={inputs['stream']}"]
    if "model_arg.stream_input" in recipe.requires:  # a Caffe conversion
        args += ["--model-arg", "stream_input=bgr255", "--model-arg", "stream_mean=104+113+117"]
    return args


def test_there_is_a_recipe_per_main_table_of_each_paper():
    papers = {load_recipe(p).paper for p in RECIPES}
    assert papers == {"001", "002", "003", "004"}
    assert all(kind in MAKERS for p in RECIPES for kind in load_recipe(p).dataset.split("+"))


@pytest.mark.parametrize("path", [p for p in RECIPES if "init" not in load_recipe(p).requires], ids=lambda p: p.stem)
def test_each_recipe_runs_a_quick_check_and_prints_the_papers_figure(path, inputs, tmp_path):
    recipe = load_recipe(path)
    result = runner.invoke(app, smoke_args(recipe, inputs, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["recipe"]["file"] == path.name and results["recipe"]["reported"] == recipe.reported
    config = results["train_config"]
    assert config["epochs"] == 1 and config["batch_size"] == 8  # the command line wins over the recipe
    for name in ("lr", "weight_decay", "optimizer"):  # the recipe wins over the defaults
        if name in recipe.settings:
            assert config[name] == recipe.settings[name]
    if "lr_step_every" in recipe.settings:
        assert config["step_size"] == recipe.settings["lr_step_every"]
    assert results["task"] == recipe.settings.get("task", "joint" if "+" in recipe.dataset else "emotion")
    (fold,) = next(iter(results["models"].values()))["folds"][:1]
    assert fold["train_seconds"] > 0
    if recipe.reported:
        assert f"paper {recipe.paper}, reported" in result.output
    if "retrieval" in recipe.settings:
        assert "map8" in fold and "map2" in fold


def test_transfer_recipes_start_from_the_run_their_recipe_names(inputs, tmp_path):
    for path in [p for p in RECIPES if "init" in load_recipe(p).requires]:
        recipe = load_recipe(path)
        source_name = re.search(r"recipe (\S+)", recipe.requires["init"]).group(1)
        source_recipe = load_recipe(next(p for p in RECIPES if p.stem == source_name))
        if not (tmp_path / source_name).exists():
            assert runner.invoke(app, smoke_args(source_recipe, inputs, tmp_path / source_name)).exit_code == 0
        source = next((tmp_path / source_name).glob("*/fold0/best.safetensors"))
        args = smoke_args(recipe, inputs, tmp_path / path.stem)
        refused = runner.invoke(app, args)
        assert refused.exit_code == EXIT_ERROR and "needs --init" in refused.output
        result = runner.invoke(app, [*args, "--init", str(source)])
        assert result.exit_code == 0, result.output
        results = json.loads((tmp_path / path.stem / "results.json").read_text())
        config = results["train_config"]
        assert config["init"] == str(source) and config["lr"] == recipe.settings["lr"]
        if "init_parts" in recipe.settings:
            assert ",".join(config["init_parts"]) == recipe.settings["init_parts"]
        if recipe.settings["models"].split(":")[1].count("loss=multitask"):  # FI without votes: p* is a constant
            assert any("p* of loss multitask is the constant 0.6" in note for note in results["notes"])


def test_a_detector_run_starts_the_fi_step_on_its_own_backbone_only(inputs, tmp_path):
    detector = load_recipe(next(p for p in RECIPES if p.stem == "001_mlrcnn_detector_emotionroi"))
    assert runner.invoke(app, smoke_args(detector, inputs, tmp_path / "detector")).exit_code == 0
    source = next((tmp_path / "detector").glob("*/fold0/best.safetensors"))
    fi = load_recipe(next(p for p in RECIPES if p.stem == "001_mlrcnn_fi8"))
    args = smoke_args(fi, inputs, tmp_path / "fi")
    result = runner.invoke(app, [*args, "--init", str(source), "--init-parts", "detector"])  # the same backbone
    assert result.exit_code == 0, result.output
    args = smoke_args(fi, inputs, tmp_path / "other")
    args[args.index("--backbone") + 1] = "test_resnet.r160_in1k"
    result = runner.invoke(app, [*args, "--init", str(source), "--init-parts", "detector"])
    assert result.exit_code == EXIT_ERROR and f"learned on backbone {BACKBONE}" in result.output, result.output


def test_a_recipe_asks_for_the_weights_it_needs(inputs, tmp_path):
    path = next(p for p in RECIPES if p.stem == "004_multigap_fi8")
    args = ["benchmark", "--recipe", str(path), "--data", inputs["data"]["fi"], "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_ERROR and "--backbone-weights" in result.output
    result = runner.invoke(app, [*args, "--backbone-weights", "none"])
    assert result.exit_code == EXIT_ERROR and "--model-arg stream_weights" in result.output


def test_a_setting_that_no_option_has_is_refused(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\npaper = "9"\ntitle = "t"\nreproduces = "r"\ndataset = "fi"\n[settings]\nwings = 2\n')
    result = runner.invoke(app, ["benchmark", "--recipe", str(recipe), "--data", f"fi={tmp_path}"])
    assert result.exit_code == EXIT_ERROR and "unknown setting 'wings'" in result.output
    recipe.write_text('[recipe]\npaper = "9"\ntitle = "t"\nreproduces = "r"\ndataset = "fi"\n[reported]\naccuracy = 75.4\n')
    with pytest.raises(ValueError, match="fractions"):
        load_recipe(recipe)


def test_model_args_replace_or_join_each_spec():
    assert with_model_args(["mlrcnn:k=10,fpn=256", "global"], {"k": "3", "detector_weights": "c.pth"}) == [
        "mlrcnn:fpn=256,k=3,detector_weights=c.pth", "global:k=3,detector_weights=c.pth"]

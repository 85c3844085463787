"""benchmarks/emotionroi.py: a paper's EmotionROI table from its recipe, run from the backbone's own weights and
from the affective pre-training (Flickr_LDL + OASIS), whose backbone every model of the second run starts from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from helpers import make_ldl_dataset, make_oasis
from recipe_data import make_emotionroi
from emolens.recipes import load_recipe
from emolens.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "emotionroi_003_maiafa.toml"


def backbone_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_model(run).state_dict().items() if k.startswith("backbone.")}


def test_a_table_runs_both_starts_and_each_model_of_the_second_starts_from_the_pretrained_backbone(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_emotionroi(data / "emotion6")
    make_ldl_dataset(data / "flickr_ldl", per_class=10)
    make_oasis(data / "oasis", n=40)
    quick = ["--epochs", "1", "--folds", "2", "--batch-size", "8", "--workers", "0", "--backbone", "test_efficientnet",
             "--backbone-weights", "none"]
    command = [sys.executable, str(ROOT / "benchmarks" / "emotionroi.py"), "--recipe", str(RECIPE), "--data", str(data),
               "--out", str(out), "--", *quick]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = load_recipe(RECIPE)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(recipe.paper_table) + 2 * len(recipe.settings["models"].split(";"))
    assert "| paper 003: MAI-AFA, FI pre-training (Table 7, Normal) | paper | 0.850 |" in result.stdout
    assert sum("| affective pre-training |" in line for line in rows) == len(recipe.settings["models"].split(";"))
    assert "pre-training" in result.stdout.split("\n- ")[-1]  # the gain per model is reported

    caches = [p for p in out.rglob("cache") if p.is_dir()]
    assert caches == [out / "cache"] and len(list(caches[0].iterdir())) > 1  # every run's features in one cache

    (pretrained,) = (out / "pretraining").glob("*/fold0")
    tuned = backbone_tensors(pretrained)
    for run in sorted((out / recipe.name / "affective").glob("*/fold0")):
        theirs = backbone_tensors(run)
        assert all(torch.equal(theirs[k], v) for k, v in tuned.items()), run  # frozen: as pre-trained
    for run in sorted((out / recipe.name / "imagenet").glob("*/fold0")):
        theirs = backbone_tensors(run)
        assert not all(torch.equal(theirs[k], v) for k, v in tuned.items()), run

    written = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert len(written) == 3  # the pre-training's (a joint model: named unlike its recipe's spec) and both starts'
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert again.returncode == 0 and result.stdout.endswith(again.stdout), again.stderr[-3000:]  # the same table
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == written  # read back, not run again


    # the figures behind the README's reasons: MAI-AFA's region map D and level weights, trained and untrained
    full, no_interaction = (out / recipe.name / "affective" / f / "fold0"
                            for f in ("maiafa_width=32", "maiafa_width=32_interaction=false"))
    spread = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "map_spread.py"), str(full), str(no_interaction),
                             "--images", "6", "--untrained", "--json", str(tmp_path / "spread.json")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert spread.returncode == 0, spread.stderr[-3000:]
    reports = json.loads((tmp_path / "spread.json").read_text())
    assert [(Path(r["run"]), r["untrained"]) for r in reports] == [
        (full, False), (full, True), (no_interaction, False), (no_interaction, True)]
    assert all(set(r["maps"]) == {"region map D"} and 0 < r["maps"]["region map D"]["effective_share"] <= 1 + 1e-6
               for r in reports[:2])
    assert not reports[2]["maps"] and all(len(r["level_weights"]["mean"]) == 4 for r in reports)
    assert reports[0]["level_weights"] != reports[1]["level_weights"]  # trained ψ, not a fresh model's
    assert "region map D: mean" in spread.stdout

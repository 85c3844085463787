"""One paper's table on EmotionROI: its recipe (recipes/emotionroi_*.toml) run on the same 5 folds from ImageNet
weights and from the affective pre-training (recipe emotionroi_pretraining, run once into ``--out``), printed as
a Markdown table beside the paper's own rows, with each row's difference to ``global`` and the pre-training's gain.

    python benchmarks/emotionroi.py --recipe recipes/emotionroi_003_maiafa.toml --out results/emotionroi

Every run is the command a user types (``emolens benchmark --recipe ...``); options after ``--`` go to each of
them (e.g. ``-- --limit 60 --epochs 1`` for a quick look); ``--models "global; maiafa:width=32"`` runs some rows of
the table only. A run whose results hold every model asked for is read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from emolens.cli import split_model_list
from emolens.data.joint import JointDataset, joint_spec, open_datasets
from emolens.engine.benchmark import slug
from emolens.recipes import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PRETRAINING = RECIPES / "emotionroi_pretraining.toml"
#: Columns of the table, by the metric names of results.json: classification, retrieval where run, and the epoch
#: each fold's validation images chose (early epochs: the head over-fits the training folds).
COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "macro_f1": "macro-F1",
           "map8": "mAP (classes)", "map2": "mAP2", "nn": "NN", "ft": "FT", "st": "ST", "best_epoch": "best epoch"}
INITS = ("ImageNet", "affective pre-training")


def run(recipe: Path, data: list[str], out: Path, cache: Path, extra: list[str], models: str | None = None) -> dict:
    """``emolens benchmark --recipe`` into ``out`` for ``models`` (default: the recipe's), skipped when its results
    hold every one of them (a stopped run resumes), its features cached in ``cache``, which every run shares (each
    cache in it is keyed by images, weights, features and view); its results.json."""
    results = out / "results.json"
    specs = split_model_list(models or load_recipe(recipe).settings["models"])
    if not results.is_file() or set(result_names(specs, data)) - set(json.loads(results.read_text())["models"]):
        command = [sys.executable, "-m", "emolens", "benchmark", "--recipe", str(recipe), "--out", str(out),
                   "--cache-dir", str(cache), *extra, *(["--models", models] if models else [])]
        for spec in data:
            command += ["--data", spec]
        if subprocess.run(command).returncode:
            sys.exit(f"emolens benchmark --recipe {recipe.name} stopped (its message is above); run again to resume")
    return json.loads(results.read_text())


def result_names(specs: list[str], data: list[str]) -> list[str]:
    """The names ``emolens benchmark`` gives ``specs`` in its results: on several datasets, joint models'."""
    dataset = open_datasets(data)
    return [joint_spec(s, dataset) for s in specs] if isinstance(dataset, JointDataset) else specs


def pretrained_weights(data_root: Path, out: Path, cache: Path, extra: list[str]) -> Path:
    """The affective pre-training's checkpoint (its one model's run), trained first if it is not in ``out``."""
    results = run(PRETRAINING, [f"flickr_ldl={data_root / 'flickr_ldl'}", f"oasis={data_root / 'oasis'}"], out, cache,
                  extra)
    (checkpoint,) = (out / slug(spec) / "fold0" / "best.safetensors" for spec in results["models"])
    return checkpoint


def cell(figures: dict, metric: str) -> str:
    mean, std = figures["mean"].get(metric), figures["std"].get(metric)
    digits = 1 if metric == "best_epoch" else 3
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(recipe, runs: dict[str, dict]) -> list[str]:
    """The paper's rows, then each model spec's row per start, in Markdown."""
    measured = next(iter(runs.values()))
    first = next(iter(measured["models"].values()))["mean"]
    columns = [c for c in COLUMNS if c in first]
    lines = ["| row | start | " + " | ".join(COLUMNS[c] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row, figures in recipe.paper_table.items():
        lines.append(f"| paper {recipe.paper}: {row} | paper | "
                     + " | ".join(f"{figures[c]:.3f}" if c in figures else "-" for c in columns) + " |")
    for spec in measured["models"]:
        for start, results in runs.items():
            if spec in results["models"]:  # a run given fewer --models leaves the others out
                lines.append(f"| `{spec}` | {start} | " + " | ".join(cell(results["models"][spec], c) for c in columns)
                             + " |")
    return lines


def findings(runs: dict[str, dict], metric: str) -> list[str]:
    """Each model's difference to ``global`` under the same start, and the pre-training's gain per model."""
    lines = []
    for start, results in runs.items():
        models = results["models"]
        if "global" in models:
            base = models["global"]["mean"][metric]
            lines += [f"- {start}: `{spec}` {r['mean'][metric] - base:+.3f} {metric} against `global`"
                      for spec, r in models.items() if spec != "global"]
    if len(runs) == 2:
        before, after = (runs[s]["models"] for s in INITS)
        lines += [f"- `{spec}`: pre-training {after[spec]['mean'][metric] - before[spec]['mean'][metric]:+.3f} {metric}"
                  for spec in before if spec in after]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, required=True, help="an EmotionROI recipe (recipes/emotionroi_*.toml)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="the folder holding emotion6/ (EmotionROI's images), flickr_ldl/ and oasis/")
    parser.add_argument("--out", type=Path, default=Path("results/emotionroi"))
    parser.add_argument("--imagenet-only", action="store_true", help="skip the affective pre-training's rows")
    parser.add_argument("--models", default=None, help="the table's rows, if not every model of the recipe")
    parser.add_argument("extra", nargs="*", help="after --: options for every emolens benchmark run")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    if recipe.dataset != "emotionroi":
        parser.error(f"{args.recipe} is a recipe for {recipe.dataset}, not EmotionROI")
    data = [f"emotionroi={args.data / 'emotion6'}"]
    cache = args.out / "cache"
    runs = {INITS[0]: run(recipe.path, data, args.out / recipe.name / "imagenet", cache, args.extra, args.models)}
    if not args.imagenet_only:
        weights = pretrained_weights(args.data, args.out / "pretraining", cache, args.extra)
        runs[INITS[1]] = run(recipe.path, data, args.out / recipe.name / "affective", cache,
                             [*args.extra, "--init", str(weights), "--init-parts", "backbone"], args.models)
    metric = "map8" if recipe.settings.get("retrieval") else "accuracy"
    print(f"\n{recipe.title}: {recipe.reproduces}\nCPU protocol: {recipe.cpu_protocol}\n")
    print("\n".join(table(recipe, runs)))
    print("\n" + "\n".join(findings(runs, metric)))


if __name__ == "__main__":
    main()

"""Train the embedded default model and measure it.

The default is a joint model (``RECIPE``) on a bundled EfficientNet-Lite (``--backbone``, Lite0 unless told), its
last two stages tuned (``TRAINING``): one learned layer shared by a head per label space, trained on Flickr_LDL's
8-emotion votes, OASIS's valence/arousal ratings and Emotion6's 7-way votes and ratings. OASIS comes before
Emotion6, so its valence/arousal head is the model's ``affect``.

1. 5-fold cross-validation of the recipe (each dataset on the folds a single-dataset run of it gets).
2. The shipped model: the same recipe on 95% of each dataset, the epoch chosen on the other 5%; on that
   validation part, horizontal-flip averaging at test time is measured (and reported, not shipped: it
   halves prediction speed). Saved in fp16 to ``emolens/weights/``, of the backbone only the tuned stages.

    python benchmarks/train_default_model.py --out results/default
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from emolens.checkpoints import atomic_write_json
from emolens.data import Fold
from emolens.data.joint import JointDataset, joint_spec, open_datasets
from emolens.data.transforms import eval_transform
from emolens.engine import TrainConfig, fit
from emolens.engine.benchmark import run_benchmark
from emolens.engine.trainer import saved_backbone
from emolens.engine.data import image_loader
from emolens.metrics import affect_report, kl_divergence
from emolens.models import create_model
from emolens.polarity import PolarityCalibration, fit_polarity_calibration
from emolens.predict import Predictor
from emolens.runtime import export_onnx, packaged_default_onnx
from emolens.storage import default_weights_path
from emolens.weights import load_model, save_model

DATA = ("flickr_ldl=../shared/data/flickr_ldl", "oasis=../shared/data/oasis", "emotion6=../shared/data/emotion6")
RECIPE = "global:affect_heads=per_dataset,embed=256,affect_weight=5"
TRAINING = dict(optimizer="adamw", lr=1e-3, backbone_lr=1e-4, epochs=30, patience=5, tune_stages=2, cache_views=4)
BACKBONE = "efficientnet_lite0"


def final_fold(dataset: JointDataset, seed: int, val_fraction: float = 0.05) -> Fold:
    """Each member split (stratified, ``seed``) into training and ``val_fraction`` validation; no test part."""
    split = dataset.protocol("split", seed=seed, fractions=(1 - val_fraction, val_fraction, 0.0)).folds[0]
    return Fold(split.train, split.val, [])


def train_final(dataset: JointDataset, out: Path, seed: int = 0, cache_dir: Path | None = None,
                recipe: str = RECIPE, backbone: str = BACKBONE, **training) -> tuple[torch.nn.Module, Fold, dict]:
    """The recipe trained on ``dataset``'s :func:`final_fold`; (best model, fold, validation figures)."""
    fold = final_fold(dataset, seed)
    torch.manual_seed(seed)
    model = create_model(joint_spec(recipe, dataset), task="joint", backbone=backbone)
    result = fit(model, dataset, fold, out, TrainConfig(seed=seed, **{**TRAINING, **training}), cache_dir=cache_dir)
    return load_model(out), fold, {"val": result.val_metrics, "best_epoch": result.best_epoch}


def calibrate_polarity(predictor: Predictor, dataset: JointDataset, rows: list[int]) -> PolarityCalibration:
    """The polarity calibration of ``predictor``'s model, fitted on ``dataset``'s ``rows`` that have a
    polarity (an emotion's, or the side of OASIS's neutral valence)."""
    polar = [r for r in rows if dataset.polarities[r] >= 0]
    found, errors = predictor.predict([dataset.samples[r].path for r in polar])
    if errors:
        raise RuntimeError(f"{len(errors)} validation image(s) could not be read, e.g. {errors[0]}")
    return fit_polarity_calibration(positive_shares(predictor, found), np.array([p.valence for p in found]),
                                    dataset.polarities[polar] == 1,
                                    fitted_on=f"{len(polar)} validation images of {dataset.spec}")


def positive_shares(predictor: Predictor, found) -> np.ndarray:
    """The positive share of each prediction's distribution over the classes that have a polarity."""
    classes = predictor.taxonomy.classes
    return predictor.taxonomy.polarity_distribution(np.array([[p.distribution[c] for c in classes] for p in found]))[:, 1]


@torch.inference_mode()
def flip_averaging(model, dataset: JointDataset, rows: list[int]) -> dict[str, float]:
    """Validation figures of the plain and the flip-averaged predictions: each class space's KL and each
    rating set's valence/arousal Pearson r (on its own scale)."""
    model.eval()
    paths = [dataset.samples[r].path for r in rows]
    plain, flipped = [], []
    for batch in image_loader(paths, eval_transform(model.preprocessing), 32, 2, min_side=model.preprocessing.resize):
        plain.append(model(batch["image"]))
        flipped.append(model(batch["image"].flip(-1)))
    join = {k: torch.cat([o[k] for o in plain]).float().numpy() for k in plain[0]}
    join_flip = {k: torch.cat([o[k] for o in flipped]).float().numpy() for k in flipped[0]}
    targets = {k: v[rows] for k, v in dataset.targets().items()}
    figures = {}
    for mode, outputs in (("plain", join), ("flip", {k: (join[k] + join_flip[k]) / 2 for k in join})):
        for key, target in targets.items():
            space, _, kind = key.rpartition(".")
            if kind == "distribution":
                seen = ~np.isnan(target).any(1)
                logits = outputs[f"{space}.logits"][seen]
                probs = np.exp(logits - logits.max(1, keepdims=True))
                figures[f"{mode}.{space}_kl"] = kl_divergence(target[seen], probs / probs.sum(1, keepdims=True))
            elif key.startswith("affect@"):
                seen = ~np.isnan(target).any(1)
                member = next(m for m in dataset.members if f"affect@{m.kind}" == key)
                report = affect_report(target[seen], outputs[key][seen], member.affect_scale)
                figures.update({f"{mode}.{member.kind}_{d}_pearson": report[f"{d}_pearson"]
                                for d in ("valence", "arousal")})
    return figures


def same_cv(results: dict, dataset: JointDataset, spec: str, config: TrainConfig, backbone: str) -> dict:
    """The figures of ``spec`` in a benchmark's ``results``, which must be a 5-fold run of the same datasets
    with the same seed, backbone and training settings (where it ran does not matter: workers, device)."""
    ran = {k: v for k, v in results["train_config"].items() if k not in ("workers", "device")}
    ours = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in ("workers", "device")}
    ran["backbone"], ours["backbone"] = results["models"].get(spec, {}).get("backbone"), backbone
    differ = sorted(k for k in ours if ran.get(k) != ours[k])
    if results["dataset"] != dataset.spec or results["folds"] != 5 or spec not in results["models"] or differ:
        raise SystemExit(f"that benchmark is not this recipe's 5-fold CV (settings that differ: {differ or 'none'}; "
                         f"datasets {results['dataset']}; models {', '.join(results['models'])})")
    return results["models"][spec]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", help=f"datasets, OASIS before Emotion6 (default: {' '.join(DATA)})")
    ap.add_argument("--out", type=Path, default=Path("results/default"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=BACKBONE, help="bundled EfficientNet-Lite trunk (default: %(default)s)")
    ap.add_argument("--skip-cv", action="store_true", help="train the shipped model only")
    ap.add_argument("--cv-from", type=Path, help="take the CV figures from this benchmark's results.json instead of "
                    "running it again (refused unless it ran this recipe, data, seed, backbone and training settings)")
    ap.add_argument("--cache", type=Path, help="frozen-feature cache folder (default: OUT/cache; a benchmark's "
                    "cache of the same datasets in the same order serves)")
    ap.add_argument("--calibrate-only", action="store_true", help="refit the shipped model's polarity calibration "
                    "on its validation images (the same split) and export it again; no training")
    args = ap.parse_args()

    dataset = open_datasets(args.data or list(DATA))
    if args.calibrate_only:
        calibrate_default(dataset, final_fold(dataset, args.seed))
        return
    config = TrainConfig(seed=args.seed, **TRAINING)
    spec = joint_spec(RECIPE, dataset)
    card = {"recipe": spec, "backbone": args.backbone, "datasets": dataset.spec,
            "train_config": {**TRAINING, "seed": args.seed},
            "valence_arousal": "common scale [-1, 1]: OASIS's 1-7 ratings mapped linearly (4 -> 0)",
            "protocol": "5-fold CV per dataset (seed 0) for the figures; shipped model trained on 95% of each "
                        "dataset, epoch chosen on the other 5%"}
    if args.cv_from:
        cv = same_cv(json.loads(args.cv_from.read_text()), dataset, spec, config, args.backbone)
        card["cv_mean"], card["cv_std"] = cv["mean"], cv["std"]
    elif not args.skip_cv:
        cv = run_benchmark(dataset, [spec], "joint", args.out / "cv", folds=5, seed=args.seed, config=config,
                           backbone=args.backbone, retrieval=True, cache_dir=args.cache)
        card["cv_mean"], card["cv_std"] = cv["models"][spec]["mean"], cv["models"][spec]["std"]
        print(json.dumps({"mean": card["cv_mean"], "std": card["cv_std"]}, indent=2))

    best, fold, final = train_final(dataset, args.out / "final", args.seed, cache_dir=args.cache or args.out / "cache",
                                    backbone=args.backbone)
    card.update(final_val=final["val"], best_epoch=final["best_epoch"],
                flip_averaging_on_validation=flip_averaging(best, dataset, fold.val))
    print(json.dumps(card["flip_averaging_on_validation"], indent=2))
    save_model(best, default_weights_path(), include_backbone=saved_backbone(best, config), half=True, card=card,
               dataset=dataset.spec)
    card["polarity_calibration"] = calibrate_default(dataset, fold)
    atomic_write_json(args.out / "card.json", card)
    print(f"wrote {default_weights_path()} and {packaged_default_onnx()}")


def calibrate_default(dataset: JointDataset, fold: Fold) -> dict:
    """Fit the shipped model's polarity calibration on its validation images, write it into its card, and
    export the model for the core install (the export carries the card)."""
    calibration = calibrate_polarity(Predictor(load_model("default"), backend="torch"), dataset, fold.val).to_dict()
    card_path = default_weights_path().with_suffix(".json")
    meta = json.loads(card_path.read_text())
    meta["card"]["polarity_calibration"] = calibration
    atomic_write_json(card_path, meta)
    export_onnx(load_model("default"), packaged_default_onnx())
    print(json.dumps({"polarity_calibration": calibration}, indent=2))
    return calibration


if __name__ == "__main__":
    main()

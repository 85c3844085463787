"""Valence and arousal (task va): emolens models beside a ridge regression on the frozen backbone's pooled
feature, on the same k folds, in the same run; figures on the dataset's own rating scale.

    python benchmarks/affect.py --data oasis=../shared/data/oasis --out results/va_oasis \
        --models "global:loss=mse global:loss=ccc" --epochs 30 \
        --ridge efficientnet_lite0,efficientnet_lite2,efficientnet_lite0+efficientnet_lite2,efficientnet_lite0@levels
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from emolens.backbones import create_backbone
from emolens.data import Protocol, load_dataset
from emolens.data.transforms import eval_transform
from emolens.engine import TrainConfig
from emolens.engine.benchmark import run_benchmark, summarise
from emolens.engine.data import image_loader
from emolens.metrics import affect_report

SHOWN = ("valence_pearson", "valence_ccc", "valence_mae", "arousal_pearson", "arousal_ccc", "arousal_mae")


@torch.inference_mode()
def pooled_features(dataset, backbone_name: str, levels: bool = False) -> np.ndarray:
    """The backbone's pooled feature per image; with ``levels``, each level's spatial mean joins it."""
    backbone = create_backbone(backbone_name).eval()
    loader = image_loader([s.path for s in dataset.samples], eval_transform(backbone.preprocessing), 32, 2,
                          min_side=backbone.preprocessing.resize)
    parts = []
    for batch in loader:
        out = backbone(batch["image"])
        parts.append(torch.cat([out["pooled"], *(out["level_means"] if levels else [])], 1).numpy())
    return np.concatenate(parts)


def ridge_folds(dataset, protocol: Protocol, features: np.ndarray) -> list[dict[str, float]]:
    """Ridge regression per fold on features standardised with the fold's own training statistics (so that
    concatenated features share one penalty), the penalty chosen by leave-one-out on the training and
    validation part."""
    affect = dataset.affect
    out = []
    for fold in protocol.folds:
        fit_rows = fold.train + fold.val
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        model.fit(features[fit_rows], affect[fit_rows])
        out.append(affect_report(affect[fold.test], model.predict(features[fold.test]), dataset.affect_scale))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="oasis=../shared/data/oasis")
    ap.add_argument("--out", type=Path, default=Path("results/va"))
    ap.add_argument("--models", default="global:loss=mse global:loss=ccc")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ridge", default="efficientnet_lite0",
                    help="ridge baselines, comma-separated: a backbone, backbones joined by + (features "
                         "concatenated), a suffix @levels adds every level's mean")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    config = TrainConfig(epochs=args.epochs, optimizer="adamw", lr=args.lr, freeze_backbone=True, patience=8,
                         select="ccc")
    results = run_benchmark(ds, args.models.split(), "va", args.out, args.folds, 0, config, args.backbone,
                            progress=False, log=lambda m: None)
    protocol = Protocol.load(args.out / "protocol.json", ds)
    cached: dict[tuple[str, bool], np.ndarray] = {}
    rows = []
    for choice in args.ridge.split(","):
        names, _, levels = choice.partition("@")
        for name in names.split("+"):
            if (name, bool(levels)) not in cached:
                cached[name, bool(levels)] = pooled_features(ds, name, bool(levels))
        features = np.concatenate([cached[name, bool(levels)] for name in names.split("+")], 1)
        rows.append((f"ridge, frozen {choice} ({features.shape[1]}-d)", summarise(ridge_folds(ds, protocol, features))))
    rows += [(spec, (r["mean"], r["std"])) for spec, r in results["models"].items()]
    print(f"{args.data}: {len(protocol.folds)}-fold, seed 0, on the dataset's scale "
          f"({ds.affect_scale.low:g}-{ds.affect_scale.high:g})")
    print(f"{'':58}" + "".join(f"{c:>18}" for c in SHOWN))
    for name, (mean, std) in rows:
        print(f"{name:58}" + "".join(f"{mean[c]:>10.3f} ± {std[c]:.3f}" for c in SHOWN))


if __name__ == "__main__":
    main()

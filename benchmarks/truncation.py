"""Truncation study of paper 004 (section 4.2, Fig. 4): for each stream, remove the top blocks one by
one, retrain, and report k-fold accuracy per depth. Frozen backbones, the harness's folds.

    python benchmarks/truncation.py --data flickr_ldl=../shared/data/flickr_ldl \
        --streams efficientnet_lite0 efficientnet_lite2 --out results/truncation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emolens.backbones import Backbone
from emolens.data import load_dataset
from emolens.engine import TrainConfig
from emolens.engine.benchmark import run_benchmark
from emolens.storage import atomic_write_json


def blocks_of(stream: str) -> int:
    return len(Backbone(stream, weights=None, out_strides=None).strides)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for stream, points in curves.items():
        depths = [p["depth"] for p in points]
        ax.errorbar(depths, [p["accuracy"] for p in points], yerr=[p["std"] for p in points], marker="o",
                    capsize=3, label=stream)
    ax.set_xlabel("blocks kept (GAP 1..k)")
    ax.set_ylabel("test accuracy (k-fold mean ± std)")
    ax.set_xticks(sorted({p["depth"] for points in curves.values() for p in points}))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="flickr_ldl=../shared/data/flickr_ldl")
    ap.add_argument("--task", default="emotion")
    ap.add_argument("--streams", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    ap.add_argument("--spec", default="multigap:gru=64", help="the variant to truncate (paper: MG + Bi-GRU + Att)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--out", type=Path, default=Path("results/truncation"))
    args = ap.parse_args()
    dataset = load_dataset(args.data)
    config = TrainConfig(epochs=args.epochs, freeze_backbone=True, optimizer=args.optimizer, lr=args.lr)
    curves = {}
    for stream in args.streams:
        specs = [f"{args.spec},depth={d}" for d in range(blocks_of(stream), 0, -1)]
        results = run_benchmark(dataset, specs, args.task, args.out / stream, folds=args.folds, config=config,
                                backbone=stream, progress=False, log=lambda *_: None)
        curves[stream] = [{"depth": int(spec.rsplit("=", 1)[1]), "accuracy": r["mean"]["accuracy"],
                           "std": r["std"]["accuracy"], "macro_f1": r["mean"]["macro_f1"]}
                          for spec, r in results["models"].items()]
        for p in curves[stream]:
            print(f"{stream:>20}  GAP 1-{p['depth']}: accuracy {p['accuracy']:.3f} ± {p['std']:.3f}, "
                  f"macro-F1 {p['macro_f1']:.3f}", flush=True)
    atomic_write_json(args.out / "truncation.json", curves)
    plot(curves, args.out / "truncation.png")
    print(json.dumps(curves))
    print(f"wrote {args.out / 'truncation.png'}")


if __name__ == "__main__":
    main()

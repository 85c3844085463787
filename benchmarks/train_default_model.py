"""Train the embedded default model and measure it.

1. 5-fold cross-validation of the recipe with the harness (figures for the README's model card).
2. The shipped model: the same recipe on 95% of Flickr_LDL, the checkpoint chosen on the other 5%,
   saved in fp16 without the bundled backbone to ``emolens/weights/default.safetensors``.

    python benchmarks/train_default_model.py --data flickr_ldl=../shared/data/flickr_ldl --out results/default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emolens.checkpoints import atomic_write_json
from emolens.data import Fold, load_dataset, make_protocol
from emolens.engine import TrainConfig, fit
from emolens.engine.benchmark import run_benchmark
from emolens.models import create_model
from emolens.storage import default_weights_path
from emolens.weights import load_model, save_model

RECIPE = "global:loss=kl"
TASK = "distribution"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="flickr_ldl=../shared/data/flickr_ldl")
    ap.add_argument("--out", type=Path, default=Path("results/default"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ds = load_dataset(args.data)
    config = TrainConfig(epochs=args.epochs, freeze_backbone=True, seed=args.seed)
    cv = run_benchmark(ds, [RECIPE], TASK, args.out / "cv", folds=5, seed=args.seed, config=config)
    summary = cv["models"][RECIPE]
    print(json.dumps({"mean": summary["mean"], "std": summary["std"]}, indent=2))

    split = make_protocol(ds, "split", seed=args.seed, task=TASK, fractions=(0.95, 0.05, 0.0)).folds[0]
    model = create_model(RECIPE, taxonomy=ds.taxonomy, task=TASK)
    result = fit(model, ds, Fold(split.train, split.val, []), args.out / "final", config, cache_dir=args.out / "cv" / "cache")
    best = load_model(args.out / "final")
    card = {
        "recipe": RECIPE, "task": TASK, "dataset": "Flickr_LDL (1,050 images of the public release)",
        "protocol": "5-fold stratified CV (seed 0) for the figures; shipped model trained on 95%, checkpoint chosen on 5%",
        "cv_mean": summary["mean"], "cv_std": summary["std"], "final_val": result.val_metrics,
        "best_epoch": result.best_epoch, "train_config": cv["train_config"],
    }
    save_model(best, default_weights_path(), include_backbone=False, half=True, card=card, dataset=args.data)
    atomic_write_json(args.out / "card.json", card)
    print(f"wrote {default_weights_path()}")


if __name__ == "__main__":
    main()

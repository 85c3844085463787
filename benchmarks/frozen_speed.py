"""Epoch time of full fine-tuning against tuning the last stages on the cached output of the frozen ones and
against the frozen-backbone feature cache, in the same run.

    python benchmarks/frozen_speed.py --data flickr_ldl=../shared/data/flickr_ldl --n 256 --tune-stages 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from emolens.data import Fold, load_dataset
from emolens.engine import TrainConfig, fit
from emolens.models import create_model


def epoch_seconds(dataset, rows, out: Path, epochs: int = 2, **training) -> float:
    """Mean seconds per epoch (a cache, where the settings use one, is built before the clock starts)."""
    model = create_model("global", taxonomy=dataset.taxonomy)
    fold = Fold(rows[: int(0.9 * len(rows))], rows[int(0.9 * len(rows)):], [])
    config = TrainConfig(epochs=epochs, patience=None, **training)
    return fit(model, dataset, fold, out, config, progress=False).train_seconds / epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="flickr_ldl=../shared/data/flickr_ldl")
    ap.add_argument("--n", type=int, default=256, help="images per epoch")
    ap.add_argument("--tune-stages", type=int, default=2, help="stages trained in the middle row")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    rows = list(range(min(args.n, len(ds))))
    with tempfile.TemporaryDirectory() as tmp:
        full = epoch_seconds(ds, rows, Path(tmp) / "full")
        tuned = epoch_seconds(ds, rows, Path(tmp) / "tuned", tune_stages=args.tune_stages)
        frozen = epoch_seconds(ds, rows, Path(tmp) / "frozen", freeze_backbone=True)
    print(f"{len(rows)} images per epoch: fine-tuning {full:.2f} s/epoch; last {args.tune_stages} stages tuned on "
          f"the cached frozen stages {tuned:.2f} s/epoch ({full / tuned:.1f}x faster); frozen cached backbone "
          f"{frozen:.3f} s/epoch ({full / frozen:.0f}x faster)")


if __name__ == "__main__":
    main()

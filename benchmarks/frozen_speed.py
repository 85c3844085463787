"""Epoch time of full fine-tuning against the frozen-backbone feature cache, in the same run.

    python benchmarks/frozen_speed.py --data flickr_ldl=../shared/data/flickr_ldl --n 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from emolens.data import Fold, load_dataset
from emolens.engine import TrainConfig, fit
from emolens.models import create_model


def epoch_seconds(dataset, rows, freeze: bool, out: Path, epochs: int = 2) -> float:
    """Mean seconds per epoch (the cache, when frozen, is built before the clock starts)."""
    model = create_model("global", taxonomy=dataset.taxonomy)
    fold = Fold(rows[: int(0.9 * len(rows))], rows[int(0.9 * len(rows)):], [])
    config = TrainConfig(epochs=epochs, freeze_backbone=freeze, patience=None)
    return fit(model, dataset, fold, out, config, progress=False).train_seconds / epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="flickr_ldl=../shared/data/flickr_ldl")
    ap.add_argument("--n", type=int, default=256, help="images per epoch")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    rows = list(range(min(args.n, len(ds))))
    with tempfile.TemporaryDirectory() as tmp:
        full = epoch_seconds(ds, rows, False, Path(tmp) / "full")
        frozen = epoch_seconds(ds, rows, True, Path(tmp) / "frozen")
    print(f"{len(rows)} images per epoch: fine-tuning {full:.2f} s/epoch, frozen cached backbone {frozen:.3f} s/epoch, "
          f"{full / frozen:.0f}x faster")


if __name__ == "__main__":
    main()

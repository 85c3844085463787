"""Quantise the embedded default model to int8 and measure whether it may stand in for fp32.

Calibrated on ``--calibration`` images (300) drawn from the shipped model's own training images (the 95% of
each dataset it was trained on, seed 0); gated (``emolens.quantize.measure_gate``) on the default's 5-fold test
parts (seed 0) of Flickr_LDL, OASIS and Emotion6: accuracy, valence/arousal Pearson r, polarity ROC AUC, and
the top emotion's agreement with fp32 on every image. Writes ``emolens/weights/onnx/default.int8.onnx`` with
its metadata (the gate included), which ``--precision int8`` runs only where the gate passed.

    python benchmarks/quantize_default.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from train_default_model import DATA, final_fold
from emolens.data import load_dataset
from emolens.data.joint import open_datasets
from emolens.quantize import build_int8
from emolens.runtime import packaged_default_int8, packaged_default_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", help=f"the default's datasets (default: {' '.join(DATA)})")
    ap.add_argument("--calibration", type=int, default=300, help="calibration images (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=packaged_default_int8(), help="where to write (default: the package)")
    args = ap.parse_args()

    specs = args.data or list(DATA)
    joint = open_datasets(specs)
    training = final_fold(joint, args.seed).train
    chosen = np.sort(np.random.default_rng(args.seed).choice(training, args.calibration, replace=False))
    calibrated_on = (f"{args.calibration} of the default's training images (seed {args.seed}) of "
                     f"{', '.join(s.partition('=')[0] for s in specs)}")
    t0 = time.perf_counter()
    gate = build_int8(packaged_default_onnx(), [str(joint.samples[r].path) for r in chosen],
                      [load_dataset(s) for s in specs], calibrated_on, args.out)
    print(f"quantised and measured in {time.perf_counter() - t0:.0f} s: {args.out} "
          f"({args.out.stat().st_size / 2**20:.1f} MiB, fp32 {packaged_default_onnx().stat().st_size / 2**20:.1f} MiB)")
    width = max(map(len, gate.fp32))
    for name, value in gate.fp32.items():
        print(f"{name:{width}}  fp32 {value:.4f}  int8 {gate.int8[name]:.4f}  loss {value - gate.int8[name]:+.4f}")
    print(f"top emotion agrees on {gate.agreement:.4f} of {gate.images} images ({gate.agreement_outside_calibration:.4f} "
          f"of the {gate.images_outside_calibration} outside the calibration)")
    print("gate: " + ("passed" if gate.passed else f"failed: {gate.reason}"))
    print(json.dumps(gate.to_dict()))


if __name__ == "__main__":
    main()

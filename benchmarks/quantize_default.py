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
from emolens.predict import Predictor
from emolens.quantize import int8_gate, int8_meta, measure_gate, quantize_onnx, top_agreement
from emolens.runtime import packaged_default_int8, packaged_default_onnx, read_onnx_meta
from emolens.storage import atomic_write_bytes, atomic_write_json


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
    fp32 = Predictor(None)
    calibration_paths = [str(joint.samples[r].path) for r in chosen]
    calibration = np.stack([fp32.prepare(p) for p in calibration_paths])
    fp32_meta = read_onnx_meta(packaged_default_onnx())
    calibrated_on = (f"{args.calibration} of the default's training images (seed {args.seed}) of "
                     f"{', '.join(s.partition('=')[0] for s in specs)}")
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / "default.int8.onnx"
        t0 = time.perf_counter()
        quantize_onnx(packaged_default_onnx(), calibration, draft)
        made_in = time.perf_counter() - t0
        unmeasured = int8_gate({}, {}, float("nan"), 0)
        atomic_write_json(draft.with_suffix(".json"), int8_meta(fp32_meta, calibrated_on, unmeasured))
        int8 = Predictor(draft)
        datasets = [load_dataset(s) for s in specs]
        gate = measure_gate(fp32, int8, datasets, seed=args.seed)
        # the agreement on images that took no part in the calibration
        others = [str(s.path) for d in datasets for s in d.samples if str(s.path) not in set(calibration_paths)]
        outs = [np.concatenate([p.run(np.stack([p.prepare(x) for x in others[i:i + 32]]))["logits"]
                                for i in range(0, len(others), 32)]) for p in (fp32, int8)]
        uncalibrated = top_agreement(*outs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, draft.read_bytes())
    meta = int8_meta(fp32_meta, calibrated_on, gate)
    meta["int8_gate"]["agreement_outside_calibration"] = {"agreement": uncalibrated, "images": len(others)}
    atomic_write_json(args.out.with_suffix(".json"), meta)
    print(f"quantised in {made_in:.0f} s: {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB, fp32 "
          f"{packaged_default_onnx().stat().st_size / 2**20:.1f} MiB)")
    width = max(map(len, gate.fp32))
    for name, value in gate.fp32.items():
        print(f"{name:{width}}  fp32 {value:.4f}  int8 {gate.int8[name]:.4f}  loss {value - gate.int8[name]:+.4f}")
    print(f"top emotion agrees on {gate.agreement:.4f} of {gate.images} images ({uncalibrated:.4f} of the "
          f"{len(others)} outside the calibration)")
    print("gate: " + ("passed" if gate.passed else f"failed: {gate.reason}"))
    print(json.dumps(meta["int8_gate"]))


if __name__ == "__main__":
    main()

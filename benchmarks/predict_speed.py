"""Predict throughput and peak memory of the default model, end to end from JPEG files.

Compares a naive loop (PIL open, transform, one image per eager PyTorch forward pass) with
``emolens.Predictor`` on both backends in the same run: ``torch`` (batched, inference mode,
channels-last), ``onnx`` (ONNX Runtime on the cached export; the one-off export is timed
separately) and ``int8`` (the default's int8 version on ONNX Runtime, ``--precision int8``). Each runs in its own process, so its peak RSS (own + largest child) is its own.

    python benchmarks/predict_speed.py [--images ../shared/data/flickr_ldl/images] [--n 256] [--compare OTHER]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("export", "naive", "torch", "onnx", "int8")


def synthetic_jpegs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # smooth, photo-like after upscaling
        img = Image.fromarray(small).resize((384, 256), Image.BICUBIC)
        p = folder / f"{i}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def run_naive(paths: list[Path]) -> int:
    """What a research script does: torchvision transforms on PIL images, one eager forward per image."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from emolens.weights import load_model

    model = load_model().eval()
    pre = model.preprocessing
    tf = T.Compose([T.Resize(pre.resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(pre.size),
                    T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    with torch.no_grad():
        for p in paths:
            model(tf(Image.open(p).convert("RGB"))[None])
    return len(paths)


def run_predictor(paths: list[Path], batch_size: int, workers: int | None, backend: str, model: str | None = None,
                  precision: str = "fp32") -> int:
    from emolens.predict import Predictor

    predictor = Predictor(model, batch_size=batch_size, workers=workers, backend=backend, precision=precision)
    assert predictor.backend == backend and predictor.precision == precision
    good, _ = predictor.predict(paths)
    return len(good)


def run_export(model: str = "default") -> int:
    from emolens.runtime import onnx_model_for

    onnx_model_for(model)
    return 0


def child(mode: str, listing: Path, batch_size: int, workers: int | None, model: str | None) -> None:
    paths = [Path(p) for p in listing.read_text().split("\n") if p]
    t0 = time.perf_counter()
    if mode == "export":
        done = run_export()
    elif mode == "naive":
        done = run_naive(paths)
    elif mode == "compare":  # one model of a compared pair: exported in this process, then timed on ONNX Runtime
        run_export(model)
        t0 = time.perf_counter()
        done = run_predictor(paths, batch_size, workers, "onnx", model)
    elif mode == "int8":
        done = run_predictor(paths, batch_size, workers, "onnx", precision="int8")
    else:
        done = run_predictor(paths, batch_size, workers, backend=mode)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"mode": mode, "images": done, "seconds": seconds, "images_per_s": done / seconds,
                      "peak_rss_mib": peak_kib / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, help="folder of JPEGs (default: synthetic 384x256 JPEGs)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--compare", help="another saved model (e.g. a previous default): it and the default are timed "
                    "the same way (ONNX Runtime, each exported first in its own process), one after the other, in "
                    "the same run")
    ap.add_argument("--child", choices=(*MODES, "compare"), help=argparse.SUPPRESS)
    ap.add_argument("--listing", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.listing, args.batch_size, args.workers, args.compare)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.images:
            paths = sorted(args.images.glob("*.jpg"))[: args.n]
        else:
            paths = synthetic_jpegs(tmp, args.n)
        listing = tmp / "paths.txt"
        listing.write_text("\n".join(map(str, paths)))
        results = {}
        os.environ["EMOLENS_CACHE"] = str(tmp / "cache")  # a cold cache: the export is measured, then reused
        # The pair compared runs the same path, so a slot's own cost (an export in the process) is no difference.
        pair = [("compare:default", "default"), ("compare:other", args.compare)] if args.compare else []
        for name, model in [(mode, None) for mode in MODES] + pair:
            cmd = [sys.executable, __file__, "--child", name.partition(":")[0], "--listing", str(listing),
                   "--batch-size", str(args.batch_size)]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            if model:
                cmd += ["--compare", model]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    naive = results["naive"]
    print(f"images: {len(paths)} JPEGs ({'from ' + str(args.images) if args.images else 'synthetic 384x256'})")
    print(f"one-off ONNX export of the default model: {results['export']['seconds']:.1f} s, "
          f"peak RSS {results['export']['peak_rss_mib']:.0f} MiB")
    for mode in ("naive", "torch", "onnx", "int8"):
        r = results[mode]
        print(f"{mode:>6}: {r['images_per_s']:6.1f} images/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"{r['images_per_s'] / naive['images_per_s']:.2f}x naive")
    print(f"int8 runs {results['int8']['images_per_s'] / results['onnx']['images_per_s']:.2f}x fp32's speed "
          "(both on ONNX Runtime, end to end)")
    if args.compare:
        ours, other = results["compare:default"]["images_per_s"], results["compare:other"]["images_per_s"]
        print(f"timed alike (onnx, each after its own export): the default {ours:.1f} images/s, {args.compare} "
              f"{other:.1f}; the default runs {ours / other:.2f}x its speed")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Predict throughput and peak memory of the default model, end to end from JPEG files.

Compares ``emolens.Predictor`` (batched decoding in DataLoader workers, inference mode,
channels-last) with a naive loop (PIL open, transform, one image per forward pass) in the
same run; each side runs in its own process so its peak RSS is its own.

    python benchmarks/predict_speed.py [--images ../shared/data/flickr_ldl/images] [--n 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


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
    import torch
    from PIL import Image

    from emolens.data.transforms import eval_transform
    from emolens.weights import load_model

    model = load_model().eval()
    tf = eval_transform(model.preprocessing)
    with torch.no_grad():
        for p in paths:
            model(tf(Image.open(p).convert("RGB"))[None])
    return len(paths)


def run_predictor(paths: list[Path], batch_size: int, workers: int | None) -> int:
    from emolens.predict import Predictor

    good, _ = Predictor(batch_size=batch_size, workers=workers).predict(paths)
    return len(good)


def child(mode: str, listing: Path, batch_size: int, workers: int | None) -> None:
    paths = [Path(p) for p in listing.read_text().split("\n") if p]
    t0 = time.perf_counter()
    done = run_naive(paths) if mode == "naive" else run_predictor(paths, batch_size, workers)
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
    ap.add_argument("--child", choices=["naive", "predictor"], help=argparse.SUPPRESS)
    ap.add_argument("--listing", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.listing, args.batch_size, args.workers)
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
        for mode in ("naive", "predictor"):
            cmd = [sys.executable, __file__, "--child", mode, "--listing", str(listing), "--batch-size", str(args.batch_size)]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    naive, fast = results["naive"], results["predictor"]
    print(f"images: {len(paths)} JPEGs ({'from ' + str(args.images) if args.images else 'synthetic 384x256'})")
    for r in (naive, fast):
        print(f"{r['mode']:>9}: {r['images_per_s']:6.1f} images/s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"speed-up: {fast['images_per_s'] / naive['images_per_s']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

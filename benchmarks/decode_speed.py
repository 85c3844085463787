"""Camera-size JPEGs: the full decode against the reduced-scale decode that every path uses (libjpeg's DCT
scaling, the shorter side kept at least the model's resize side), and what it changes in the default model's
input and output; then ``Predictor()`` (ONNX Runtime) end to end on the same photos, with the reduced decode
and with every pixel decoded (as before it).

Both decodes run in this process, one after the other, on the same files (synthetic photos: smooth colour
fields with sensor-like noise, JPEG quality 90).

    python benchmarks/decode_speed.py [--n 48] [--size 4000x3000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
from PIL import Image
from scipy.special import softmax


def camera_jpegs(folder: Path, n: int, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        noisy = np.asarray(field, np.int16) + rng.normal(0, 6, (height, width, 1)).astype(np.int16)
        path = folder / f"{i}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn, paths) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    inputs = np.stack([fn(p) for p in paths])
    return inputs, len(paths) / (time.perf_counter() - t0)


def predict_speed(predictor, paths) -> float:
    t0 = time.perf_counter()
    good, _ = predictor.predict(paths)
    return len(good) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--size", default="4000x3000", help="photo size, WIDTHxHEIGHT")
    args = ap.parse_args()
    width, height = map(int, args.size.lower().split("x"))

    from emolens.images import load_image
    from emolens.predict import Predictor
    from emolens.preprocessing import Preprocessing

    predictor = Predictor()
    pre = predictor.preprocessing
    with tempfile.TemporaryDirectory() as tmp:
        paths = camera_jpegs(Path(tmp), args.n, width, height)
        megabytes = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        full, full_rate = timed(lambda p: pre(load_image(p)), paths)
        reduced, reduced_rate = timed(lambda p: pre(pre.load(p)), paths)
        decoded_size = pre.load(paths[0]).size
        predict_rate = predict_speed(predictor, paths)
        with patch.object(Preprocessing, "load", lambda self, source, max_pixels: load_image(source, max_pixels)):
            predict_full_rate = predict_speed(predictor, paths)
    probs = [softmax(predictor.run(x)["logits"], axis=1) for x in (full, reduced)]
    figures = {
        "photos": args.n, "size": [width, height], "mean_file_mb": round(megabytes, 2), "decoded_size": decoded_size,
        "full_decode_images_per_s": full_rate, "reduced_decode_images_per_s": reduced_rate,
        "speed_ratio": reduced_rate / full_rate,
        "input_mean_abs_difference": float(np.abs(full - reduced).mean()),
        "distribution_max_abs_difference": float(np.abs(probs[0] - probs[1]).max()),
        "same_top_emotion": float((probs[0].argmax(1) == probs[1].argmax(1)).mean()),
        "predict_images_per_s": predict_rate, "predict_full_decode_images_per_s": predict_full_rate,
    }
    print(f"{args.n} JPEGs of {width}x{height} ({megabytes:.1f} MB each); reduced decode gives {decoded_size[0]}x"
          f"{decoded_size[1]}")
    print(f"decode + preprocess: full {full_rate:.1f} images/s, reduced {reduced_rate:.1f} images/s "
          f"({reduced_rate / full_rate:.2f}x)")
    print(f"model input changes by {figures['input_mean_abs_difference']:.4f} on average (scale -1..1); the default "
          f"model's distribution by at most {figures['distribution_max_abs_difference']:.4f}; same top emotion for "
          f"{figures['same_top_emotion']:.0%} of the photos")
    print(f"Predictor() end to end (ONNX Runtime): {predict_rate:.1f} images/s; decoding every pixel "
          f"{predict_full_rate:.1f} images/s ({predict_rate / predict_full_rate:.2f}x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

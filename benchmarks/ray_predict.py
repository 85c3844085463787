"""Scoring on Ray against the single-process predictor, on the same images in the same run.

Times, on this machine: ``Predictor`` in one process (ONNX Runtime, all CPUs, threaded decoding), then
``predict --engine ray``'s path (``emolens.ray_scoring.score_with_ray``) on a local Ray cluster with 1 actor
of all CPUs and with one actor per CPU, each into fresh shards. Ray's start-up (cluster and actors) is timed
apart from the scoring; the per-CPU rate of the best Ray run gives the projection for 10^8 images.

    python benchmarks/ray_predict.py --images ../shared/data/flickr_ldl/images [--precision int8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from emolens.predict import Predictor
from emolens.ray_scoring import list_sources, score_with_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=Path("../shared/data/flickr_ldl/images"))
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--shard-size", type=int, default=128)
    args = ap.parse_args()
    sources, _ = list_sources([str(args.images)])
    cpus = os.cpu_count() or 1
    print(f"{len(sources)} images from {args.images}, {cpus} CPUs, precision {args.precision}, "
          f"shards of {args.shard_size}")

    predictor = Predictor(None, precision=args.precision)
    predictor.predict(sources[:32])  # the session's first call, as Ray's actors make theirs before timing
    t0 = time.perf_counter()
    good, _ = predictor.predict(sources)
    local = len(good) / (time.perf_counter() - t0)
    print(f"single process (Predictor): {local:.1f} images/s")

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    started = time.perf_counter() - t0
    rates = {}
    try:
        for actors, actor_cpus in ((1, cpus), (cpus, 1)):
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                first = []
                report = score_with_ray(sources, out, precision=args.precision, actors=actors, actor_cpus=actor_cpus,
                                        shard_size=args.shard_size,
                                        on_shard=lambda n: first.append(time.perf_counter()) if not first else None)
                total = time.perf_counter() - t0
                # the first shard's end includes the actors' start-up; the rate is taken after it
                rate = (report.images - args.shard_size) / (total - (first[0] - t0))
                rates[actors] = rate
                print(f"Ray, {actors} actor(s) x {actor_cpus} CPU(s): {report.images} images in {total:.1f} s "
                      f"({report.images / total:.1f} images/s overall; {rate:.1f} images/s after the first shard: "
                      f"{rate / local:.2f}x the single process)")
    finally:
        ray.shutdown()
    best = max(rates.values())
    per_cpu = best / cpus
    print(f"local Ray cluster start: {started:.1f} s")
    print(f"per-CPU rate {per_cpu:.1f} images/s: 10^8 images take {1e8 / per_cpu / 3600 / 24:.1f} CPU-days; "
          f"on 100 machines of 16 CPUs {1e8 / (per_cpu * 1600) / 3600:.1f} h (decoding included, reading and "
          "writing over a network not)")


if __name__ == "__main__":
    main()

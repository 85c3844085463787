"""Scale of the affective index's vector search: random unit 512-d vectors, exact (flat inner
product) against the approximate index `emolens` switches to (4-bit PQ fast scan + exact
re-ranking of a shortlist), in the same run.

Reports build time, index memory (its serialised size), single-query latency p50/p99 and
recall@10 of the approximate index against exact search, per shortlist factor.

    python benchmarks/index_scale.py --sizes 10000 100000 1000000 [--refine 200 500 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from emolens.retrieval.index import REFINE_FACTOR


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: a float64 draw of 10^6 x 512 would need 4 GB
        chunk = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start:start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def latencies_ms(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q[None], k)
        times.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0])
    return np.array(times), np.array(found)


def main() -> None:
    import faiss

    from emolens.retrieval.index import build_faiss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--refine", type=int, nargs="+", default=[REFINE_FACTOR],
                    help="shortlist factors to measure (the index re-ranks k x this exactly)")
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    for n in args.sizes:
        vectors = unit_vectors(n, args.dim, seed=0)
        queries = unit_vectors(args.queries, args.dim, seed=1)
        ids = np.arange(n, dtype=np.int64)
        t0 = time.perf_counter()
        exact = build_faiss(vectors, ids, approximate_from=n + 1)
        exact_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx = build_faiss(vectors, ids, approximate_from=0)
        approx_build = time.perf_counter() - t0
        exact_ms, truth = latencies_ms(exact, queries, args.k)
        print(f"n={n:>9,}  exact: build {exact_build:7.1f} s, {faiss.serialize_index(exact).nbytes / 2**20:7.0f} MiB, "
              f"p50 {np.percentile(exact_ms, 50):6.2f} ms, p99 {np.percentile(exact_ms, 99):6.2f} ms")
        refine = faiss.downcast_index(approx.index)
        size = faiss.serialize_index(approx).nbytes / 2**20
        for factor in args.refine:
            refine.k_factor = factor
            approx_ms, found = latencies_ms(approx, queries, args.k)
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth)])
            print(f"{'':>12}  PQ fast scan, shortlist {factor} x k: build {approx_build:7.1f} s, {size:7.0f} MiB, "
                  f"p50 {np.percentile(approx_ms, 50):6.2f} ms, p99 {np.percentile(approx_ms, 99):6.2f} ms, "
                  f"recall@{args.k} {recall:.3f}, p50 speed-up over exact "
                  f"{np.percentile(exact_ms, 50) / np.percentile(approx_ms, 50):.1f}x", flush=True)


if __name__ == "__main__":
    main()

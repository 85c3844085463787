"""Scale of the affective index's vector search: random unit 512-d vectors, exact (flat inner
product) against the approximate index `emolens` switches to (4-bit PQ fast scan + exact
re-ranking of a shortlist), in the same run.

Reports build time, index memory (its serialised size), single-query latency p50/p99 and
recall@10 of the approximate index against exact search, per shortlist factor.

    python benchmarks/index_scale.py --sizes 10000 100000 1000000 [--refine 200 500 1000]

``--out-of-core``: the store of indexes built from shards (``emolens.retrieval.large``) instead, on
clustered unit vectors (``--centres`` directions plus noise, as photo embeddings group; uniform noise is
the worst case of any IVF index). Each size is appended a chunk at a time and built in a child process, whose
peak RSS is reported beside the vectors' float32 size; then query latency (single queries, a fresh process
with the files memory-mapped), recall@10 against an exact scan of the float16 rows for a sample of queries,
and the disk used. ``--shard-rows N`` also times ``index --from`` on N synthetic scored rows (SQLite rows,
scores and vectors).

    python benchmarks/index_scale.py --out-of-core --sizes 100000 1000000 10000000 --dim 256 --shard-rows 100000
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


def clustered(n: int, dim: int, seed: int, centres: int, chunk: int = 100_000):
    """Unit vectors around ``centres`` random directions (noise of norm about 0.6), ``chunk`` rows at a time;
    ``centres=0``: uniform on the sphere."""
    if centres == 0:
        for start in range(0, n, chunk):
            yield unit_vectors(min(chunk, n - start), dim, seed + start)
        return
    middle = np.random.default_rng(12345).standard_normal((centres, dim), dtype=np.float32)
    middle /= np.linalg.norm(middle, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = middle[rng.integers(0, centres, m)] + (0.6 / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


class AnonymousPeak:
    """The peak of this process's anonymous memory (RssAnon: what it allocated, not the pages of files it
    maps, which the kernel can drop), sampled every 20 ms while in the ``with`` block."""

    def __enter__(self):
        import threading

        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, anonymous_kib())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, anonymous_kib())


def anonymous_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def build_child(folder: str, n: int, dim: int, centres: int) -> None:
    """In a child process: append ``n`` clustered vectors, then build; seconds and peak anonymous memory of
    each step (the appending includes the generator's own chunks)."""
    from emolens.retrieval.large import OutOfCoreVectors

    t0 = time.perf_counter()
    store = OutOfCoreVectors(folder, dim=dim)
    with AnonymousPeak() as appending:
        for part in clustered(n, dim, 0, centres, chunk=20_000):
            store.append(part)
    appended = time.perf_counter() - t0
    with AnonymousPeak() as building:
        store.finish()
    print(json.dumps({"append_s": appended, "build_s": time.perf_counter() - t0 - appended,
                      "append_anon_mib": appending.peak / 1024, "build_anon_mib": building.peak / 1024,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def query_child(folder: str, n: int, dim: int, centres: int, queries: int, k: int, truth_sample: int) -> None:
    """In a child process: single-query latency, recall@k on a sample against an exact scan, peak RSS."""
    from emolens.retrieval import large

    store = large.OutOfCoreVectors(folder)
    q = next(clustered(queries, dim, 7, centres))
    times, found = [], []
    for v in q:
        t0 = time.perf_counter()
        found.append(store.search(v[None], k)[1][0])
        times.append((time.perf_counter() - t0) * 1000)
    anonymous = anonymous_kib() / 1024
    t0 = time.perf_counter()
    _, exact = store._exact(store.rows(), q[:truth_sample], None, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found[:truth_sample], exact)])
    print(json.dumps({"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
                      "recall": float(recall), "exact_scan_s_per_query": (time.perf_counter() - t0) / truth_sample,
                      "anon_mib": anonymous,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def out_of_core(args) -> None:
    from emolens.retrieval.large import EXACT_UP_TO, NPROBE, REFINE_FACTOR as OOC_REFINE, ivf_lists, pq_bytes

    kind = f"clustered vectors ({args.centres} centres)" if args.centres else "uniform unit vectors"
    print(f"out of core: {args.dim}-d {kind}, exact up to {EXACT_UP_TO:,}, "
          f"IVF-PQ {pq_bytes(args.dim)} B/vector, nprobe {NPROBE}, shortlist {OOC_REFINE} x k")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            me = [sys.executable, __file__, "--dim", str(args.dim), "--centres", str(args.centres)]
            built = json.loads(subprocess.run(me + ["--child-build", tmp, "--sizes", str(n)], check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])
            asked = json.loads(subprocess.run(me + ["--child-query", tmp, "--sizes", str(n), "--queries",
                                                    str(args.queries), "-k", str(args.k)], check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])
            disk = folder_size(Path(tmp)) / 2**30
            print(f"n={n:>11,}: append {built['append_s']:.1f} s, build {built['build_s']:.1f} s with peak anonymous "
                  f"memory {built['build_anon_mib']:.0f} MiB (the float32 vectors: {n * args.dim * 4 / 2**20:.0f} MiB; "
                  f"peak RSS with mapped files {built['peak_rss_mib']:.0f} MiB), disk {disk:.2f} GiB, "
                  f"{'exact' if n <= EXACT_UP_TO else f'IVF {ivf_lists(n)} lists'}; query p50 {asked['p50_ms']:.2f} ms "
                  f"p99 {asked['p99_ms']:.2f} ms, recall@{args.k} {asked['recall']:.3f} ({min(args.queries, 50)} queries "
                  f"against an exact scan), searching process anonymous memory {asked['anon_mib']:.0f} MiB", flush=True)
    if args.shard_rows:
        shards_into_index(args.shard_rows, args.dim)


def shards_into_index(rows: int, dim: int, shard: int = 10_000) -> None:
    """Times ``AffectiveIndex.update_from_shards`` on ``rows`` synthetic scored rows (URIs, no files)."""
    from emolens.retrieval.index import AffectiveIndex
    from emolens.shards import PLAN_FILE, Plan, shard_table, write_shard
    from emolens.predict import Prediction
    from emolens.taxonomy import MIKELS

    classes = list(MIKELS.classes)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        out.mkdir()
        sources = [f"s3://bucket/photos/{i}.jpg" for i in range(rows)]
        (out / PLAN_FILE).write_text(json.dumps(Plan.of(sources, shard, "synthetic").__dict__))
        vectors = clustered(rows, dim, 3, 1000, chunk=shard)
        for index, start in enumerate(range(0, rows, shard)):
            part, results = sources[start:start + shard], {}
            for source, v, d in zip(part, next(vectors), rng.dirichlet(np.ones(8), len(part))):
                results[source] = Prediction(source, classes[int(d.argmax())], float(d.max()), "positive", 0.7,
                                             dict(zip(classes, d.tolist())), float(rng.uniform(-1, 1)),
                                             float(rng.uniform(-1, 1)), outputs={"embedding": v})
            write_shard(shard_table(part, results, {}, classes, dim, "synthetic", "fp32", {"model": "synthetic"}),
                        str(out), index)
        store = AffectiveIndex(Path(tmp) / "db", create=True)
        t0 = time.perf_counter()
        report = store.update_from_shards(str(out))
        seconds = time.perf_counter() - t0
        size = (Path(tmp) / "db" / "index.sqlite").stat().st_size / 2**20
        t0 = time.perf_counter()
        hits = store.search_emotion("awe", 10)
        emotion_ms = (time.perf_counter() - t0) * 1000
        print(f"index --from {rows:,} scored rows: {seconds:.1f} s ({report.added / seconds:,.0f} rows/s), SQLite "
              f"{size:.0f} MiB ({size * 2**20 / rows:.0f} B/row); search by emotion {emotion_ms:.1f} ms "
              f"({len(hits)} hits)")


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
    ap.add_argument("--out-of-core", action="store_true", help="measure the out-of-core store instead")
    ap.add_argument("--centres", type=int, default=10_000, help="with --out-of-core: cluster centres (0: uniform)")
    ap.add_argument("--shard-rows", type=int, default=0, help="with --out-of-core: also time index --from on N rows")
    ap.add_argument("--workdir", help="with --out-of-core: where the stores are built (default: the temp folder)")
    ap.add_argument("--child-build", help=argparse.SUPPRESS)
    ap.add_argument("--child-query", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_build:
        build_child(args.child_build, args.sizes[0], args.dim, args.centres)
        return
    if args.child_query:
        query_child(args.child_query, args.sizes[0], args.dim, args.centres, args.queries, args.k, min(args.queries, 50))
        return
    if args.out_of_core:
        out_of_core(args)
        return
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

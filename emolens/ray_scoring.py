"""Scoring on Ray: the same :class:`~emolens.predict.Predictor` in a pool of actors, writing Parquet shards.

``score_with_ray(sources, out)`` cuts the input list into shards of ``shard_size`` inputs; Ray Data hands the
shards that ``out`` does not hold yet to an actor pool (``map_batches`` with ``ActorPoolStrategy``), and each
actor scores its shard and writes it (:mod:`emolens.shards`), so the driver never holds the results and a
re-run skips finished shards. Inputs are local paths or URIs of any pyarrow file system. Needs the ``ray``
extra (``pip install "emolens[ray]"``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .images import ImageLoadError, scan_images
from .shards import Plan, claim_folder, complete_shards, file_system, is_uri, shard_table, write_shard

DEFAULT_SHARD_SIZE = 10_000
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")


def list_sources(inputs: Sequence[str], column: str = "path") -> tuple[list[str], list[ImageLoadError]]:
    """The images to score, in a stable order: folders scanned (recursively, image names), list files read
    (``.txt``/``.lst``: a path or URI a line; ``.csv``/``.parquet``: the ``column`` of paths or URIs; on any
    pyarrow file system), other paths taken as images. Unreadable inputs come back as errors."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    sources: list[str] = []
    errors: list[ImageLoadError] = []
    local: list[str] = []
    for item in inputs:
        if not str(item).lower().endswith(LIST_SUFFIXES):
            local.append(item)
            continue
        try:
            fs, path = file_system(str(item))
            if str(item).lower().endswith((".txt", ".lst")):
                with fs.open_input_stream(path) as f:
                    sources += [line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip()]
                continue
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=[column]) if str(item).lower().endswith(".parquet") else \
                    pcsv.read_csv(f).select([column])
            sources += [str(v) for v in table.column(column).to_pylist() if v]
        except (OSError, KeyError, ValueError) as e:  # pyarrow's missing-column errors are KeyError/ValueError
            errors.append(ImageLoadError(item, f"cannot read the list: {e}"))
    scan = scan_images(local)
    errors += scan.errors
    # real paths, so that actors on any working directory (or machine with the same mounts) find them, and an
    # index made from the shards stores the path it checks
    return [os.path.realpath(f) for f in scan.files] + [s if is_uri(s) else os.path.realpath(s) for s in sources], errors


def _read_source(source: str, predictor, stamps: dict) -> np.ndarray:
    """One input as a model-ready array: a URI's bytes through its pyarrow file system, else the file, whose
    size and modification time go into ``stamps`` (an index made from the shard checks them before a hit)."""
    if not is_uri(source):
        try:
            st = os.stat(source)
            stamps[source] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass  # prepare() says what is wrong with it
        return predictor.prepare(source)
    try:
        fs, path = file_system(source)
        with fs.open_input_stream(path) as f:
            data = f.read()
    except OSError as e:
        raise ImageLoadError(source, f"cannot read: {e}") from e
    return predictor.prepare(data)


class ShardScorer:
    """A Ray actor: one :class:`Predictor`; each call scores whole shards and writes them to ``out``."""

    def __init__(self, model: str | None, precision: str, batch_size: int, out: str, threads: int,
                 device: str = "cpu"):
        from .predict import Predictor

        self.predictor = Predictor(model, batch_size=batch_size, threads=threads, keep=("embedding",),
                                   device=device, precision=precision)
        self.out, self.threads = out, threads
        self.classes = self.predictor.taxonomy.classes
        size = self.predictor.preprocessing.size
        self.dim = int(self.predictor.run(np.zeros((1, 3, size, size), np.float32))["embedding"].shape[1])

    def _decode(self, source: str, stamps: dict):
        try:
            return _read_source(source, self.predictor, stamps)
        except ImageLoadError as e:
            return e

    def __call__(self, batch: dict) -> dict:
        done = {"shard": [], "rows": [], "errors": [], "seconds": []}
        for index, listed in zip(batch["shard"], batch["sources"]):
            t0 = time.perf_counter()
            sources = json.loads(listed)
            stamps: dict = {}
            with ThreadPoolExecutor(max(1, self.threads)) as pool:
                decoded = list(pool.map(lambda source: self._decode(source, stamps), sources))
            results = {r.source: r for r in self.predictor.predict_prepared(sources, decoded)}
            table = shard_table(sources, results, stamps, self.classes, self.dim, self.predictor.identity.digest,
                                self.predictor.precision, {"model": str(self.predictor.identity)})
            write_shard(table, self.out, int(index))
            done["shard"].append(int(index))
            done["rows"].append(len(sources))
            done["errors"].append(sum(isinstance(d, ImageLoadError) for d in decoded))
            done["seconds"].append(time.perf_counter() - t0)
        return {k: np.array(v) for k, v in done.items()}


@dataclass
class RayReport:
    shards: int  # in the plan
    skipped: int  # complete before this run
    scored: int  # shards this run wrote
    images: int  # inputs in the shards this run wrote
    failed: int  # of those, inputs that could not be scored (rows with an error)
    seconds: float
    errors: list[ImageLoadError] = field(default_factory=list)  # inputs that could not be listed


def score_with_ray(sources: Sequence[str], out: str, model: str | None = None, precision: str = "fp32",
                   address: str | None = None, actors: int | None = None, actor_cpus: int = 1,
                   batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE, device: str = "cpu",
                   on_shard=None) -> RayReport:
    """Score ``sources`` into Parquet shards in ``out`` on Ray (a local cluster when ``address`` is None),
    ``actors`` actors of ``actor_cpus`` CPUs each (default: as many as the cluster's CPUs allow; one GPU
    each on ``device="cuda"``); shards already in ``out`` are skipped."""
    import ray

    from .predict import Predictor

    t0 = time.perf_counter()
    identity = Predictor(model, precision=precision, device=device, backend="auto").identity
    plan = Plan.of(list(sources), shard_size, identity.digest)
    out = _absolute(out)
    claim_folder(out, plan)
    held = complete_shards(out)
    pending = [i for i in range(plan.shards) if i not in held]
    report = RayReport(plan.shards, len(held), 0, 0, 0, 0.0)
    if not pending:
        report.seconds = time.perf_counter() - t0
        return report
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    try:
        gpus = 1 if device.startswith("cuda") else 0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = actors or max(1, cpus // actor_cpus)
        count = min(count, len(pending))
        shards = ray.data.from_items([{"shard": i, "sources": json.dumps(list(sources[i * shard_size:(i + 1) * shard_size]))}
                                      for i in pending], override_num_blocks=len(pending))
        # Ray's core worker logs one error line per actor here ("constructor arguments in the object store"):
        # a known false alarm of Ray Data's own actor wrapper (ray-project/ray#57733), not of these arguments.
        scored = shards.map_batches(
            ShardScorer, batch_size=1, num_cpus=actor_cpus, num_gpus=gpus, compute=ray.data.ActorPoolStrategy(size=count),
            fn_constructor_kwargs={"model": None if model is None else _absolute(str(model)), "precision": precision,
                                   "batch_size": batch_size, "out": out, "threads": actor_cpus, "device": device})
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        for row in scored.iter_rows():
            report.scored += 1
            report.images += int(row["rows"])
            report.failed += int(row["errors"])
            if on_shard:
                on_shard(int(row["rows"]))
    finally:
        if started:
            ray.shutdown()
    report.seconds = time.perf_counter() - t0
    return report


def _absolute(where: str) -> str:
    return where if is_uri(where) or where == "default" else os.path.abspath(where)

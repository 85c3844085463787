"""Scored shards: one Parquet file of predictions per slice of an input list, on any pyarrow file system.

A shard holds a row per input, in input order: ``path``, ``size`` and ``mtime_ns`` of a local file when it was
read (null for a URI), ``model_id``, ``precision``, ``emotion``,
``probability``, ``polarity``, ``positive_probability``, ``distribution`` and ``embedding`` (fixed-size
lists of float32; the classes are in the schema's metadata), ``valence``, ``arousal`` (null where the
model rates none), and ``error`` (the reason an input could not be scored; its other fields null). A shard
file appears whole or not at all (written beside, then renamed), so a folder's complete shards are the
files it holds. ``emolens predict --engine ray`` writes them; ``emolens index --from`` reads them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

SHARD_PATTERN = "part-{:06d}.parquet"
PLAN_FILE = "_plan.json"


def is_uri(where: str) -> bool:
    """Whether ``where`` names a place on a pyarrow file system by URI (``s3://...``) rather than a local path."""
    return "://" in str(where)


def file_system(where: str):
    """``(pyarrow file system, path in it)`` for a local path or a URI (``s3://``, ``gs://``, ``file://``...)."""
    import os

    from pyarrow import fs

    if is_uri(where):
        return fs.FileSystem.from_uri(where)
    return fs.LocalFileSystem(), os.path.abspath(where)


def shard_schema(classes: Sequence[str], dim: int, meta: dict):
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("model_id", pa.string()), ("precision", pa.string()), ("emotion", pa.string()),
        ("probability", pa.float32()), ("polarity", pa.string()), ("positive_probability", pa.float32()),
        ("distribution", pa.list_(pa.float32(), len(classes))), ("valence", pa.float32()), ("arousal", pa.float32()),
        ("embedding", pa.list_(pa.float32(), dim)), ("error", pa.string()),
    ], metadata={"emolens": json.dumps({"classes": list(classes), **meta})})


def shard_table(sources: Sequence[str], results: dict, stamps: dict, classes: Sequence[str], dim: int, model_id: str,
                precision: str, meta: dict):
    """The Parquet table of ``sources`` (in order) from ``results`` (source -> Prediction or PredictionError)
    and ``stamps`` (source -> (size, mtime_ns) of the local file read; absent for a URI)."""
    import pyarrow as pa

    from .predict import Prediction

    columns: dict[str, list] = {name: [] for name in shard_schema(classes, dim, meta).names}
    for source in sources:
        r = results[source]
        ok = isinstance(r, Prediction)
        size, mtime_ns = stamps.get(source, (None, None))
        row = {"path": source, "size": size, "mtime_ns": mtime_ns, "model_id": model_id, "precision": precision,
               "emotion": r.emotion if ok else None, "probability": r.probability if ok else None,
               "polarity": r.polarity if ok else None, "positive_probability": r.positive_probability if ok else None,
               "distribution": [r.distribution[c] for c in classes] if ok else None,
               "valence": r.valence if ok else None, "arousal": r.arousal if ok else None,
               "embedding": np.asarray(r.outputs["embedding"], np.float32).tolist() if ok else None,
               "error": None if ok else r.reason}
        for name, value in row.items():
            columns[name].append(value)
    return pa.table(columns, schema=shard_schema(classes, dim, meta))


def write_shard(table, folder: str, index: int) -> None:
    """Write shard ``index`` into ``folder`` whole: to a temporary name beside it, then renamed."""
    import pyarrow.parquet as pq

    fs, root = file_system(folder)
    final = f"{root}/{SHARD_PATTERN.format(index)}"
    partial = f"{root}/.{SHARD_PATTERN.format(index)}.{uuid.uuid4().hex}.partial"
    pq.write_table(table, partial, filesystem=fs)
    fs.move(partial, final)


def complete_shards(folder: str) -> set[int]:
    """The indices of the shards ``folder`` holds."""
    from pyarrow import fs as pafs

    fs, root = file_system(folder)
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    done = set()
    for info in found:
        name = info.base_name
        if info.type == pafs.FileType.File and name.startswith("part-") and name.endswith(".parquet"):
            done.add(int(name[5:-8]))
    return done


@dataclass
class Plan:
    """What a folder of shards is the result of: the input list (its digest), the shard size, the model."""

    sources: int
    sources_sha256: str
    shard_size: int
    model_id: str

    @classmethod
    def of(cls, sources: Sequence[str], shard_size: int, model_id: str) -> "Plan":
        digest = hashlib.sha256("\n".join(sources).encode("utf-8", "surrogateescape")).hexdigest()
        return cls(len(sources), digest, shard_size, model_id)

    @property
    def shards(self) -> int:
        return -(-self.sources // self.shard_size)


def claim_folder(folder: str, plan: Plan) -> None:
    """Record ``plan`` in ``folder``, or refuse a folder holding the shards of another plan."""
    fs, root = file_system(folder)
    fs.create_dir(root, recursive=True)
    path = f"{root}/{PLAN_FILE}"
    try:
        with fs.open_input_stream(path) as f:
            held = json.loads(f.read().decode())
    except FileNotFoundError:
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(plan.__dict__, indent=2).encode())
        return
    if held != plan.__dict__:
        what = [k for k in plan.__dict__ if held.get(k) != plan.__dict__[k]]
        raise ValueError(f"{folder} holds the shards of another run (different {', '.join(what)}); score into a "
                         "new folder, or give the same inputs, model and shard size to resume")


def read_shards(folder: str, columns: Sequence[str] | None = None) -> Iterator[tuple[int, object]]:
    """``(index, pyarrow table)`` of each complete shard of ``folder``, in index order, one at a time."""
    import pyarrow.parquet as pq

    fs, root = file_system(folder)
    for index in sorted(complete_shards(folder)):
        yield index, pq.read_table(f"{root}/{SHARD_PATTERN.format(index)}", filesystem=fs,
                                   columns=list(columns) if columns else None)


def shard_meta(folder: str) -> dict:
    """The emolens metadata (classes, model) of ``folder``'s first shard; {} where it holds none."""
    import pyarrow.parquet as pq

    fs, root = file_system(folder)
    done = sorted(complete_shards(folder))
    if not done:
        return {}
    schema = pq.read_schema(f"{root}/{SHARD_PATTERN.format(done[0])}", filesystem=fs)
    return json.loads(schema.metadata[b"emolens"])

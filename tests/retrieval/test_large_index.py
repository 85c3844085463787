"""Out-of-core vectors: exact below the threshold, IVF-PQ on on-disk lists above, extended in place, memory bounded."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from emolens.retrieval import large
from emolens.retrieval.large import OutOfCoreVectors


def clustered(n: int, dim: int, seed: int = 0, centres: int = 1000) -> np.ndarray:
    """Unit vectors around ``centres`` directions, as embeddings of photos are (not uniform noise)."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    x = middle[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(found: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :k] + 1
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)]))


def test_below_the_threshold_search_is_exact(tmp_path):
    x = clustered(3000, 32)
    store = OutOfCoreVectors(tmp_path, dim=32)
    store.append(x)
    store.finish()
    scores, ids = store.search(x[:20], 5)
    assert (ids[:, 0] == np.arange(1, 21)).all() and recall(ids, x, x[:20], 5) == 1.0
    assert not (tmp_path / "ivf").exists()
    _, few = store.search(x[:1], 4000)  # more than it holds: padded as FAISS pads
    assert (few[0, 3000:] == -1).all()


def test_above_the_threshold_an_ivf_index_on_disk_is_filled_and_extended(tmp_path, monkeypatch):
    monkeypatch.setattr(large, "EXACT_UP_TO", 5000)
    monkeypatch.setattr(large, "CHUNK", 4000)
    x = clustered(20_000, 64)
    store = OutOfCoreVectors(tmp_path, dim=64)
    store.append(x[:9000])
    store.finish()
    assert store.partials == {0: 4000, 1: 4000, 2: 1000}
    made = (tmp_path / "ivf" / "part-000000.index").stat().st_mtime_ns
    store.append(x[9000:])
    store.finish()  # only the partly filled last chunk and the new ones are made
    assert store.partials == {0: 4000, 1: 4000, 2: 4000, 3: 4000, 4: 4000}
    assert (tmp_path / "ivf" / "part-000000.index").stat().st_mtime_ns == made and len(list((tmp_path / "ivf").glob("lists-*.ivfdata"))) == 1
    reopened = OutOfCoreVectors(tmp_path)
    queries = x[::500] + 0.05 * np.random.default_rng(1).normal(size=(40, 64)).astype(np.float32)
    _, ids = reopened.search(queries, 10)
    assert recall(ids, x, queries, 10) >= 0.95
    reopened.truncate(19_000)
    assert reopened.count == 19_000


def test_building_keeps_to_a_chunk_of_memory(tmp_path, monkeypatch):
    """600,000 64-d vectors are 154 MB as float32; building their index holds a chunk and the training sample."""
    monkeypatch.setattr(large, "CHUNK", 50_000)
    store = OutOfCoreVectors(tmp_path, dim=64)
    for part in range(12):
        store.append(clustered(50_000, 64, seed=part))
    tracemalloc.start()
    store.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.count == 600_000 and (tmp_path / "ivf" / "merged.index").is_file()
    sample = large.ivf_lists(600_000) * large.TRAINING_PER_LIST * 64 * 4
    assert peak < sample + 4 * large.CHUNK * 64 * 4, f"peak {peak / 2**20:.0f} MiB"
    assert peak < 600_000 * 64 * 4 / 2

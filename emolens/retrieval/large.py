"""Vectors kept out of core: float16 rows in a memory-mapped file, an IVF-PQ index on FAISS's on-disk lists.

For indexes built from scored shards (``emolens index --from``), which may hold far more vectors than RAM.
``vectors.f16`` holds one float16 row per image, row ``id - 1`` for image ``id``, appended shard by shard.
Up to ``EXACT_UP_TO`` rows a search scans that file exactly, a chunk at a time. Above, an IVF-PQ index
(``IVF_LISTS`` lists, ``PQ_BYTES`` bytes per vector) trained once on a sample is filled a chunk at a time:
each chunk's codes go to a partial index on disk, and the partials are merged into FAISS's on-disk inverted
lists (``faiss.contrib.ondisk``); a search probes ``NPROBE`` lists and re-ranks its shortlist exactly from the
float16 rows. Memory stays bounded by a chunk while building and by the coarse centroids while searching
(the lists and rows are memory-mapped). Extending appends rows and adds only the new chunks' partials.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

EXACT_UP_TO = 100_000
CHUNK = 100_000  # rows per partial index, and per step of an exact scan
IVF_LISTS_MAX = 4096
TRAINING_PER_LIST = 40
NPROBE = 64
#: Shortlist = k x this, re-ranked exactly from the float16 rows.
REFINE_FACTOR = 100


def ivf_lists(count: int) -> int:
    """Coarse lists for ``count`` vectors: about 4 sqrt(N), at most ``IVF_LISTS_MAX``."""
    return int(min(IVF_LISTS_MAX, max(16, 4 * np.sqrt(count))))


def pq_bytes(dim: int) -> int:
    """Bytes of a vector's PQ code: one 8-bit code per 8 dimensions (fewer where ``dim`` does not split so)."""
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m >= 1 and dim % m == 0:
            return m
    return dim


class OutOfCoreVectors:
    """The vectors of an index folder: ``append`` float rows, ``finish`` after a build, ``search`` like FAISS."""

    def __init__(self, folder: str | os.PathLike, dim: int | None = None):
        self.folder = Path(folder)
        self.rows_path = self.folder / "vectors.f16"
        self.ivf_dir = self.folder / "ivf"
        self.state_path = self.folder / "vectors.json"
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.dim = state.get("dim", dim)
        if self.dim is None:
            raise ValueError(f"{self.folder}: no out-of-core vectors here")
        #: chunk number -> the rows its partial index on disk holds
        self.partials: dict[int, int] = {int(k): v for k, v in state.get("partials", {}).items()}
        self._index = None

    @property
    def count(self) -> int:
        return self.rows_path.stat().st_size // (2 * self.dim) if self.rows_path.is_file() else 0

    def rows(self) -> np.ndarray:
        return np.memmap(self.rows_path, dtype=np.float16, mode="r", shape=(self.count, self.dim))

    def append(self, vectors: np.ndarray) -> None:
        """Add unit rows (in id order) at the end of the file, flushed to disk."""
        with open(self.rows_path, "ab") as f:
            f.write(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def truncate(self, count: int) -> None:
        """Drop rows past ``count`` (an interrupted build's, whose rows never reached SQLite)."""
        if self.count > count:
            with open(self.rows_path, "r+b") as f:
                f.truncate(count * 2 * self.dim)

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dim": self.dim, "partials": self.partials}))
        os.replace(tmp, self.state_path)

    def finish(self) -> None:
        """Bring the IVF-PQ index in line with the rows (none needed up to ``EXACT_UP_TO`` rows)."""
        from ..runtime import native_output_discarded

        with native_output_discarded():  # FAISS prints each resize of the on-disk lists to stdout
            self._finish()

    def _finish(self) -> None:
        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        count = self.count
        self._save_state()
        if count <= EXACT_UP_TO:
            return
        self.ivf_dir.mkdir(exist_ok=True)
        trained_path = self.ivf_dir / "trained.index"
        if not trained_path.is_file():  # trained once, on a sample of the rows there are now
            nlist = ivf_lists(count)
            sample = np.sort(np.random.default_rng(0).choice(count, min(count, nlist * TRAINING_PER_LIST),
                                                             replace=False))
            rows = self.rows()
            train = np.concatenate([rows[sample[s:s + CHUNK]] for s in range(0, len(sample), CHUNK)]).astype(np.float32)
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, pq_bytes(self.dim), 8, faiss.METRIC_INNER_PRODUCT)
            index.train(train)
            faiss.write_index(index, str(trained_path))
            self.partials = {}
        chunks = -(-count // CHUNK)
        for chunk in range(chunks):
            start, stop = chunk * CHUNK, min(count, (chunk + 1) * CHUNK)
            # A chunk that was the last, partly filled one when its index was made is made again.
            if self.partials.get(chunk) == stop - start and (self.ivf_dir / f"part-{chunk:06d}.index").is_file():
                continue
            index = faiss.read_index(str(trained_path))
            index.add_with_ids(np.asarray(self.rows()[start:stop], dtype=np.float32),
                               np.arange(start + 1, stop + 1, dtype=np.int64))
            faiss.write_index(index, str(self.ivf_dir / f"part-{chunk:06d}.index"))
            self.partials[chunk] = stop - start
        self.partials = {c: n for c, n in self.partials.items() if c < chunks}
        merged = faiss.read_index(str(trained_path))
        # A new lists file each time, named in the merged index, which replaces the old one in one rename: a
        # search never meets lists that do not match its index (one that has the old file open keeps it).
        old = sorted(self.ivf_dir.glob("lists-*.ivfdata"))
        lists = self.ivf_dir / f"lists-{len(old) and int(old[-1].stem[6:]) + 1:06d}.ivfdata"
        merge_ondisk(merged, [str(self.ivf_dir / f"part-{c:06d}.index") for c in sorted(self.partials)], str(lists))
        faiss.write_index(merged, str(self.ivf_dir / "merged.index.tmp"))
        os.replace(self.ivf_dir / "merged.index.tmp", self.ivf_dir / "merged.index")
        for stale in old:
            stale.unlink()
        self._save_state()
        self._index = None

    def _flat(self, rows: np.ndarray):
        """Exact search of a small store: its rows as float32 in memory (at most ``EXACT_UP_TO`` of them)."""
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatIP(self.dim)
            for s in range(0, len(rows), CHUNK):
                self._index.add(np.asarray(rows[s:s + CHUNK], dtype=np.float32))
        return self._index

    def _ivf(self):
        import faiss

        if self._index is None:
            # The on-disk lists map their own file (its path as written at build time) rather than load it.
            self._index = faiss.read_index(str(self.ivf_dir / "merged.index"))
            faiss.extract_index_ivf(self._index).nprobe = NPROBE
        return self._index

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` rows with the largest inner product with each query (as FAISS's
        ``Index.search``; ids are image ids, -1 past the end)."""
        query = np.asarray(query, dtype=np.float32).reshape(-1, self.dim)
        count = self.count
        rows = self.rows()
        if count <= EXACT_UP_TO or not (self.ivf_dir / "merged.index").is_file():
            scores, ids = self._flat(rows).search(query, k)
            return scores, np.where(ids >= 0, ids + 1, -1)
        _, candidates = self._ivf().search(query, min(count, k * REFINE_FACTOR))
        scores, ids = [], []
        for q, found in zip(query, candidates):
            found = np.sort(found[found >= 0] - 1)  # rows, read in file order
            s, i = self._exact(rows, q[None], found, k)
            scores.append(s[0])
            ids.append(i[0])
        return np.stack(scores), np.stack(ids)

    @staticmethod
    def _exact(rows: np.ndarray, query: np.ndarray, which: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of ``which`` rows (sorted row numbers; None: every row) by inner product, as ids."""
        count = len(rows) if which is None else len(which)
        best_scores = np.full((len(query), 0), -np.inf, np.float32)
        best_rows = np.zeros((len(query), 0), np.int64)
        for s in range(0, count, CHUNK):
            part = np.arange(s, min(count, s + CHUNK)) if which is None else which[s:s + CHUNK]
            block = rows[s:s + CHUNK] if which is None else rows[part]  # a slice reads the file in order
            scores = np.asarray(block, dtype=np.float32) @ query.T  # (chunk, queries)
            best_scores = np.concatenate([best_scores, scores.T], axis=1)
            best_rows = np.concatenate([best_rows, np.broadcast_to(part, (len(query), len(part)))], axis=1)
            if best_scores.shape[1] > k:
                keep = np.argpartition(-best_scores, k, axis=1)[:, :k]
                best_scores = np.take_along_axis(best_scores, keep, 1)
                best_rows = np.take_along_axis(best_rows, keep, 1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        best_scores, best_rows = np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)
        pad = k - best_scores.shape[1]
        if pad > 0:
            best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            best_rows = np.pad(best_rows, ((0, 0), (0, pad)), constant_values=-2)
        return best_scores, best_rows + 1

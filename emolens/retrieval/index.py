"""A persistent affective image index: SQLite holds the truth, FAISS the fast copy.

``INDEX_DIR/index.sqlite`` keeps one row per image (its real path, inside the folders given to ``index``;
the file's identity: device, inode, size, modification and change times; predicted emotion, polarity,
distribution, valence and arousal where the model rates them, the L2-normalised embedding) plus the
model that made them; every batch is one transaction, so a killed ``index`` run loses at most the batch
in flight and a re-run skips what is done. A search returns only rows whose file is still the one
indexed (a rewrite in place changes the change time, even with size and modification time restored);
the others wait for the next ``index`` run. ``INDEX_DIR/vectors.faiss`` is rebuilt from SQLite whenever the rows changed (written
to a temporary file and renamed): exact inner-product search below ``APPROXIMATE_FROM`` images;
above, a 4-bit product-quantisation fast scan shortlists candidates that exact inner products re-rank.
Re-running ``index`` embeds new and changed files and drops deleted ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import stat
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..identity import ModelIdentity
from ..images import ImageLoadError, scan_images
from ..predict import Prediction, PredictionError, Predictor
from ..shards import is_uri
from ..storage import atomic_write
from .large import OutOfCoreVectors

#: From this many images on, search scans compressed codes and re-ranks a shortlist exactly.
APPROXIMATE_FROM = 50_000
#: Shortlist = k x this, re-ranked exactly. Random unit 512-d vectors, 10^6: recall@10 0.96 at 500, 0.99 at 1000;
#: the re-ranking costs little beside the scan (benchmarks/index_scale.py).
REFINE_FACTOR = 1000
PQ_DIMS_PER_CODE = 4  # 4 dimensions per 4-bit code: d/4 codes, d/8 bytes per vector
PQ_TRAINING_SAMPLE = 65_536

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    emotion TEXT NOT NULL,
    probability REAL NOT NULL,
    polarity TEXT,
    distribution TEXT NOT NULL,
    embedding BLOB NOT NULL,
    device INTEGER,
    inode INTEGER,
    valence REAL,
    arousal REAL,
    ctime_ns INTEGER
);
CREATE TABLE IF NOT EXISTS scores (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    emotion TEXT NOT NULL,
    probability REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scores_by_emotion ON scores (emotion, probability DESC);
CREATE INDEX IF NOT EXISTS scores_by_image ON scores (image_id);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT,
                                     device INTEGER, inode INTEGER, ctime_ns INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


#: The tables every index has; columns added since the first release, which older indexes gain on opening.
TABLES = ("images", "scores", "failures", "meta")
ADDED_COLUMNS = {"images": (("device", "INTEGER"), ("inode", "INTEGER"), ("valence", "REAL"), ("arousal", "REAL"),
                            ("ctime_ns", "INTEGER")),
                 "failures": (("device", "INTEGER"), ("inode", "INTEGER"), ("ctime_ns", "INTEGER"))}


#: The columns that identify a file: a rewrite in place changes at least the change time.
IDENTITY = "device, inode, size, mtime_ns, ctime_ns"


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def is_indexed_file(path: str, identity: Sequence) -> bool:
    """Whether ``path`` is still the regular file that was indexed there: reached by no link (the real path
    is the path), with the same identity."""
    try:
        return os.path.realpath(path) == path and is_indexed_file_stat(os.lstat(path), identity)
    except (OSError, ValueError):
        return False


def is_indexed_file_stat(st: os.stat_result, identity: Sequence) -> bool:
    """Whether ``st`` is a regular file of the indexed ``identity`` (a change time that an older index did
    not record is not compared)."""
    return stat.S_ISREG(st.st_mode) and all(
        stored is None or stored == now for stored, now in zip(identity, file_identity(st)))


class AffectiveIndexError(Exception):
    """An index folder that cannot be used (missing, made by another model, corrupt)."""


@dataclass
class Hit:
    id: int
    path: str
    score: float
    emotion: str
    probability: float
    polarity: str | None
    distribution: dict[str, float]
    valence: float | None = None
    arousal: float | None = None


@dataclass(frozen=True)
class AffectRange:
    """A closed interval of valence or arousal on the common scale [-1, 1]; ``parse("0.2:1")``."""

    low: float
    high: float

    def __post_init__(self):
        if not -1 <= self.low <= self.high <= 1:
            raise ValueError(f"a range must lie in [-1, 1] with low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, text: str) -> "AffectRange":
        low, sep, high = text.partition(":")
        try:
            return cls(float(low) if low.strip() else -1.0, float(high) if high.strip() else 1.0) if sep else cls(
                *(2 * [float(text)]))
        except ValueError as e:
            raise ValueError(f"cannot read {text!r} as a range LOW:HIGH on [-1, 1] ({e})") from None

    @property
    def centre(self) -> float:
        return (self.low + self.high) / 2


@dataclass(frozen=True)
class AffectFilter:
    """Valence and/or arousal ranges a search keeps to (``None``: that dimension is free)."""

    valence: AffectRange | None = None
    arousal: AffectRange | None = None

    @classmethod
    def parse(cls, valence: str | None = None, arousal: str | None = None) -> "AffectFilter":
        """From ``LOW:HIGH`` texts (``None``: that dimension is free); ``ValueError`` names a bad one."""
        return cls(*(None if text is None else AffectRange.parse(text) for text in (valence, arousal)))

    def __bool__(self) -> bool:
        return self.valence is not None or self.arousal is not None

    def ranges(self) -> list[tuple[str, AffectRange]]:
        return [(name, r) for name, r in (("valence", self.valence), ("arousal", self.arousal)) if r is not None]

    def where(self, table: str = "images") -> tuple[str, list[float]]:
        """An SQL condition on ``table``'s rows and its parameters."""
        clauses = [f"{table}.{name} BETWEEN ? AND ?" for name, _ in self.ranges()]
        return " AND ".join(clauses) or "1", [v for _, r in self.ranges() for v in (r.low, r.high)]


@dataclass
class ImageRow:
    path: str
    identity: tuple  # (device, inode, size, mtime_ns, ctime_ns) of the file when it was indexed


@dataclass
class IndexReport:
    added: int
    updated: int
    removed: int
    unchanged: int
    failed: list[PredictionError]
    total: int
    repaired: int = 0  # rows whose emotion scores were missing and were rewritten from the row
    skipped: list[ImageLoadError] = field(default_factory=list)  # files the scan passed over: not image names


@dataclass
class ShardReport:
    shards: int  # taken in this run
    skipped: int  # taken before
    added: int  # rows added
    failed: int  # rows the shards hold with an error (never scored)
    total: int = 0


def built_with(folder: str | os.PathLike) -> ModelIdentity | None:
    """The model the index in ``folder`` was built with; None where there is no index yet or it records none."""
    try:
        store = AffectiveIndex(folder)
    except AffectiveIndexError:
        return None
    try:
        return store.model
    finally:
        store.close()


class AffectiveIndex:
    """``AffectiveIndex(folder)``: ``update(paths, predictor)`` embeds, ``search(...)`` ranks."""

    def __init__(self, folder: str | os.PathLike, create: bool = False):
        """Open the index in ``folder``; ``create`` (the ``index`` command) makes it, or the tables it lacks.
        Without ``create`` nothing is written to a broken index: it is refused with the way to rebuild it."""
        self.folder = Path(folder)
        self.db_path = self.folder / "index.sqlite"
        self.faiss_path = self.folder / "vectors.faiss"
        rebuild = f"`emolens index PATHS --db {self.folder}`"
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise AffectiveIndexError(f"{self.folder}: not a folder (an index is a folder)")
        if not create and not self.db_path.is_file():
            raise AffectiveIndexError(f"{self.folder}: no index here (run `emolens index DIR --db {self.folder}` first)")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            # Usable from the thread a server runs it on; callers keep to one operation at a time.
            self.db = sqlite3.connect(self.db_path, check_same_thread=False)
            found = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in TABLES if t not in found]
            if missing and not create:
                what = "it holds no index (an empty database)" if len(missing) == len(TABLES) else \
                    f"table(s) {', '.join(missing)} missing"
                raise AffectiveIndexError(f"{self.db_path}: the index is broken: {what}; run {rebuild} again to "
                                          "repair it")
            self.db.execute("PRAGMA foreign_keys = ON")
            if create:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.executescript(SCHEMA)
            for table, added in ADDED_COLUMNS.items():  # indexes made by an earlier emolens
                columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                for column, kind in added:
                    if column not in columns:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as e:  # locked, read-only, unopenable
            raise AffectiveIndexError(f"{self.db_path}: cannot open the index ({e})") from e
        except sqlite3.DatabaseError as e:
            raise AffectiveIndexError(f"{self.db_path}: not an emolens index ({e}): the index is broken; move "
                                      f"{self.folder} away (or choose another --db) and run {rebuild} to rebuild "
                                      "it") from e
        self._faiss, self._faiss_generation = None, None

    def close(self) -> None:
        self.db.close()

    # --- metadata ---------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def classes(self) -> list[str]:
        return json.loads(self._meta("classes") or "[]")

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    @property
    def model(self) -> ModelIdentity | None:
        """The model whose predictions and embeddings the index holds (None: none stored yet)."""
        digest = self._meta("model_id")
        return None if digest is None else ModelIdentity(digest, self._meta("model_name") or "?")

    def check_model(self, predictor: Predictor) -> None:
        """Refuse a model other than the one that built the index: their embeddings and predictions do not mix."""
        built_by = self.model
        if built_by is None and self._meta("model") is not None:
            raise AffectiveIndexError(f"{self.folder} was built by an earlier emolens that did not record its model's "
                                      f"weights; index into a new folder with {predictor.identity}")
        if built_by is not None and built_by.digest != predictor.identity.digest:
            raise AffectiveIndexError(f"{self.folder} was built with {built_by}, not with {predictor.identity}: "
                                      "use the model that built it, or index into a new folder")

    # --- building ---------------------------------------------------------------------------------

    def update(self, paths: Sequence[str | os.PathLike], predictor: Predictor,
               on_batch: Callable[[int], None] | None = None) -> IndexReport:
        """Bring the index in line with ``paths`` (folders are scanned): embed new and changed files,
        drop the ones that vanished from under ``paths``; bad files are recorded and reported, never fatal."""
        self.check_model(predictor)
        if self.out_of_core:
            raise AffectiveIndexError(f"{self.folder} was built from scored shards; extend it with `emolens index "
                                      f"--from SHARDS --db {self.folder}` (score new images with `emolens predict "
                                      "--engine ray`)")
        if "embedding" not in predictor.keep:
            raise ValueError("the predictor must keep the 'embedding' output")
        with self.db:
            self._set_meta("model_id", predictor.identity.digest)
            self._set_meta("model_name", predictor.identity.name)
            self._set_meta("classes", json.dumps(predictor.taxonomy.classes))
        scan = scan_images(paths)
        failures = [PredictionError(e.path, e.reason) for e in scan.errors]
        roots = [Path(os.path.realpath(p)) for p in paths]
        current: dict[str, tuple] = {}  # real path -> the file's identity now
        for f in scan.files:
            try:  # a dangling or looping link is listed by the scan but cannot be opened
                real = Path(os.path.realpath(f))
                if not any(real.is_relative_to(root) for root in roots):
                    failures.append(PredictionError(str(f), "a link to a file outside the indexed folders (skipped)"))
                    continue
                st = os.stat(real)
            except (OSError, RuntimeError) as e:
                failures.append(PredictionError(str(f), f"cannot access file: {getattr(e, 'strerror', None) or e}"))
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO, device or socket named like a photo: never opened
                failures.append(PredictionError(str(f), "not a regular file"))
                continue
            current[str(real)] = file_identity(st)
        rows = {_from_db(p): tuple(stamp) for p, *stamp in self.db.execute(f"SELECT path, {IDENTITY} FROM images")}
        failed_before = {_from_db(p): tuple(stamp) for p, *stamp in
                         self.db.execute(f"SELECT path, {IDENTITY} FROM failures")}
        # Only files under the roots given this time can have vanished; other indexed folders stay.
        gone = [p for p in rows if p not in current and any(Path(p).is_relative_to(r) for r in roots)]
        todo = sorted(p for p, stamp in current.items() if rows.get(p) != stamp and failed_before.get(p) != stamp)
        added = updated = 0
        with self.db:
            self.db.executemany("DELETE FROM images WHERE path = ?", [(_to_db(p),) for p in gone])
            self.db.executemany("DELETE FROM failures WHERE path = ?",
                                [(_to_db(p),) for p in failed_before if p not in current])
            if gone:
                self._bump()
            repaired = self._repair_scores()
        for results in predictor.predict_iter(todo):
            with self.db:  # one transaction per batch: a kill loses at most this batch
                self._bump()
                for r in results:
                    if isinstance(r, Prediction):
                        self._store(r, current[r.source])
                        updated += r.source in rows
                        added += r.source not in rows
                    else:
                        failures.append(r)
                        self.db.execute(f"INSERT OR REPLACE INTO failures (path, reason, {IDENTITY}) "
                                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (_to_db(r.source), r.reason, *current[r.source]))
            if on_batch:
                on_batch(len(results))
        failures += [PredictionError(p, reason) for p, reason in
                     ((_from_db(p), r) for p, r in self.db.execute("SELECT path, reason FROM failures"))
                     if p in current and p not in todo]
        if self._meta("vectors_for") != (self._meta("generation") or "0") or not self.faiss_path.is_file():
            self.rebuild_vectors()  # searches check the file itself (hash) when they load it
        unchanged = sum(p in rows for p in current if p not in todo)  # failing files stay failures, not "unchanged"
        return IndexReport(added, updated, len(gone), unchanged, failures, len(self), repaired, scan.skipped)

    @property
    def out_of_core(self) -> bool:
        """Whether the vectors live out of core (:mod:`emolens.retrieval.large`): an index built from shards."""
        return self._meta("vectors") == "out_of_core"

    def update_from_shards(self, folder: str, on_shard: Callable[[int], None] | None = None) -> ShardReport:
        """Add the rows of the scored shards in ``folder`` (:mod:`emolens.shards`) without scoring anything:
        one transaction per shard, each shard once; paths already indexed and rows with an error are left
        out. The vectors go to the out-of-core store, whose IVF-PQ index is brought up to date at the end."""
        from ..shards import PLAN_FILE, file_system, read_shards, shard_meta

        meta = shard_meta(folder)
        if not meta:
            raise AffectiveIndexError(f"{folder}: no scored shards here (part-*.parquet, written by `emolens "
                                      "predict --engine ray`)")
        if len(self) and not self.out_of_core:
            raise AffectiveIndexError(f"{self.folder} was built from image folders; build the shards into a new "
                                      "index folder")
        fs, root = file_system(folder)
        with fs.open_input_stream(f"{root}/{PLAN_FILE}") as f:
            plan = json.loads(f.read().decode())
        built_by = self.model
        if built_by is not None and built_by.digest != plan["model_id"]:
            raise AffectiveIndexError(f"{folder} was scored with another model (weights {plan['model_id'][:12]}) than "
                                      f"{self.folder} holds ({built_by}); build it into a new index folder")
        taken = set(json.loads(self._meta("shards") or "[]"))
        vectors = OutOfCoreVectors(self.folder) if self.out_of_core else None  # a new index: made by the first shard
        report = ShardReport(0, 0, 0, 0)
        with self.db:
            self._set_meta("model_id", plan["model_id"])
            self._set_meta("model_name", meta.get("model", "?"))
            self._set_meta("classes", json.dumps(meta["classes"]))
            self._set_meta("vectors", "out_of_core")
        last = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
        for index, table in read_shards(folder):
            key = f"{plan['sources_sha256']}:{plan['shard_size']}:{index}"
            if key in taken:
                report.skipped += 1
                continue
            rows = table.to_pydict()
            scored = [i for i, error in enumerate(rows["error"]) if error is None]
            if vectors is None and scored:  # the first scored row of a new index sets the dimension
                vectors = OutOfCoreVectors(self.folder, dim=len(rows["embedding"][scored[0]]))
            if vectors is None:
                continue
            vectors.truncate(last)  # rows of an interrupted run that never reached SQLite
            held = set()  # paths indexed already: left out, as is a path listed twice
            for s in range(0, len(scored), 500):
                chunk = [_to_db(rows["path"][i]) for i in scored[s:s + 500]]
                held |= {p for (p,) in self.db.execute(
                    f"SELECT path FROM images WHERE path IN ({','.join('?' * len(chunk))})", chunk)}
            fresh = []
            for i in scored:
                if _to_db(rows["path"][i]) not in held:
                    held.add(_to_db(rows["path"][i]))
                    fresh.append(i)
            embedding = np.asarray([rows["embedding"][i] for i in fresh], np.float32).reshape(len(fresh), vectors.dim)
            embedding /= np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
            vectors.append(embedding)
            ids = range(last + 1, last + 1 + len(fresh))
            classes = meta["classes"]
            with self.db:
                self.db.executemany(
                    # a URI's row has no file identity (-1: nothing to compare); a local file's, its size and mtime
                    "INSERT INTO images (id, path, emotion, probability, polarity, distribution, embedding, valence, "
                    "arousal, size, mtime_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(n, _to_db(rows["path"][i]), rows["emotion"][i], rows["probability"][i], rows["polarity"][i],
                      json.dumps(dict(zip(classes, rows["distribution"][i]))), b"", rows["valence"][i],
                      rows["arousal"][i], -1 if rows["size"][i] is None else rows["size"][i],
                      -1 if rows["mtime_ns"][i] is None else rows["mtime_ns"][i]) for n, i in zip(ids, fresh)])
                self.db.executemany("INSERT INTO scores VALUES (?, ?, ?)",
                                    [(n, c, v) for n, i in zip(ids, fresh)
                                     for c, v in zip(classes, rows["distribution"][i])])
                taken.add(key)
                self._set_meta("shards", json.dumps(sorted(taken)))
                self._bump()
            last += len(fresh)
            report.added += len(fresh)
            report.failed += len(rows["path"]) - len(scored)
            report.shards += 1
            if on_shard:
                on_shard(len(rows["path"]))
        if vectors is not None:
            vectors.finish()
        self._faiss = None
        report.total = len(self)
        return report

    def _repair_scores(self) -> int:
        """Rewrite the per-emotion scores of rows that lack them (a damaged table) from the rows' distributions."""
        damaged = self.db.execute("SELECT id, distribution FROM images WHERE NOT EXISTS "
                                  "(SELECT 1 FROM scores WHERE scores.image_id = images.id)").fetchall()
        self.db.executemany("INSERT INTO scores VALUES (?, ?, ?)",
                            [(i, c, v) for i, distribution in damaged for c, v in json.loads(distribution).items()])
        return len(damaged)

    def _store(self, p: Prediction, identity: tuple) -> None:
        vector = np.asarray(p.outputs["embedding"], dtype=np.float32)
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        self.db.execute("DELETE FROM images WHERE path = ?", (_to_db(p.source),))
        self.db.execute("DELETE FROM failures WHERE path = ?", (_to_db(p.source),))
        cur = self.db.execute(
            f"INSERT INTO images (path, emotion, probability, polarity, distribution, embedding, valence, arousal, "
            f"{IDENTITY}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_to_db(p.source), p.emotion, p.probability, p.polarity, json.dumps(p.distribution), vector.tobytes(),
             p.valence, p.arousal, *identity))
        self.db.executemany("INSERT INTO scores VALUES (?, ?, ?)",
                            [(cur.lastrowid, c, v) for c, v in p.distribution.items()])

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of every image, by id."""
        rows = self.db.execute("SELECT id, embedding FROM images ORDER BY id").fetchall()
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        return ids, np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])

    def rebuild_vectors(self) -> None:
        """Remake the vectors file from SQLite. The rows and the generation they belong to are read in one
        transaction and the file's hash is recorded with that generation, so a file built from rows that
        changed meanwhile is never taken as current (nor one that another process overwrote)."""
        import faiss

        self.db.execute("BEGIN")
        try:
            generation = self._meta("generation") or "0"
            ids, vectors = self.vectors()
        finally:
            self.db.execute("COMMIT")
        index = build_faiss(vectors, ids)
        digest = []

        def write(tmp: str) -> None:
            faiss.write_index(index, tmp)
            digest.append(_file_digest(tmp))

        atomic_write(self.faiss_path, write)
        with self.db:
            self._set_meta("vectors_for", generation)
            self._set_meta("vectors_sha256", digest[0])
        self._faiss, self._faiss_generation = index, generation

    def _bump(self) -> None:
        """Count a change of the rows (inside the changing transaction), so a stale vectors file is known."""
        self._set_meta("generation", str(int(self._meta("generation") or 0) + 1))

    # --- searching --------------------------------------------------------------------------------

    def _vectors_index(self):
        """The FAISS index of the rows as they are now: reloaded when another process changed them (a
        running server sees ``emolens index`` runs), rebuilt when the file is stale, corrupt or missing.
        An index built from shards searches its out-of-core vectors instead."""
        import faiss

        generation = self._meta("generation") or "0"
        if self._faiss is not None and self._faiss_generation == generation:
            return self._faiss
        if self.out_of_core:
            self._faiss, self._faiss_generation = OutOfCoreVectors(self.folder), generation
            return self._faiss
        try:
            with open(self.faiss_path, "rb") as f:  # hashed and read through one handle: a file renamed over
                if (self._meta("vectors_for") == generation  # it meanwhile is not mixed in
                        and self._meta("vectors_sha256") == _file_digest(f)):
                    f.seek(0)
                    self._faiss = faiss.deserialize_index(np.fromfile(f, dtype=np.uint8))
                    self._faiss_generation = generation
                    return self._faiss
        except (OSError, RuntimeError):  # missing or unreadable: the file is only a cache of SQLite
            pass
        self.rebuild_vectors()
        return self._faiss

    def _hits(self, ids: Iterable[int], scores: Iterable[float]) -> list[Hit]:
        """The rows of ``ids`` as hits, leaving out rows whose file is no longer the one indexed (changed,
        replaced or moved since: the next ``index`` run embeds it again)."""
        hits = []
        for i, score in zip(ids, scores):
            row = self.db.execute("SELECT id, path, emotion, probability, polarity, distribution, valence, arousal, "
                                  f"{IDENTITY} FROM images WHERE id = ?", (int(i),)).fetchone()
            # a URI (from scored shards) has no local file to check
            if row and (is_uri(_from_db(row[1])) or is_indexed_file(_from_db(row[1]), row[8:])):
                hits.append(Hit(row[0], _from_db(row[1]), float(score), row[2], row[3], row[4], json.loads(row[5]),
                                row[6], row[7]))
        return hits

    def _first_hits(self, ranked: Callable[[int], tuple[list[tuple[int, float]], bool]], k: int,
                    exclude_path: str | None = None) -> list[Hit]:
        """The first ``k`` usable hits of ``ranked(limit)``, which gives up to ``limit`` (id, score) pairs in
        order and whether there are no more; the limit grows while rows are left out."""
        limit = k + (1 if exclude_path else 0)
        while True:
            found, exhausted = ranked(limit)
            hits = [h for h in self._hits([i for i, _ in found], [sc for _, sc in found]) if h.path != exclude_path]
            if len(hits) >= k or exhausted:
                return hits[:k]
            limit *= 4

    def _check_filter(self, within: AffectFilter) -> None:
        if within and self.db.execute("SELECT 1 FROM images WHERE valence IS NOT NULL LIMIT 1").fetchone() is None \
                and len(self):
            raise AffectiveIndexError(f"{self.folder} was built with a model that does not rate valence and arousal; "
                                      "search it without valence/arousal ranges")

    def _within(self, ids: Sequence[int], within: AffectFilter) -> set[int]:
        """Which of ``ids`` lie in the ranges."""
        condition, params = within.where()
        found: set[int] = set()
        for s in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
            chunk = [int(i) for i in ids[s:s + 500]]
            found |= {r[0] for r in self.db.execute(
                f"SELECT id FROM images WHERE id IN ({','.join('?' * len(chunk))}) AND {condition}",
                [*chunk, *params])}
        return found

    def search_vector(self, vector: np.ndarray, k: int = 10, exclude_path: str | None = None,
                      within: AffectFilter = AffectFilter()) -> list[Hit]:
        """The ``k`` images whose embeddings are closest (inner product of unit vectors) to ``vector``; with
        ``within``, the closest of those in its valence/arousal ranges (the shortlist widens until k are)."""
        self._check_filter(within)
        total = len(self)
        if total == 0:
            return []
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        index = self._vectors_index()

        def ranked(limit: int) -> tuple[list[tuple[int, float]], bool]:
            shortlist = min(limit * (4 if within else 1), total)
            scores, ids = index.search(vector, shortlist)
            found = [(i, sc) for i, sc in zip(ids[0], scores[0]) if i >= 0]
            if within:
                kept = self._within([i for i, _ in found], within)
                found = [(i, sc) for i, sc in found if i in kept]
            return found, shortlist >= total

        return self._first_hits(ranked, k, exclude_path)

    def search_image(self, image: str | os.PathLike, predictor: Predictor, k: int = 10,
                     within: AffectFilter = AffectFilter()) -> tuple[Prediction, list[Hit]]:
        """The query's own prediction and the ``k`` images that feel most like it (itself left out)."""
        self.check_model(predictor)
        good, bad = predictor.predict([image])
        if bad:
            raise ImageLoadError(bad[0].source, bad[0].reason)
        query = good[0]
        path = str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else None
        return query, self.search_vector(query.outputs["embedding"], k, exclude_path=path, within=within)

    def search_emotion(self, emotion: str, k: int = 10, within: AffectFilter = AffectFilter()) -> list[Hit]:
        """The ``k`` images most likely to evoke ``emotion`` (by predicted probability), within the ranges."""
        self._check_filter(within)
        classes = {c.lower(): c for c in self.classes}
        if emotion.lower() not in classes:
            raise KeyError(f"{emotion!r} is not an emotion of this index ({', '.join(self.classes)})")
        condition, params = within.where()

        def ranked(limit: int) -> tuple[list[tuple[int, float]], bool]:
            rows = self.db.execute(
                f"SELECT scores.image_id, scores.probability FROM scores JOIN images ON images.id = scores.image_id "
                f"WHERE scores.emotion = ? AND {condition} ORDER BY scores.probability DESC, scores.image_id LIMIT ?",
                (classes[emotion.lower()], *params, limit)).fetchall()
            return rows, len(rows) < limit

        return self._first_hits(ranked, k)

    def search_affect(self, within: AffectFilter, k: int = 10, inside: bool = True) -> list[Hit]:
        """The ``k`` images in the valence/arousal ranges nearest their centre; the score is that distance.
        ``inside=False``: the ``k`` nearest the centre wherever they lie (for a region that holds none)."""
        if not within:
            raise ValueError("give a valence or an arousal range")
        self._check_filter(within)
        condition, params = within.where() if inside else ("valence IS NOT NULL", [])
        distance = " + ".join(f"({name} - ?) * ({name} - ?)" for name, _ in within.ranges())
        centres = [v for _, r in within.ranges() for v in (r.centre, r.centre)]

        def ranked(limit: int) -> tuple[list[tuple[int, float]], bool]:
            rows = self.db.execute(f"SELECT id, {distance} AS d FROM images WHERE {condition} ORDER BY d, id LIMIT ?",
                                   (*centres, *params, limit)).fetchall()
            return [(i, float(np.sqrt(d))) for i, d in rows], len(rows) < limit

        return self._first_hits(ranked, k)

    def affect_points(self, limit: int = 2000) -> list[tuple[float, float]]:
        """(valence, arousal) of up to ``limit`` indexed images, spread over the collection (every n-th by id)."""
        rated = self.db.execute("SELECT COUNT(*) FROM images WHERE valence IS NOT NULL").fetchone()[0]
        # row k is kept when k * limit mod rated < limit: exactly `limit` rows, evenly spaced
        return [(v, a) for v, a in self.db.execute(
            "SELECT valence, arousal FROM (SELECT valence, arousal, ROW_NUMBER() OVER (ORDER BY id) - 1 AS k "
            "FROM images WHERE valence IS NOT NULL) WHERE (k * ?) % ? < ?", (limit, max(rated, 1), limit))]

    def affect_spans(self) -> dict[str, tuple[float, float]]:
        """The lowest and highest valence and arousal of the indexed images (none where the model rates none)."""
        low_v, high_v, low_a, high_a = self.db.execute(
            "SELECT MIN(valence), MAX(valence), MIN(arousal), MAX(arousal) FROM images").fetchone()
        return {} if low_v is None else {"valence": (low_v, high_v), "arousal": (low_a, high_a)}

    def image_path(self, image_id: int) -> str | None:
        row = self.image_row(image_id)
        return row.path if row else None

    def image_row(self, image_id: int) -> "ImageRow | None":
        """Where image ``image_id`` was indexed from, and the identity of the file indexed there."""
        row = self.db.execute(f"SELECT path, {IDENTITY} FROM images WHERE id = ?", (int(image_id),)).fetchone()
        return ImageRow(_from_db(row[0]), tuple(row[1:])) if row else None


def _file_digest(file) -> str:
    """sha256 of a file (a path or an open binary file), read in chunks."""
    digest = hashlib.sha256()
    with (open(file, "rb") if isinstance(file, (str, os.PathLike)) else nullcontext(file)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_db(path: str) -> str:
    """A path as SQLite text. File names need not be UTF-8 (Python holds the stray bytes as surrogate
    escapes, which SQLite refuses); those are stored as base64 of their bytes after ``b64:``, which no
    absolute path starts with."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "b64:" + base64.urlsafe_b64encode(os.fsencode(path)).decode("ascii")


def _from_db(text: str) -> str:
    return os.fsdecode(base64.urlsafe_b64decode(text[4:])) if text.startswith("b64:") else text


def build_faiss(vectors: np.ndarray, ids: np.ndarray, approximate_from: int = APPROXIMATE_FROM):
    """Exact inner-product search for small collections; for large ones, a 4-bit PQ fast scan
    whose shortlist (``REFINE_FACTOR`` x k) is re-ranked by exact inner products. A dimension that
    the codes cannot split evenly keeps exact search."""
    import faiss

    dim = vectors.shape[1] if vectors.size else 1
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) >= approximate_from and dim % (2 * PQ_DIMS_PER_CODE) == 0:
        codes = faiss.IndexPQFastScan(dim, dim // PQ_DIMS_PER_CODE, 4, faiss.METRIC_INNER_PRODUCT)
        inner = faiss.IndexRefineFlat(codes)
        inner.k_factor = REFINE_FACTOR
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), PQ_TRAINING_SAMPLE), replace=False)
        inner.train(vectors[np.sort(sample)])
    else:
        inner = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index

"""`predict --engine ray` on a real local Ray cluster (2 CPUs), and indexes built from its shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_image
from emolens.predict import Predictor
from emolens.shards import SHARD_PATTERN

pytestmark = pytest.mark.slow


def emolens(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emolens", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Ten photos (two listed in a Parquet file of paths, one of them as a file:// URI, read through pyarrow's
    file system) and one broken file, scored on Ray in shards of 4."""
    root = tmp_path_factory.mktemp("ray")
    photos = [write_image(root / "photos" / f"{i}.jpg", seed=i, size=(72, 56)) for i in range(8)]
    listed = [write_image(root / "listed" / f"{i}.png", seed=20 + i, size=(64, 64)) for i in range(2)]
    (root / "photos" / "broken.jpg").write_bytes(b"not an image")
    pq.write_table(pa.table({"path": [str(listed[0]), listed[1].as_uri()]}), root / "list.parquet")
    out = root / "shards"
    run = emolens("predict", str(root / "photos"), str(root / "list.parquet"), "--engine", "ray", "--out", str(out),
                  "--shard-size", "4", "--actors", "2", "--batch-size", "3")
    return root, photos + listed, out, run


def row_path(photo: Path) -> str:
    """The path a shard gives a test photo: its real path, or the URI it was listed by."""
    return photo.as_uri() if photo.name == "1.png" else os.path.realpath(photo)


def said(text: str) -> str:
    """A message as one line (the terminal wraps it)."""
    return " ".join(text.split())


def shard_rows(out) -> list[dict]:
    rows = []
    for index in range(3):
        rows += pq.read_table(out / SHARD_PATTERN.format(index)).to_pylist()
    return rows


def test_ray_scores_equal_the_local_predictor_and_bad_images_are_rows(scored):
    root, photos, out, run = scored
    assert run.returncode == 3, run.stderr  # one image could not be used
    assert "3 shard(s) of 11 image(s); this run scored 3 shard(s) (11 images, 1 could not be used)" in \
        said(run.stdout)
    rows = {r["path"]: r for r in shard_rows(out)}
    assert len(rows) == 11
    broken = rows[os.path.realpath(root / "photos" / "broken.jpg")]
    assert broken["error"] and broken["distribution"] is None and broken["embedding"] is None
    predictor = Predictor(None, keep=("embedding",))
    good, bad = predictor.predict(photos)
    assert not bad
    assert rows[photos[-1].as_uri()]["size"] is None  # a URI's file is read through pyarrow: no local stamp
    for p in good:
        row = rows[row_path(Path(p.source))]
        assert row["error"] is None and row["model_id"] == predictor.identity.digest and row["precision"] == "fp32"
        assert row["emotion"] == p.emotion and row["polarity"] == p.polarity
        assert row["distribution"] == pytest.approx([p.distribution[c] for c in predictor.taxonomy.classes], abs=1e-6)
        assert (row["valence"], row["arousal"]) == pytest.approx((p.valence, p.arousal), abs=1e-6)
        assert row["embedding"] == pytest.approx(p.outputs["embedding"].tolist(), abs=1e-5)
        assert row["size"] in (None, os.stat(p.source).st_size)
    meta = json.loads(pq.read_schema(out / SHARD_PATTERN.format(0)).metadata[b"emolens"])
    assert meta["classes"] == list(predictor.taxonomy.classes)


def test_a_rerun_skips_finished_shards_and_another_run_is_refused(scored):
    root, _, out, _ = scored
    before = (out / SHARD_PATTERN.format(1)).stat().st_mtime_ns
    (out / SHARD_PATTERN.format(2)).unlink()  # as if the run had been killed before its last shard
    again = emolens("predict", str(root / "photos"), str(root / "list.parquet"), "--engine", "ray", "--out", str(out),
                    "--shard-size", "4", "--actors", "2", "--batch-size", "3")
    assert "this run scored 1 shard(s)" in said(again.stdout) and "2 were already done" in said(again.stdout)
    assert (out / SHARD_PATTERN.format(1)).stat().st_mtime_ns == before and (out / SHARD_PATTERN.format(2)).is_file()
    other = emolens("predict", str(root / "photos"), "--engine", "ray", "--out", str(out), "--shard-size", "4")
    assert other.returncode == 2 and "holds the shards of another run" in said(other.stderr)
    assert "Traceback" not in other.stderr


def test_an_index_from_shards_answers_as_one_built_from_the_images(scored, tmp_path):
    root, photos, out, _ = scored
    built = emolens("index", "--from", str(out), "--db", str(tmp_path / "from_shards"))
    assert built.returncode == 0, built.stderr
    assert "10 image(s) in the index; this run: 3 shard(s), 10 added, 1 row(s) with an error" in said(built.stdout)
    again = said(emolens("index", "--from", str(out), "--db", str(tmp_path / "from_shards")).stdout)
    assert "this run: 0 shard(s), 0 added" in again and "3 shard(s) taken before" in again
    local = emolens("index", str(root / "photos"), str(root / "listed"), "--db", str(tmp_path / "from_images"))
    assert local.returncode == 3  # the broken file
    for query in (str(photos[0]), str(photos[8])):
        answers = [json.loads(emolens("search", query, "--db", str(tmp_path / db), "-k", "5", "--format", "json").stdout)
                   for db in ("from_shards", "from_images")]
        assert [h["path"].replace("file://", "") for h in answers[0]["hits"]] == [h["path"] for h in answers[1]["hits"]]
        assert [h["score"] for h in answers[0]["hits"]] == pytest.approx([h["score"] for h in answers[1]["hits"]],
                                                                        abs=2e-3)  # float16 rows
    refused = emolens("index", str(root / "photos"), "--db", str(tmp_path / "from_shards"))
    assert refused.returncode == 2 and "built from scored shards" in said(refused.stderr)


def test_a_changed_file_is_no_hit_of_an_index_from_shards(scored, tmp_path):
    root, photos, out, _ = scored
    assert emolens("index", "--from", str(out), "--db", str(tmp_path / "db")).returncode == 0
    from emolens.retrieval.index import AffectiveIndex

    store = AffectiveIndex(tmp_path / "db")
    vector = np.asarray(pq.read_table(out / SHARD_PATTERN.format(0)).column("embedding")[0].as_py(), np.float32)
    first = store.search_vector(vector, k=1)[0].path
    st = os.stat(first)
    os.utime(first, ns=(0, 0))  # touched since it was scored
    try:
        assert first not in [h.path for h in store.search_vector(vector, k=10)]
    finally:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))

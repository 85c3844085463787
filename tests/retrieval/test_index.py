import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import tiny_model
from emolens.cli import EXIT_SOME_FAILED, app
from emolens.predict import Predictor
from emolens.retrieval.index import AffectiveIndex, AffectiveIndexError, build_faiss
from emolens.runtime import export_onnx
from emolens.weights import save_model

runner = CliRunner()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    export_onnx(tiny_model().eval(), folder / "tiny.onnx")
    return folder / "tiny.onnx"


def photo(path, seed, size=(96, 72)):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def predictor(model, **kw):
    return Predictor(model, keep=("embedding",), **kw)


def test_planted_near_duplicate_comes_first(tmp_path, onnx_model):
    for i in range(12):
        photo(tmp_path / "photos" / f"{i}.png", seed=i)
    original = photo(tmp_path / "query.png", seed=99)
    Image.open(original).resize((90, 68)).save(tmp_path / "photos" / "near_duplicate.jpg", quality=85)
    index = AffectiveIndex(tmp_path / "db", create=True)
    report = index.update([tmp_path / "photos"], predictor(onnx_model, batch_size=5))
    assert report.added == report.total == 13 and not report.failed
    query, hits = index.search_image(original, predictor(onnx_model), k=3)
    assert hits[0].path.endswith("near_duplicate.jpg") and hits[0].score > hits[1].score
    assert sum(hits[0].distribution.values()) == pytest.approx(1, abs=1e-4)
    by_emotion = index.search_emotion("awe", k=13)
    p = [h.distribution["awe"] for h in by_emotion]
    assert p == sorted(p, reverse=True) and len(p) == 13
    with pytest.raises(KeyError):
        index.search_emotion("joy")


def test_rerun_adds_updates_removes_and_keeps_other_folders(tmp_path, onnx_model):
    a = [photo(tmp_path / "a" / f"{i}.png", seed=i) for i in range(4)]
    photo(tmp_path / "b" / "other.png", seed=50)
    index = AffectiveIndex(tmp_path / "db", create=True)
    index.update([tmp_path / "a"], predictor(onnx_model))
    index.update([tmp_path / "b"], predictor(onnx_model))
    assert len(index) == 5
    a[0].unlink()
    photo(a[1], seed=77)
    os.utime(a[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    photo(tmp_path / "a" / "new.png", seed=78)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    report = index.update([tmp_path / "a"], predictor(onnx_model))
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 1, 1, 2)  # 2, 3
    assert [f.source for f in report.failed] == [str((tmp_path / "a" / "broken.jpg").resolve())]
    assert len(index) == 5  # b/other.png stays: it was not under the folder re-indexed
    again = index.update([tmp_path / "a"], predictor(onnx_model))
    assert (again.added, again.updated, again.removed) == (0, 0, 0) and len(again.failed) == 1
    ids, vectors = index.vectors()
    hits = index.search_vector(vectors[0], k=1)
    assert hits[0].id == ids[0] and hits[0].score == pytest.approx(1, abs=1e-5)


def test_index_refuses_another_model(tmp_path, onnx_model):
    photo(tmp_path / "x" / "1.png", seed=1)
    index = AffectiveIndex(tmp_path / "db", create=True)
    index.update([tmp_path / "x"], predictor(onnx_model))
    with pytest.raises(AffectiveIndexError, match="not with"):
        index.update([tmp_path / "x"], predictor(tiny_model("global:dropout=0.5", task="polarity")))
    with pytest.raises(AffectiveIndexError, match="no index"):
        AffectiveIndex(tmp_path / "nowhere")


def test_same_spec_other_weights_is_another_model(tmp_path):
    """Identity is the weights' content: a model of the same spec with other head weights is refused,
    when indexing and when searching, with a message naming both."""
    import torch

    first = tiny_model()
    torch.manual_seed(123)
    second = tiny_model()
    assert first.spec == second.spec
    save_model(first, tmp_path / "first.safetensors")
    save_model(second, tmp_path / "second.safetensors")
    photo(tmp_path / "x" / "1.png", seed=1)
    index = AffectiveIndex(tmp_path / "db", create=True)
    index.update([tmp_path / "x"], predictor(tmp_path / "first.safetensors"))
    other = predictor(tmp_path / "second.safetensors")
    with pytest.raises(AffectiveIndexError) as refused:
        index.update([tmp_path / "x"], other)
    assert index.model.digest[:12] in str(refused.value) and other.identity.digest[:12] in str(refused.value)
    with pytest.raises(AffectiveIndexError, match="not with"):
        index.search_image(tmp_path / "x" / "1.png", other)
    # the same weights under the other backend are the same model
    index.search_image(tmp_path / "x" / "1.png", predictor(tmp_path / "first.safetensors", backend="torch"))
    result = runner.invoke(app, ["search", str(tmp_path / "x" / "1.png"), "--db", str(tmp_path / "db"),
                                 "--model", str(tmp_path / "second.safetensors")])
    assert result.exit_code == 2 and "not with" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_an_index_without_a_model_identity_is_refused(tmp_path, onnx_model):
    """An index made by an earlier emolens (no weights digest) cannot be extended or searched by image."""
    photo(tmp_path / "x" / "1.png", seed=1)
    index = AffectiveIndex(tmp_path / "db", create=True)
    index.update([tmp_path / "x"], predictor(onnx_model))
    with index.db:
        index.db.execute("DELETE FROM meta WHERE key IN ('model_id', 'model_name')")
        index.db.execute("INSERT INTO meta VALUES ('model', '{\"model\": \"global\"}')")
    with pytest.raises(AffectiveIndexError, match="earlier emolens"):
        index.update([tmp_path / "x"], predictor(onnx_model))


def _rows(db):
    with sqlite3.connect(db) as con:
        return con.execute("SELECT id, path, size, mtime_ns, emotion, distribution, embedding FROM images ORDER BY id").fetchall()


def test_killed_index_run_resumes_to_the_same_index(tmp_path, onnx_model):
    for i in range(40):
        photo(tmp_path / "photos" / f"{i:02d}.png", seed=i, size=(900, 700))
    command = [sys.executable, "-m", "emolens", "index", str(tmp_path / "photos"), "--model", str(onnx_model),
               "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([*command, "--db", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    partial_kills = 0
    for attempt in range(3):
        proc = subprocess.Popen([*command, "--db", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            db = tmp_path / "killed" / "index.sqlite"
            try:
                done = len(_rows(db)) if db.is_file() else 0
            except sqlite3.OperationalError:
                done = 0
            if done >= 4 * (attempt + 1):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                partial_kills += len(_rows(db)) < 40
                break
            time.sleep(0.01)
        proc.wait()
    assert partial_kills >= 1, "no kill landed mid-way"
    subprocess.run([*command, "--db", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    assert _rows(tmp_path / "killed" / "index.sqlite") == _rows(tmp_path / "whole" / "index.sqlite")
    a, b = AffectiveIndex(tmp_path / "killed"), AffectiveIndex(tmp_path / "whole")
    ids, vectors = a.vectors()
    assert [h.id for h in a.search_vector(vectors[3], k=5)] == [h.id for h in b.search_vector(vectors[3], k=5)]


def test_cli_index_and_search(tmp_path, onnx_model):
    for i in range(5):
        photo(tmp_path / "p" / f"{i}.png", seed=i)
    (tmp_path / "p" / "empty.png").write_bytes(b"")
    result = runner.invoke(app, ["index", str(tmp_path / "p"), "--db", str(tmp_path / "db"), "--model", str(onnx_model)])
    assert result.exit_code == EXIT_SOME_FAILED and "empty.png" in result.output
    result = runner.invoke(app, ["search", str(tmp_path / "p" / "1.png"), "--db", str(tmp_path / "db"), "--model",
                                 str(onnx_model), "-k", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    import json

    hits = json.loads(result.output)["hits"]
    assert len(hits) == 2 and all(not h["path"].endswith("/1.png") for h in hits)
    result = runner.invoke(app, ["search", "--emotion", "fear", "--db", str(tmp_path / "db")])
    assert result.exit_code == 0 and "fear" in result.output


def test_large_collections_get_an_approximate_index():
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(1000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1000, dtype=np.int64) + 1000
    exact, approx = build_faiss(vectors, ids), build_faiss(vectors, ids, approximate_from=100)
    refine = faiss.downcast_index(approx.index)
    assert isinstance(refine, faiss.IndexRefineFlat) and isinstance(faiss.downcast_index(refine.base_index),
                                                                   faiss.IndexPQFastScan)
    assert isinstance(faiss.downcast_index(exact.index), faiss.IndexFlatIP)
    _, a = exact.search(vectors[:20], 5)
    _, b = approx.search(vectors[:20], 5)
    assert (a[:, 0] == ids[:20]).all() and np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a, b)]) > 0.9
    odd = build_faiss(vectors[:, :12].copy(), ids, approximate_from=100)  # 12 dims do not split into the codes
    assert isinstance(faiss.downcast_index(odd.index), faiss.IndexFlatIP)


def test_a_running_reader_sees_what_another_index_run_changed(tmp_path, onnx_model):
    """As under `emolens serve`: the reader keeps its connection while `emolens index` adds and deletes."""
    import shutil

    for i in range(24):
        photo(tmp_path / "photos" / f"{i:02d}.png", seed=i)
    pred = predictor(onnx_model)
    AffectiveIndex(tmp_path / "db", create=True).update([tmp_path / "photos"], pred)
    reader = AffectiveIndex(tmp_path / "db")
    query, _ = pred.predict([tmp_path / "photos" / "05.png"])
    assert len(reader.search_vector(query[0].outputs["embedding"], k=20)) == 20
    shutil.copy(tmp_path / "photos" / "05.png", tmp_path / "photos" / "05-copy.png")
    for i in range(10, 24):
        (tmp_path / "photos" / f"{i:02d}.png").unlink()
    AffectiveIndex(tmp_path / "db").update([tmp_path / "photos"], pred)
    hits = reader.search_vector(query[0].outputs["embedding"], k=20)
    assert len(hits) == len(reader) == 11  # every remaining image, none that was deleted
    assert {Path(h.path).name for h in hits[:2]} == {"05.png", "05-copy.png"}


def test_a_rebuild_from_rows_that_changed_meanwhile_is_not_marked_current(tmp_path, onnx_model):
    for i in range(4):
        photo(tmp_path / "photos" / f"{i}.png", seed=i)
    pred = predictor(onnx_model)
    index = AffectiveIndex(tmp_path / "db", create=True)
    index.update([tmp_path / "photos"], pred)
    read_rows = index.vectors

    def rows_then_another_writer():
        rows = read_rows()
        photo(tmp_path / "photos" / "late.png", seed=99)
        AffectiveIndex(tmp_path / "db").update([tmp_path / "photos"], pred)  # commits while the file is built
        return rows

    index.vectors = rows_then_another_writer
    index.rebuild_vectors()
    index.vectors = read_rows
    assert index._meta("vectors_for") != index._meta("generation")
    late, _ = pred.predict([tmp_path / "photos" / "late.png"])
    fresh = AffectiveIndex(tmp_path / "db")
    assert Path(fresh.search_vector(late[0].outputs["embedding"], k=1)[0].path).name == "late.png"


def test_a_corrupt_vectors_file_is_rebuilt_from_sqlite(tmp_path, onnx_model):
    for i in range(5):
        photo(tmp_path / "photos" / f"{i}.png", seed=i)
    pred = predictor(onnx_model)
    AffectiveIndex(tmp_path / "db", create=True).update([tmp_path / "photos"], pred)
    for damage in (b"garbage" * 10, b""):
        (tmp_path / "db" / "vectors.faiss").write_bytes(damage)
        index = AffectiveIndex(tmp_path / "db")
        ids, vectors = index.vectors()
        assert [h.id for h in index.search_vector(vectors[2], k=1)] == [ids[2]]
        assert (tmp_path / "db" / "vectors.faiss").stat().st_size > 100
    (tmp_path / "db" / "vectors.faiss").unlink()
    ids, vectors = AffectiveIndex(tmp_path / "db").vectors()
    assert len(AffectiveIndex(tmp_path / "db").search_vector(vectors[0], k=5)) == 5

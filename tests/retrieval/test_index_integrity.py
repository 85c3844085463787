"""An index that stays inside its roots and knows when a file changed: links out are skipped, rewritten and
replaced files never come back from a search with old results, and a damaged index says so and is repaired."""

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from helpers import tiny_model
from emolens.cli import EXIT_ERROR, EXIT_SOME_FAILED, app
from emolens.predict import Predictor
from emolens.retrieval.index import AffectiveIndex
from emolens.runtime import export_onnx
from emolens.server import create_app

runner = CliRunner(env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    export_onnx(tiny_model().eval(), folder / "tiny.onnx")
    return folder / "tiny.onnx"


def bmp(path: Path, seed: int, size=(48, 36)) -> Path:
    """A BMP: its file size depends on the image size alone, so a rewrite can keep the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "BMP")
    return path


def build(root: Path, model: Path, *paths) -> AffectiveIndex:
    index = AffectiveIndex(root / "db", create=True)
    index.update(list(paths), Predictor(model, keep=("embedding",)))
    return index


def every_hit(index: AffectiveIndex) -> set[str]:
    """Paths any kind of search returns (by emotion, by vector, by affect is not rated by this model)."""
    found = {h.path for h in index.search_emotion("awe", k=100)}
    _, vectors = index.vectors()
    for v in vectors:
        found |= {h.path for h in index.search_vector(v, k=100)}
    return found


def test_links_out_of_the_indexed_folders_are_skipped_and_reported(tmp_path, onnx_model):
    photos, outside = tmp_path / "photos", tmp_path / "outside"
    bmp(photos / "a.bmp", 0)
    secret = bmp(outside / "secret.bmp", 1)
    (photos / "sub").mkdir()
    (photos / "sub" / "inside.bmp").symlink_to("../a.bmp")  # a link inside the roots is fine
    (photos / "sub" / "out.bmp").symlink_to(secret)
    (photos / "sub" / "passwd.jpg").symlink_to("/etc/passwd")
    index = build(tmp_path, onnx_model, photos)
    paths = {index.image_path(int(i)) for i in index.vectors()[0]}
    assert paths == {str((photos / "a.bmp").resolve())}
    result = runner.invoke(app, ["index", str(photos), "--db", str(tmp_path / "db"), "--model", str(onnx_model)])
    said = " ".join(result.output.split())
    assert result.exit_code == EXIT_SOME_FAILED, said
    for name in ("out.bmp", "passwd.jpg"):
        assert name in said
    assert said.count("outside the indexed folders") == 2 and "not an image" not in said
    client = TestClient(create_app(onnx_model, tmp_path / "db"), base_url="http://127.0.0.1")
    served = [client.get(f"/api/images/{int(i)}").content for i in index.vectors()[0]]
    assert secret.read_bytes() not in served and len(served) == 1


def test_a_named_link_is_indexed_as_its_target(tmp_path, onnx_model):
    """A file named on the command line is a root of its own: the user chose it."""
    target = bmp(tmp_path / "elsewhere" / "t.bmp", 3)
    (tmp_path / "link.bmp").symlink_to(target)
    index = build(tmp_path, onnx_model, tmp_path / "link.bmp")
    assert [index.image_path(int(i)) for i in index.vectors()[0]] == [str(target.resolve())]


def test_the_server_checks_the_folder_again_when_it_serves(tmp_path, onnx_model):
    """A folder moved out and replaced by a link to where it went keeps its files' identities: the file is
    outside the indexed folder now, and is not served."""
    bmp(tmp_path / "photos" / "sub" / "0.bmp", 0)
    index = build(tmp_path, onnx_model, tmp_path / "photos")
    image_id = int(index.vectors()[0][0])
    client = TestClient(create_app(onnx_model, tmp_path / "db"), base_url="http://127.0.0.1")
    assert client.get(f"/api/images/{image_id}").status_code == 200
    (tmp_path / "outside").mkdir()
    os.rename(tmp_path / "photos" / "sub", tmp_path / "outside" / "sub")
    (tmp_path / "photos" / "sub").symlink_to(tmp_path / "outside" / "sub")
    assert client.get(f"/api/images/{image_id}").status_code == 404
    assert every_hit(index) == set()


def test_a_rewrite_in_place_with_size_and_time_restored_is_seen(tmp_path, onnx_model):
    photos = tmp_path / "photos"
    for i in range(3):
        bmp(photos / f"{i}.bmp", i)
    index = build(tmp_path, onnx_model, photos)
    target = photos / "1.bmp"
    before = target.stat()
    bmp(target, 99)  # other pixels, same size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    assert str(target.resolve()) not in every_hit(index)  # never old results for new bytes
    client = TestClient(create_app(onnx_model, tmp_path / "db"), base_url="http://127.0.0.1")
    hits = client.get("/api/search", params={"emotion": "awe", "k": 10}).json()["hits"]
    assert sorted(h["name"] for h in hits) == ["0.bmp", "2.bmp"]
    report = index.update([photos], Predictor(onnx_model, keep=("embedding",)))
    assert (report.updated, report.unchanged) == (1, 2)
    assert str(target.resolve()) in every_hit(index)


def test_a_file_replaced_by_a_fifo_leaves_the_results_and_the_index(tmp_path, onnx_model):
    photos = tmp_path / "photos"
    for i in range(3):
        bmp(photos / f"{i}.bmp", i)
    index = build(tmp_path, onnx_model, photos)
    (photos / "2.bmp").unlink()
    os.mkfifo(photos / "2.bmp")
    assert str((photos / "2.bmp").resolve()) not in every_hit(index)
    report = index.update([photos], Predictor(onnx_model, keep=("embedding",)))
    assert [Path(f.source).name for f in report.failed] == ["2.bmp"] and "not a regular file" in report.failed[0].reason
    assert (report.removed, report.total) == (1, 2)


def test_dropped_tables_and_rows_are_reported_and_repaired(tmp_path, onnx_model):
    photos = tmp_path / "photos"
    for i in range(4):
        bmp(photos / f"{i}.bmp", i)
    build(tmp_path, onnx_model, photos).close()
    with sqlite3.connect(tmp_path / "db" / "index.sqlite") as con:
        con.execute("DROP TABLE scores")
    search = ["search", "--emotion", "awe", "--db", str(tmp_path / "db")]
    result = runner.invoke(app, search)
    said = " ".join(result.output.split())
    assert result.exit_code == EXIT_ERROR and "broken" in said and "emolens index" in said, said
    reindex = ["index", str(photos), "--db", str(tmp_path / "db"), "--model", str(onnx_model)]
    assert runner.invoke(app, reindex).exit_code == 0
    assert len(runner.invoke(app, [*search, "--format", "json"]).stdout.split('"path"')) == 5
    with sqlite3.connect(tmp_path / "db" / "index.sqlite") as con:
        con.execute("DELETE FROM scores WHERE image_id = (SELECT MIN(id) FROM images)")
    assert runner.invoke(app, reindex).exit_code == 0
    assert len(runner.invoke(app, [*search, "--format", "json", "-k", "10"]).stdout.split('"path"')) == 5


def test_a_zero_byte_index_file_is_called_broken(tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "index.sqlite").write_bytes(b"")
    result = runner.invoke(app, ["search", "--emotion", "awe", "--db", str(tmp_path / "db")])
    said = " ".join(result.output.split())
    assert result.exit_code == EXIT_ERROR and "broken" in said and "emolens index" in said, said
    assert (tmp_path / "db" / "index.sqlite").stat().st_size == 0  # a search writes nothing

"""Valence and arousal wherever a model rates them: predictions, the CLI's formats, the index and its range
search, the server and the explanation PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from helpers import png, rated_model, tiny_model
from emolens.cli import app
from emolens.explain import NEGATIVE, POSITIVE, Explainer, render
from emolens.predict import Predictor
from emolens.retrieval.index import AffectFilter, AffectiveIndex, AffectiveIndexError, AffectRange
from emolens.server import create_app
from emolens.weights import save_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The rated model saved, and a folder of 16 noise photos."""
    folder = tmp_path_factory.mktemp("affect")
    save_model(rated_model(), folder / "model")
    for i in range(16):
        (folder / "photos").mkdir(exist_ok=True)
        (folder / "photos" / f"{i}.png").write_bytes(png(i, size=(64, 48)))
    return folder


def test_predictions_carry_the_affect_head_on_the_common_scale(saved):
    model = rated_model()
    with torch.no_grad():
        model.heads["affect"].weight.zero_()
        model.heads["affect"].bias.copy_(torch.tensor([0.3, 4.0]))
    preds, _ = Predictor(model, backend="torch").predict([saved / "photos" / "0.png"])
    assert preds[0].valence == pytest.approx(0.3, abs=1e-5)
    assert preds[0].arousal == 1.0  # clipped to the common scale
    assert Predictor(model, backend="torch").rates_affect

    plain, _ = Predictor(tiny_model().eval(), backend="torch").predict([saved / "photos" / "0.png"])
    assert plain[0].valence is None and plain[0].arousal is None
    assert not Predictor(tiny_model().eval(), backend="torch").rates_affect


def test_onnx_and_torch_give_the_same_valence_and_arousal(saved):
    files = sorted((saved / "photos").glob("*.png"))[:4]
    by_onnx, _ = Predictor(saved / "model", backend="onnx").predict(files)
    by_torch, _ = Predictor(saved / "model", backend="torch").predict(files)
    assert Predictor(saved / "model", backend="onnx").rates_affect
    for a, b in zip(by_onnx, by_torch):
        assert a.valence == pytest.approx(b.valence, abs=1e-4) and a.arousal == pytest.approx(b.arousal, abs=1e-4)
    assert len({round(p.valence, 3) for p in by_torch}) > 1  # the images differ, so do their ratings


def test_predict_formats_show_valence_and_arousal(saved):
    photo = str(saved / "photos" / "1.png")
    expected, _ = Predictor(saved / "model").predict([photo])
    out = runner.invoke(app, ["predict", photo, "--model", str(saved / "model"), "--format", "json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout)["predictions"][0]
    assert row["valence"] == pytest.approx(expected[0].valence, abs=1e-5)
    assert row["arousal"] == pytest.approx(expected[0].arousal, abs=1e-5)

    out = runner.invoke(app, ["predict", photo, "--model", str(saved / "model"), "--format", "csv"])
    header, values = out.stdout.strip().splitlines()
    record = dict(zip(header.split(","), values.split(",")))
    assert float(record["valence"]) == pytest.approx(expected[0].valence, abs=1e-4)

    out = runner.invoke(app, ["predict", photo, "--model", str(saved / "model")])
    assert "valence" in out.stdout and f"{expected[0].arousal:+.2f}" in out.stdout

    plain = saved / "plain"
    save_model(tiny_model(), plain)
    out = runner.invoke(app, ["predict", photo, "--model", str(plain), "--format", "csv"])
    assert "valence" not in out.stdout.splitlines()[0]  # a model without the head gets no empty columns


def test_affect_range_is_read_and_checked():
    assert AffectRange.parse("0.2:1") == AffectRange(0.2, 1.0)
    assert AffectRange.parse(":0") == AffectRange(-1.0, 0.0)
    assert AffectRange.parse("-0.5:") == AffectRange(-0.5, 1.0)
    for bad in ("0.5:0.2", "0:2", "high:low"):
        with pytest.raises(ValueError):
            AffectRange.parse(bad)


@pytest.fixture(scope="module")
def indexed(saved, tmp_path_factory):
    """An index of the photos by the rated model, and every photo's own prediction and unit embedding."""
    db = tmp_path_factory.mktemp("db")
    predictor = Predictor(saved / "model", keep=("embedding",))
    AffectiveIndex(db, create=True).update([saved / "photos"], predictor)
    preds, _ = predictor.predict(sorted((saved / "photos").glob("*.png")))
    return db, predictor, {str(p.source): p for p in preds}


def inside(p, within: AffectFilter) -> bool:
    return all(r.low <= getattr(p, name) <= r.high for name, r in within.ranges())


def test_index_search_keeps_to_the_ranges(indexed, saved):
    db, predictor, preds = indexed
    store = AffectiveIndex(db)
    valences = sorted(p.valence for p in preds.values())
    within = AffectFilter(valence=AffectRange(valences[4], valences[11]))  # 8 of the 16 photos
    wanted = {s for s, p in preds.items() if inside(p, within)}

    hits = store.search_emotion("awe", k=16, within=within)
    assert {h.path for h in hits} == wanted
    assert [h.score for h in hits] == pytest.approx(sorted((preds[h.path].distribution["awe"] for h in hits), reverse=True))

    query = str(saved / "photos" / "0.png")
    _, hits = store.search_image(query, predictor, k=3, within=within)
    unit = {s: p.outputs["embedding"] / np.linalg.norm(p.outputs["embedding"]) for s, p in preds.items()}
    nearest = sorted((s for s in wanted if s != query), key=lambda s: -float(unit[s] @ unit[query]))[:3]
    assert [h.path for h in hits] == nearest
    assert all(h.valence == pytest.approx(preds[h.path].valence, abs=1e-6) for h in hits)

    box = AffectFilter(valence=AffectRange(-1, 1), arousal=AffectRange(0.0, 1.0))
    hits = store.search_affect(box, k=16)
    assert {h.path for h in hits} == {s for s, p in preds.items() if p.arousal >= 0}
    assert [h.score for h in hits] == sorted(h.score for h in hits)  # nearest the box's centre first
    assert hits[0].score == pytest.approx(np.hypot(hits[0].valence, hits[0].arousal - 0.5), abs=1e-6)


def test_ranges_on_an_index_without_ratings_are_refused(saved, tmp_path):
    plain = tmp_path / "plain"
    save_model(tiny_model(), plain)
    store = AffectiveIndex(tmp_path / "db", create=True)
    store.update([saved / "photos"], Predictor(plain, keep=("embedding",)))
    with pytest.raises(AffectiveIndexError, match="does not rate valence and arousal"):
        store.search_emotion("awe", within=AffectFilter(valence=AffectRange(0, 1)))
    assert len(store.search_emotion("awe", k=3)) == 3


def test_cli_search_by_ranges(indexed, saved):
    db, _, preds = indexed
    out = runner.invoke(app, ["search", "--db", str(db), "--model", str(saved / "model"), "--valence", "0:1",
                              "--format", "json", "-k", "16"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.stdout)["hits"]
    assert {h["path"] for h in hits} == {s for s, p in preds.items() if p.valence >= 0}
    out = runner.invoke(app, ["search", "--db", str(db), "--emotion", "awe", "--arousal", ":0", "-k", "16"])
    assert out.exit_code == 0 and "arousal -1 to 0" in out.stdout, out.output
    assert runner.invoke(app, ["search", "--db", str(db), "--valence", "1:0"]).exit_code == 2
    assert runner.invoke(app, ["search", "--db", str(db)]).exit_code == 2


def test_server_answers_with_valence_and_arousal(indexed, saved):
    db, _, preds = indexed
    client = TestClient(create_app(saved / "model", db), base_url="http://127.0.0.1")
    assert client.get("/api/models").json()["affect"] is True
    result = client.post("/api/predict", files=[("files", ("a.png", png(0, size=(64, 48)), "image/png"))]).json()
    expected = preds[str(saved / "photos" / "0.png")]
    assert result["results"][0]["valence"] == pytest.approx(expected.valence, abs=1e-5)
    hits = client.get("/api/search", params={"valence": "0:1", "k": 16}).json()["hits"]
    assert hits and all(h["valence"] >= 0 for h in hits)
    assert len(hits) == sum(p.valence >= 0 for p in preds.values())
    points = client.get("/api/points").json()
    assert points["total"] == 16 and sorted(map(tuple, points["points"])) == pytest.approx(
        sorted((p.valence, p.arousal) for p in preds.values()), abs=1e-6)
    assert len(client.get("/api/points", params={"limit": 5}).json()["points"]) == 5  # spread, not all
    top = max(p.valence for p in preds.values())
    empty = {"valence": f"{min(1, top + 0.05):.2f}:1", "k": 3}
    assert client.get("/api/search", params=empty).json()["hits"] == []
    nearest = client.get("/api/search", params={**empty, "nearest": "true"}).json()
    assert nearest["outside"] is True and len(nearest["hits"]) == 3
    assert nearest["hits"][0]["valence"] == pytest.approx(top, abs=1e-6)  # the nearest to the region first
    found = client.post("/api/search", params={"arousal": "0:1"},
                        files={"file": ("q.png", png(3, size=(64, 48)), "image/png")}).json()
    assert all(h["arousal"] >= 0 for h in found["hits"]) and "valence" in found["query"]
    assert client.get("/api/search", params={"valence": "2:3"}).status_code == 400
    assert client.get("/api/search").status_code == 400


def test_explanation_draws_the_valence_arousal_plane(saved, tmp_path):
    model = rated_model()
    photo = saved / "photos" / "2.png"
    explanation = Explainer(model).explain(photo)
    pred, _ = Predictor(model, backend="torch").predict([photo])
    assert explanation.affect == pytest.approx((pred[0].valence, pred[0].arousal), abs=1e-5)
    with_plane = np.asarray(Image.open(render(explanation, model.taxonomy, tmp_path / "a.png")).convert("RGB"))
    explanation.affect = None
    without = Image.open(render(explanation, model.taxonomy, tmp_path / "b.png")).size
    assert with_plane.shape[1] > without[0]
    side = with_plane[:, without[0]:]  # the panel added beside the bars holds the point, in its polarity's colour
    colour = np.array(Image.new("RGB", (1, 1), POSITIVE if pred[0].valence >= 0 else NEGATIVE))[0, 0]
    assert (np.abs(side.astype(int) - colour).sum(-1) < 30).sum() > 20


def test_an_index_made_before_ratings_gains_their_columns(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL, "
               "mtime_ns INTEGER NOT NULL, emotion TEXT NOT NULL, probability REAL NOT NULL, polarity TEXT, "
               "distribution TEXT NOT NULL, embedding BLOB NOT NULL)")
    db.execute("CREATE TABLE scores (image_id INTEGER NOT NULL, emotion TEXT NOT NULL, probability REAL NOT NULL)")
    db.execute("CREATE TABLE failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.commit()
    db.close()
    store = AffectiveIndex(tmp_path)
    columns = {row[1] for row in store.db.execute("PRAGMA table_info(images)")}
    assert {"valence", "arousal", "device", "inode", "ctime_ns"} <= columns
    assert store.search_affect(AffectFilter(valence=AffectRange(0, 1))) == []  # an empty index: nothing to refuse


def test_the_table_with_ratings_fits_an_80_column_terminal(saved):
    narrow = CliRunner(env={"COLUMNS": "80"})
    out = narrow.invoke(app, ["predict", str(saved / "photos"), "--model", str(saved / "model")])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, out.stdout
    header = next(line for line in lines if line.startswith("image"))
    assert header.split()[-2:] == ["valence", "arousal"], out.stdout  # no column cropped off the right
    assert "0.png" in out.stdout


def test_a_range_that_holds_no_image_says_where_the_collection_lies(saved, tmp_path):
    db = tmp_path / "db"
    assert CliRunner().invoke(app, ["index", str(saved / "photos"), "--db", str(db), "--model",
                                    str(saved / "model")]).exit_code == 0
    spans = AffectiveIndex(db).affect_spans()
    empty = f"{spans['valence'][1] + 0.01:.2f}:1"  # just above the most pleasant image
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["search", "--valence", empty, "--db", str(db)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "no image found" in said, said
    low, high = spans["valence"]
    assert f"its valence spans {low:+.2f} to {high:+.2f}" in said and "16 in the index" in said, said

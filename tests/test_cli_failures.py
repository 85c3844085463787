"""Every way a command cannot run ends in a message and exit 2, never a traceback; interrupted commands
keep and say what they finished."""

import errno
import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from helpers import write_image
from helpers import tiny_model
from emolens.cli import EXIT_ERROR, EXIT_INTERRUPTED, app
from emolens.runtime import export_onnx
from emolens.weights import save_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("failures")
    export_onnx(tiny_model().eval(), folder / "m.onnx")
    for i in range(3):
        write_image(folder / "photos" / f"{i}.png", seed=i, size=(40, 30))
    assert runner.invoke(app, ["index", str(folder / "photos"), "--db", str(folder / "db"), "--model",
                               str(folder / "m.onnx")]).exit_code == 0
    return folder


def cannot_run(args, *words):
    result = runner.invoke(app, [str(a) for a in args])
    said = " ".join(result.output.split())
    assert result.exit_code == EXIT_ERROR, said
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in said and all(w in said for w in words), said
    return said


def test_a_corrupt_index(setup, tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "index.sqlite").write_bytes(b"not a database at all" * 50)
    cannot_run(["index", setup / "photos", "--db", tmp_path / "db", "--model", setup / "m.onnx"], "not an emolens index")
    cannot_run(["search", setup / "photos" / "0.png", "--db", tmp_path / "db", "--model", setup / "m.onnx"],
               "not an emolens index")
    cannot_run(["search", "--emotion", "awe", "--db", tmp_path / "db"], "not an emolens index")


@pytest.mark.parametrize("failure", [sqlite3.OperationalError("attempt to write a readonly database"),
                                     sqlite3.OperationalError("database or disk is full"),
                                     OSError(errno.ENOSPC, "No space left on device")])
def test_a_read_only_or_full_index(setup, tmp_path, monkeypatch, failure):
    from emolens.retrieval.index import AffectiveIndex

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(AffectiveIndex, "_store", broken)
    cannot_run(["index", setup / "photos", "--db", tmp_path / "db", "--model", setup / "m.onnx"], "cannot write the index")


def test_a_full_disk_while_the_vectors_are_written(setup, tmp_path, monkeypatch):
    import emolens.retrieval.index as index_module

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_module, "atomic_write", full)
    cannot_run(["index", setup / "photos", "--db", tmp_path / "db", "--model", setup / "m.onnx"], "No space left")


def test_a_full_disk_during_export(tmp_path, monkeypatch):
    import emolens.runtime

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    save_model(tiny_model(), tmp_path / "m.safetensors")
    monkeypatch.setattr(emolens.runtime, "atomic_write_bytes", full)
    cannot_run(["export", "--model", tmp_path / "m.safetensors", "--onnx", tmp_path / "m.onnx"], "No space left")


def test_broken_and_pickled_weight_files(setup, tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x80\x04 this is not safetensors")
    (tmp_path / "broken.json").write_text(json.dumps({"spec": {"name": "global"}}))
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "pickle.pth")
    photos = setup / "photos"
    for args in (["predict", photos, "--model", tmp_path / "broken.safetensors"],
                 ["evaluate", tmp_path / "broken.safetensors", "--split", "all"],
                 ["export", "--model", tmp_path / "broken.safetensors", "--onnx", tmp_path / "x.onnx"],
                 ["explain", photos, "--model", tmp_path / "broken.safetensors", "--out", tmp_path / "why"],
                 ["index", photos, "--db", tmp_path / "db2", "--model", tmp_path / "broken.safetensors"]):
        cannot_run(args, "broken.safetensors")
    cannot_run(["explain", photos, "--model", tmp_path / "pickle.pth", "--out", tmp_path / "why"])
    for i, emotion in enumerate(("awe", "fear")):
        write_image(tmp_path / "classes" / emotion / f"{i}.png", seed=i)
    cannot_run(["train", "--model", "global", "--data", f"folder={tmp_path / 'classes'}", "--out", tmp_path / "run",
                "--backbone-weights", tmp_path / "pickle.pth", "--workers", "0"], "pickle.pth")


@pytest.mark.parametrize("args", [["-k", "0"], ["-k", "-1"], ["--emotion", "awe", "-k", "-5"]])
def test_search_needs_a_positive_k(setup, args):
    query = [] if "--emotion" in args else [setup / "photos" / "0.png", "--model", setup / "m.onnx"]
    cannot_run(["search", *query, "--db", setup / "db", *args], "-k", "greater than or equal to 1")


def test_an_unusable_onnx_cache_falls_back_to_an_export_in_memory(tmp_path):
    save_model(tiny_model(), tmp_path / "m.safetensors")
    photo = write_image(tmp_path / "a.png", seed=1)
    (tmp_path / "not-a-folder").write_text("a file where the cache folder should be")
    homeless = CliRunner(env={"EMOLENS_CACHE": str(tmp_path / "not-a-folder" / "cache")})
    result = homeless.invoke(app, ["predict", str(photo), "--model", str(tmp_path / "m.safetensors"), "--format",
                                   "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["predictions"]) == 1
    assert "exporting in memory" in " ".join(result.stderr.split())


def test_ctrl_c_during_predict_keeps_what_finished(setup, tmp_path, monkeypatch):
    from emolens.predict import Predictor

    real = Predictor.predict_iter

    def one_batch_then_ctrl_c(self, inputs):
        for i, results in enumerate(real(self, inputs)):
            if i == 1:
                raise KeyboardInterrupt
            yield results

    monkeypatch.setattr(Predictor, "predict_iter", one_batch_then_ctrl_c)
    args = ["predict", str(setup / "photos"), "--model", str(setup / "m.onnx"), "--batch-size", "2", "--format",
            "json", "--workers", "0"]
    result = runner.invoke(app, args + ["--out", str(tmp_path / "out.json")])
    assert result.exit_code == EXIT_INTERRUPTED
    assert [p["source"].rsplit("/", 1)[1] for p in json.loads((tmp_path / "out.json").read_text())["predictions"]] == [
        "0.png", "1.png"]
    assert "2 of 3" in " ".join(result.stderr.split())
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_INTERRUPTED and len(json.loads(result.stdout)["predictions"]) == 2


def test_ctrl_c_during_index_says_how_to_resume(setup, tmp_path, monkeypatch):
    from emolens.retrieval.index import AffectiveIndex

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AffectiveIndex, "update", interrupted)
    result = runner.invoke(app, ["index", str(setup / "photos"), "--db", str(tmp_path / "db"), "--model",
                                 str(setup / "m.onnx")])
    assert result.exit_code == EXIT_INTERRUPTED and "run the same command again" in " ".join(result.output.split())


@pytest.mark.parametrize("args, words", [
    (["predict", "{photos}", "--workers", "-1"], ["--workers"]),
    (["search", "--emotion", "awe", "--db", "{db}", "-k", str(10**30)], ["-k"]),
    (["serve", "--port", "70000"], ["--port"]),
    (["serve", "--port", "-1"], ["--port"]),
    (["serve", "--max-connections", "0"], ["--max-connections"]),
    (["serve", "--max-files", "0"], ["--max-files"]),
    (["serve", "--max-upload-mb", "-1"], ["--max-upload-mb"]),
    (["serve", "--max-upload-mb", "nan"], ["--max-upload-mb"]),
])
def test_option_ranges_are_checked_by_the_cli(setup, monkeypatch, args, words):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("serve started with a bad option"))
    cannot_run([a.format(photos=setup / "photos", db=setup / "db") for a in args], *words)

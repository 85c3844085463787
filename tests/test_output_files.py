"""Writes that respect the file system: results go to regular files only (atomically), through a symbolic
link to its target, never over a FIFO, socket or device; a failed write is exit 2 with its reason."""

import errno
import io
import json
import os
import socket
import stat
import threading

import pytest
from typer.testing import CliRunner

from helpers import write_image
from helpers import TINY_BACKBONE, make_ldl_dataset, tiny_model
from emolens import cli
from emolens.cli import EXIT_ERROR, app
from emolens.runtime import export_onnx
from emolens.storage import atomic_write_bytes
from emolens.weights import save_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    model = tiny_model().eval()
    export_onnx(model, folder / "m.onnx")
    save_model(model, folder / "torch.safetensors")
    for i in range(2):
        write_image(folder / "photos" / f"{i}.png", seed=i, size=(40, 30))
    assert runner.invoke(app, ["index", str(folder / "photos"), "--db", str(folder / "db"), "--model",
                               str(folder / "m.onnx")]).exit_code == 0
    return folder


def commands(setup, out):
    """Each command that writes a file the user names, writing to ``out``."""
    photos, onnx, db = setup / "photos", setup / "m.onnx", setup / "db"
    return {
        "predict": ["predict", photos, "--model", onnx, "--format", "json", "--out", out],
        "search": ["search", "--emotion", "awe", "--db", db, "--format", "json", "--out", out],
        "export": ["export", "--model", setup / "torch.safetensors", "--onnx", out],
    }


def invoke(args, timeout: float = 120):
    """Run a command in a thread: a write that blocks (a FIFO without a reader) fails the test, not hangs it."""
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=runner.invoke(app, [str(a) for a in args])),
                              daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"{args[0]} blocked on its output"
    result = outcome["result"]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result, " ".join(result.output.split())


@pytest.mark.parametrize("command", ["predict", "search", "export"])
def test_a_link_is_written_through_to_its_target(setup, tmp_path, command):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "results.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    result, said = invoke(commands(setup, link)[command])
    assert result.exit_code == 0, said
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old" and target.stat().st_size > 10
    if command == "export":  # the model's metadata lies beside the file it describes, and the link runs
        assert (tmp_path / "real" / "results.json").is_file() and not (tmp_path / "link.json").exists()
        result, said = invoke(["predict", setup / "photos", "--model", link, "--format", "json"])
        assert result.exit_code == 0, said


@pytest.mark.parametrize("command", ["predict", "search", "export"])
@pytest.mark.parametrize("kind", ["fifo", "socket", "folder"])
def test_a_fifo_socket_or_folder_is_refused_and_left_as_it_was(setup, tmp_path, command, kind):
    out = tmp_path / "out.onnx"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(out))
    else:
        out.mkdir()
    mode = os.lstat(out).st_mode
    result, said = invoke(commands(setup, out)[command])
    assert result.exit_code == EXIT_ERROR and "not a regular file" in said and "out.onnx" in said, said
    assert stat.S_IFMT(os.lstat(out).st_mode) == stat.S_IFMT(mode)
    assert os.listdir(tmp_path) == ["out.onnx"]  # no temporary file left beside it


@pytest.mark.parametrize("command", ["predict", "search", "export"])
def test_a_failed_write_is_exit_2_and_keeps_the_old_file(setup, tmp_path, monkeypatch, command):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result, said = invoke(commands(setup, out)[command])
    assert result.exit_code == EXIT_ERROR and "No space left on device" in said, said
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.onnx"]


def test_explain_refuses_a_file_as_its_folder_and_reports_a_failed_write(setup, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("keep me")
    args = ["explain", setup / "photos", "--model", setup / "torch.safetensors"]
    result, said = invoke([*args, "--out", tmp_path / "file"])
    assert result.exit_code == EXIT_ERROR and "not a folder" in said, said
    assert (tmp_path / "file").read_text() == "keep me"
    for code, words in ((errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")):
        def failing(fd, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", failing)
        result, said = invoke([*args, "--out", tmp_path / "why"])
        assert result.exit_code == EXIT_ERROR and words in said and "0.png" in said, said
        assert not any((tmp_path / "why").iterdir())


def test_benchmark_refuses_a_file_as_its_folder_and_reports_a_failed_write(tmp_path, monkeypatch):
    spec = make_ldl_dataset(tmp_path / "data", per_class=4)
    (tmp_path / "file").write_text("keep me")
    args = ["benchmark", "--data", spec, "--models", "global", "--folds", "2", "--epochs", "1", "--backbone",
            TINY_BACKBONE, "--backbone-weights", "none", "--workers", "0", "--batch-size", "8"]
    result, said = invoke([*args, "--out", tmp_path / "file"])
    assert result.exit_code == EXIT_ERROR and "not a folder" in said, said
    assert (tmp_path / "file").read_text() == "keep me"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result, said = invoke([*args, "--out", tmp_path / "results"])
    assert result.exit_code == EXIT_ERROR and "No space left on device" in said, said


def test_atomic_writes_refuse_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write_bytes(tmp_path / "fifo", b"x")
    (tmp_path / "dangling").symlink_to(tmp_path / "new" / "made.json")
    atomic_write_bytes(tmp_path / "dangling", b"x")  # a link to a file not made yet: written through
    assert (tmp_path / "new" / "made.json").read_bytes() == b"x" and (tmp_path / "dangling").is_symlink()


class FullStream(io.TextIOWrapper):
    """Standard output on a full disk: every write fails."""

    def __init__(self):
        super().__init__(io.BytesIO())

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_results_that_cannot_reach_standard_output_are_exit_2(setup, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["emolens", "list-models"])  # a table that rich prints
    monkeypatch.setattr("sys.stdout", FullStream())
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == EXIT_ERROR
    assert "No space left on device" in " ".join(capsys.readouterr().err.split())


def test_a_results_file_takes_the_format_its_name_says_unless_format_says_otherwise(setup, tmp_path):
    photos, onnx, db = setup / "photos", setup / "m.onnx", setup / "db"
    predict = ["predict", photos, "--model", onnx, "--out"]
    invoke([*predict, tmp_path / "scores.csv"])
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("source,emotion,probability,") and len(rows) == 3
    invoke([*predict, tmp_path / "scores.JSON"])
    assert len(json.loads((tmp_path / "scores.JSON").read_text())["predictions"]) == 2
    invoke([*predict, tmp_path / "scores.txt"])
    assert "emotion" in (tmp_path / "scores.txt").read_text().splitlines()[1]  # the table, as on a terminal
    invoke([*predict, tmp_path / "chosen.csv", "--format", "json"])
    assert len(json.loads((tmp_path / "chosen.csv").read_text())["predictions"]) == 2
    invoke(["search", "--emotion", "awe", "--db", db, "--out", tmp_path / "hits.json"])
    assert "hits" in json.loads((tmp_path / "hits.json").read_text())
    result, said = invoke(["search", "--emotion", "awe", "--db", db, "--out", tmp_path / "hits.csv"])
    assert result.exit_code == 0 and not (tmp_path / "hits.csv").read_text().lstrip().startswith("{")

"""Every command, driven with random option values and file states (missing, empty, garbage, a folder, a
FIFO, a link, a full or read-only disk), ends in a result or a message: exit 0, 2 or 3, never a traceback,
never a hang."""

import errno
import os
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from helpers import write_image
from helpers import TINY_BACKBONE, make_ldl_dataset, tiny_model
from emolens.cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, app
from emolens.runtime import export_onnx
from emolens.weights import save_model

runner = CliRunner(env={"COLUMNS": "120"})


def fuzz(examples: int):
    """Fixed examples (CI sees the same ones each run), no deadline: a command may take seconds."""
    return settings(derandomize=True, deadline=None, database=None, max_examples=examples,
                    suppress_health_check=list(HealthCheck))
#: Injected when a file is written: a full disk, a read-only file system, no permission (root ignores chmod).
WRITE_FAILURES = (errno.ENOSPC, errno.EROFS, errno.EACCES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files in every state a command may meet, by name."""
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model().eval()
    export_onnx(model, root / "tiny.onnx")
    save_model(model, root / "torch.safetensors")
    for i in range(3):
        write_image(root / "photos" / f"{i}.png", seed=i, size=(40, 30))
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.png").write_bytes(b"\x89PNG not really" * 20)
    (root / "garbage.onnx").write_bytes(b"not a model" * 20)
    (root / "garbage.safetensors").write_bytes(b"\xff" * 64)
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "fifo.onnx")
    (root / "link.png").symlink_to(root / "photos" / "0.png")
    (root / "out-link.json").symlink_to(root / "a-folder" / "linked.json")  # an output written through a link
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    (root / "a-folder").mkdir()
    (root / "a-file.txt").write_text("keep")
    spec = make_ldl_dataset(root / "data", per_class=4)
    assert runner.invoke(app, ["index", str(root / "photos"), "--db", str(root / "db"), "--model",
                               str(root / "tiny.onnx")]).exit_code == 0
    (root / "empty-db").mkdir()
    (root / "empty-db" / "index.sqlite").write_bytes(b"")
    (root / "garbage-db").mkdir()
    (root / "garbage-db" / "index.sqlite").write_bytes(b"not sqlite" * 100)
    assert runner.invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(root / "run"), "--epochs", "1",
                               "--backbone", TINY_BACKBONE, "--backbone-weights", "none", "--workers", "0",
                               "--batch-size", "8"]).exit_code == 0
    return root, spec


INPUTS = ("photos", "photos/0.png", "link.png", "empty.png", "garbage.png", "fifo.png", "dangling.png", "missing.png",
          "a-folder")
MODELS = ("tiny.onnx", "torch.safetensors", "run", "garbage.onnx", "garbage.safetensors", "fifo.onnx", "missing.onnx",
          "a-folder")
OUTPUTS = ("new/out.json", "out.json", "out-link.json", "dangling.png", "a-file.txt", "a-folder", "fifo.png")
DBS = ("db", "missing-db", "empty-db", "garbage-db", "a-file.txt", "fifo.png")


def option(good, *bad):
    """Mostly a good value (a command with many options then often runs to the end), sometimes a bad one."""
    # 3 rolls of 20 choose a bad value; not the ends of the range, which Hypothesis draws more often
    return st.integers(0, 19).flatmap(lambda roll: st.one_of(*bad) if roll in (5, 9, 13) and bad else good)


def at(names, good: int = 1):
    """One of the ``world`` files named in ``names``; the first ``good`` are usable."""
    return option(st.sampled_from(names[:good]), st.sampled_from(names[good:])).map(lambda n: "@" + n)


def choice(good, bad):
    return option(st.sampled_from(good), st.sampled_from(bad))


huge = st.sampled_from([2**31, 2**63, 10**30, -(10**30)])  # past C ints, SQLite's and the ports' ranges
counts = option(st.integers(1, 40), st.integers(-3, 0), huge)
sizes = option(st.floats(0.01, 100), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 0).map(float))
emotions = option(st.sampled_from(["awe", "AWE", "sadness"]), st.sampled_from(["joy", ""]), st.text(max_size=12))
ranges = option(st.sampled_from(["0:1", "-1:0.5", "0.5", ":0"]),
                st.sampled_from(["0.5:0.1", "-2:3", "nan:nan", ":", "inf", "1e999", "awe"]), st.text(max_size=12))
write_failures = option(st.just(None), st.sampled_from(WRITE_FAILURES))


def run(root: Path, args: list, write_failure: int | None):
    """Invoke ``args`` (names of ``world`` files made absolute) with writes failing as asked, in a thread
    so that a hang fails the test."""
    argv = [str(root / a[1:]) if isinstance(a, str) and a.startswith("@") else str(a) for a in args]
    outcome = {}
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr("uvicorn.run", lambda *a, **k: None)  # serve checks its options, then would listen
        if write_failure is not None:
            def failing(fd):
                raise OSError(write_failure, os.strerror(write_failure))

            patch.setattr(os, "fsync", failing)
        worker = threading.Thread(target=lambda: outcome.update(result=runner.invoke(app, argv)), daemon=True)
        worker.start()
        worker.join(180)
    assert not worker.is_alive(), f"hung: emolens {' '.join(argv)}"
    result = outcome["result"]
    said = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"emolens {' '.join(argv)}: {result.exception!r}\n{said}"
    assert "Traceback" not in said, said
    assert result.exit_code in (EXIT_OK, EXIT_ERROR, EXIT_SOME_FAILED), f"emolens {' '.join(argv)}: {result.exit_code}\n{said}"
    return result


@fuzz(200)
@given(data=st.data())
def test_predict_index_search_export(world, data):
    root, _ = world
    draw = data.draw
    inputs = st.lists(at(INPUTS, good=3), min_size=1, max_size=3)
    command = draw(st.sampled_from(["predict", "index", "search", "export"]))
    if command == "predict":
        args = ["predict", *draw(inputs), "--model", draw(at(MODELS, good=3)),
                "--format", draw(choice(["table", "json", "csv"], ["xml"])), "--workers", draw(option(
                    st.integers(0, 4), st.integers(-3, -1), huge)), "--batch-size", draw(counts),
                "--backend", draw(choice(["auto", "onnx", "torch"], ["tf"])),
                "--device", draw(choice(["cpu"], ["auto", "cuda:3", "mps", "tpu"]))]
        if draw(st.booleans()):
            args += ["--out", draw(at(OUTPUTS, good=3))]
    elif command == "index":
        args = ["index", *draw(inputs), "--db", draw(at(("new-db", *DBS), good=2)),
                "--model", draw(at(MODELS)), "--batch-size", draw(counts)]
    elif command == "search":
        args = ["search", "--db", draw(at(DBS)), "-k", draw(counts),
                "--format", draw(choice(["table", "json"], ["yaml"]))]
        how = draw(st.sampled_from(["image", "emotion", "ranges"]))
        args += [draw(at(INPUTS, good=3))] if how == "image" else ["--emotion", draw(emotions)] if how == "emotion" else []
        for name in ("--valence", "--arousal"):
            if how == "ranges" or draw(st.booleans()):
                args += [name, draw(ranges)]
        if draw(st.booleans()):
            args += ["--out", draw(at(OUTPUTS, good=3))]
        if how == "image":
            args += ["--model", draw(at(MODELS))]
    else:
        args = ["export", "--onnx", draw(at(OUTPUTS, good=3)), "--model", draw(at(MODELS[1:], good=2))]
    run(root, args, draw(write_failures))


@fuzz(40)
@given(data=st.data())
def test_serve_and_explain(world, data):
    root, _ = world
    draw = data.draw
    if draw(st.booleans()):
        args = ["serve", "--model", draw(at(MODELS, good=3)), "--port", draw(option(st.integers(0, 65535), huge)),
                "--max-connections", draw(option(st.integers(64, 10**6), huge)), "--max-files", draw(counts),
                "--max-upload-mb", draw(sizes)]
        if draw(st.booleans()):
            args += ["--db", draw(at(DBS))]
    else:
        args = ["explain", *draw(st.lists(at(INPUTS, good=3), min_size=1, max_size=2)),
                "--out", draw(at(("new", "a-folder", *OUTPUTS[2:5], "fifo.png"), good=2)),
                "--model", draw(at(MODELS[1:], good=2)), "--method", draw(choice(["gradcam", "gradcam++"], ["lime"])),
                "--device", draw(choice(["cpu"], ["cuda:1", "x"]))]
        if draw(st.booleans()):
            args += ["--target", draw(emotions)]
    run(root, args, draw(write_failures))


@fuzz(40)
@given(data=st.data())
def test_train_benchmark_evaluate_datasets(world, data):
    root, spec = world
    draw = data.draw
    specs = choice([spec, spec + ":limit=12"], [f"flickr_ldl={root / 'missing'}", f"flickr_ldl={root / 'photos'}",
                                                 "nosuchkind=/x", spec + ":bogus=1", spec + ":limit=0", "no-equals-sign"])
    command = draw(st.sampled_from(["train", "benchmark", "evaluate", "datasets"]))
    if command == "datasets":
        args = ["datasets", "info", draw(specs)] + (["--check-images"] if draw(st.booleans()) else [])
    elif command == "evaluate":
        args = ["evaluate", draw(at(("run", *MODELS))), "--split", draw(choice(["test", "val", "all"], ["x"])),
                "--batch-size", draw(counts), "--workers", draw(option(st.just(0), st.integers(-2, -1))),
                "--precision", draw(choice(["fp32", "bf16"], ["fp16", "int4"]))]
        if draw(st.booleans()):
            args += ["--data", draw(specs)]
    else:
        small = lambda low, high: option(st.integers(low, high), st.integers(-2, low - 1))  # noqa: E731
        out = draw(at(("fresh", "a-file.txt", "fifo.png")))
        out = tempfile.mkdtemp(dir=root, prefix="run-") if out == "@fresh" else out  # no run resumes another
        args = [command, "--data", draw(specs), "--out", out,
                "--backbone", TINY_BACKBONE, "--backbone-weights", "none",
                "--workers", draw(option(st.just(0), st.integers(-2, -1))), "--epochs", draw(small(1, 1)),
                "--batch-size", draw(option(st.integers(1, 64), st.integers(-2, 0), st.just(10**9))),
                "--lr", draw(option(st.floats(1e-4, 1.0), st.floats(allow_nan=True, allow_infinity=True))),
                "--accumulate", draw(small(1, 3)), "--patience", draw(small(0, 3)),
                "--cache-views", draw(small(0, 2)), "--tune-stages", draw(small(0, 2)),
                "--warmup", draw(small(0, 1)), "--precision", draw(choice(["fp32", "bf16"], ["fp16", "int4"])),
                "--optimizer", draw(choice(["sgd", "adamw"], ["lion"])),
                "--select", draw(choice(["loss", "accuracy", "macro_f1"], ["ccc", "speed"])),
                "--task", draw(choice(["emotion", "polarity", "distribution"], ["va", "x"])),
                "--device", draw(choice(["cpu"], ["cuda", "x"]))]
        if draw(st.booleans()):
            args += ["--limit", draw(small(4, 30))]
        model = draw(choice(["global", "global:loss=kl"], ["global:loss=zzz", "nosuchmodel", "global:"]))
        if command == "train":
            args += ["--model", model, "--fold", draw(small(0, 1)),
                     "--protocol", draw(choice(["split", "kfold"], ["official", "x"]))]
        else:
            args += ["--models", model, "--folds", draw(small(2, 3))]
        if draw(st.booleans()):
            args += ["--freeze-backbone"]
    run(root, args, draw(write_failures))

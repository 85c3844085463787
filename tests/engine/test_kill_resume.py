"""SIGKILL during `emolens train` at several points, then --resume: the run ends exactly where an
uninterrupted run at the same seed ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from helpers import TINY_BACKBONE, make_ldl_dataset

EPOCHS = 6


def command(spec: str, out) -> list[str]:
    return [sys.executable, "-m", "emolens", "train", "--model", "global:loss=multitask", "--data", spec,
            "--out", str(out), "--backbone", TINY_BACKBONE, "--backbone-weights", "none", "--epochs", str(EPOCHS),
            "--batch-size", "4", "--workers", "0", "--optimizer", "adamw", "--lr", "3e-3", "--patience", "0"]


def epochs_done(out) -> int:
    try:
        return len(json.loads((out / "last.json").read_text())["history"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_when(proc: subprocess.Popen, out, epochs: int, delay: float, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``epochs`` epochs were saved; True if it died mid-run."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if epochs_done(out) >= epochs:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            return False
        time.sleep(0.01)
    proc.wait()
    return False


def test_train_survives_repeated_sigkill(tmp_path):
    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(command(spec, tmp_path / "whole"), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    kills = 0
    for attempt, delay in enumerate((0.0, 0.05, 0.15)):  # right after a save, and part-way into the next epoch
        args = command(spec, out) + (["--resume"] if attempt else [])
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += kill_when(proc, out, epochs=attempt + 1, delay=delay)
    assert kills >= 2, "the kills did not land mid-run"
    assert epochs_done(out) < EPOCHS
    subprocess.run(command(spec, out) + ["--resume"], check=True, env=env, capture_output=True)

    whole, resumed = (json.loads((d / "last.json").read_text()) for d in (tmp_path / "whole", out))
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, EPOCHS + 1))
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    a, b = load_file(tmp_path / "whole" / "best.safetensors"), load_file(out / "best.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    metrics = [json.loads((d / "metrics.json").read_text())["test"] for d in (tmp_path / "whole", out)]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]

"""The commands a user types under torchrun (2 CPU processes, gloo): `emolens train` and `emolens benchmark`
finish, write their figures once, and score every test image exactly once, as a single process does."""

import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import TINY_BACKBONE, make_ldl_dataset
from emolens.data import Protocol, load_dataset
from emolens.data.joint import open_datasets
from emolens.engine import TrainConfig, evaluate
from emolens.engine.benchmark import retrieval_figures, slug
from emolens.weights import load_model

TINY = ["--backbone", TINY_BACKBONE, "--backbone-weights", "none", "--workers", "0", "--batch-size", "4"]
#: Every registered model but `joint` (tested below on two datasets); multigap's second stream has parameters
#: its blocks never read (ConvNeXt's head norm), as VGG16's fc6/fc7 are in paper 004's places stream.
MODELS = ["global", "apse", "maiafa:width=16,groups=2", "multigap:streams=test_convnext",
          "mlrcnn:fpn=16,representation=32,k=4,proposals=20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "emolens", *args]
    env = {**os.environ, "TMPDIR": str(cwd), "COLUMNS": "200"}  # torchrun's log folders stay in the test's folder
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def single_process_figures(run, spec, part):
    dataset = load_dataset(spec)
    rows = getattr(Protocol.load(run / "protocol.json", dataset).folds[0], part)
    return evaluate(load_model(run), dataset, rows, TrainConfig(workers=0, batch_size=4), progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_ldl_dataset(tmp_path_factory.mktemp("ddp") / "data", per_class=10)


@pytest.mark.parametrize("model", MODELS)
def test_train_under_torchrun_finishes_and_scores_each_test_image_once(model, data, tmp_path):
    done = torchrun("train", "--model", model, "--data", data, "--out", "run", "--epochs", "2", "--accumulate", "2",
                    *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert done.stdout.count("best epoch") == 1  # rank 0 reports
    for part in ("test", "val"):
        alone = single_process_figures(tmp_path / "run", data, part)
        figures = metrics[part]
        assert figures["n"] == alone["n"] == len(json.loads((tmp_path / "run" / "protocol.json").read_text())
                                                  ["folds"][0][part])
        assert {k: figures[k] for k in alone} == pytest.approx(alone, rel=1e-4, abs=1e-6, nan_ok=True)


def test_joint_model_trains_under_torchrun(tmp_path):
    first = make_ldl_dataset(tmp_path / "a", per_class=6)
    second = make_ldl_dataset(tmp_path / "b", per_class=12, classes=(1, 3))
    done = torchrun("train", "--model", "global", "--data", first, "--data", second, "--out", "run", "--epochs", "1",
                    *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    dataset = open_datasets([first, second])
    test = Protocol.load(tmp_path / "run" / "protocol.json", dataset).folds[0].test
    assert metrics["test"]["n"] == len(test)
    assert [figures["n"] for figures in metrics["test_by_dataset"].values()] == [len(r) for r in dataset.member_rows(test)]


def test_benchmark_under_torchrun_counts_each_test_image_once(data, tmp_path):
    done = torchrun("benchmark", "--models", " ".join(MODELS), "--data", data, "--folds", "2", "--epochs", "1",
                    "--out", "bench", "--retrieval", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("results:") == 1
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    protocol = json.loads((tmp_path / "bench" / "protocol.json").read_text())
    dataset = load_dataset(data)
    folds = Protocol.load(tmp_path / "bench" / "protocol.json", dataset).folds
    assert list(results["models"]) == MODELS
    for model, figures_by_fold in results["models"].items():
        assert [f["n"] for f in figures_by_fold["folds"]] == [len(f["test"]) for f in protocol["folds"]]
        for k, figures in enumerate(figures_by_fold["folds"]):
            alone = evaluate(load_model(tmp_path / "bench" / slug(model) / f"fold{k}"), dataset, folds[k].test,
                             TrainConfig(workers=0, batch_size=4), progress=False)
            assert {m: figures[m] for m in alone} == pytest.approx(alone, rel=1e-4, abs=1e-6, nan_ok=True), model
            best = load_model(tmp_path / "bench" / slug(model) / f"fold{k}")
            ranked = retrieval_figures(best, dataset, folds[k], TrainConfig(workers=0, batch_size=4), None, False)
            assert {m: figures[m] for m in ranked} == pytest.approx(ranked, rel=1e-4, abs=1e-6), model


def test_a_command_under_torchrun_leaves_its_process_group(tmp_path, monkeypatch):
    """A rank that exits with its process group alive may abort another still talking to it: the command ends it."""
    import torch.distributed as dist

    from emolens.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(sys, "argv", ["emolens", "list-models"])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code in (0, None) and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

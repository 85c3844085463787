import os

import pytest
import torch

from helpers import tiny_model
from emolens.checkpoints import load_checkpoint
from emolens.engine import TrainConfig, evaluate, fit
from emolens.engine.placement import Placement, loader_workers, resolve_device


def test_device_names_resolve_or_say_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") in (torch.device("cpu"), torch.device("mps"))
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="fp16 autocast needs a GPU"):
        Placement.resolve("cpu", "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        Placement.resolve("cpu", "int8")


def test_under_torchrun_auto_takes_this_process_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="2 CUDA GPU"):
        resolve_device("cuda:3")
    assert Placement(torch.device("cuda", 1)).distributed_backend() == "nccl"
    assert Placement(torch.device("cpu")).distributed_backend() == "gloo"


@pytest.mark.parametrize("freeze", [False, True])
def test_every_batch_goes_through_the_placement_and_bf16_autocast_runs_on_cpu(tiny, tmp_path, monkeypatch, freeze):
    ds, fold = tiny
    placed, dtypes = [], []
    real = Placement.batch

    def spy(self, inputs):
        out = real(self, inputs)
        if isinstance(inputs, dict) and ("images" in inputs or "pooled" in inputs):
            placed.append((self.device.type, self.precision))
        return out

    monkeypatch.setattr(Placement, "batch", spy)
    model = tiny_model()
    model.classifier.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    config = TrainConfig(epochs=2, batch_size=4, workers=0, optimizer="adamw", lr=3e-3, patience=None,
                         device="cpu", precision="bf16", channels_last=True, freeze_backbone=freeze)
    result = fit(model, ds, fold, tmp_path / "run", config, progress=False)
    batches_per_pass = [-(-len(rows) // 4) for rows in (fold.train, fold.val)]
    assert len(placed) == 2 * sum(batches_per_pass) and set(placed) == {("cpu", "bf16")}
    assert set(dtypes) == {torch.bfloat16}  # the forward passes ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    state, _ = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert result.val_metrics["n"] == len(fold.val)
    test = evaluate(model, ds, fold.test, config, cache_dir=tmp_path / "run" / "cache" if freeze else None)
    assert test["n"] == len(fold.test)


def test_a_compiled_training_step_trains_as_the_eager_one(tiny, tmp_path):
    from torch._dynamo.utils import counters

    ds, fold = tiny
    histories = []
    for backend in (None, "eager"):  # dynamo's eager backend: the tracing path without minutes of C++ compiling
        torch.manual_seed(0)
        counters.clear()
        config = TrainConfig(epochs=1, batch_size=4, workers=0, optimizer="adamw", lr=3e-3, patience=None,
                             device="cpu", compile_backend=backend)
        result = fit(tiny_model(), ds, fold, tmp_path / str(backend), config, progress=False)
        histories.append(result.history[0]["train_loss"])
        assert (sum(counters["frames"].values()) > 0) == (backend is not None)
    assert histories[0] == pytest.approx(histories[1], rel=1e-5)


def test_sync_batchnorm_is_refused_off_the_gpu():
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        TrainConfig(device="cpu", sync_batchnorm=True).placement()


def test_loader_workers_share_the_cpus_among_torchruns_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers() == 16  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers() == 4
    assert TrainConfig().workers == 4  # the default of a run
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader_workers() == 1

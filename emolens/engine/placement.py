"""Where tensors live and in what precision: the one place in emolens that decides it.

Models, losses and metrics are device-agnostic; the engine asks a :class:`Placement` to move a
model or a batch, to run a forward pass under autocast, and for the gradient scaler fp16 needs.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def loader_workers() -> int:
    """Image-decoding processes for one training process: the CPUs it may run on, shared among the processes
    torchrun starts on this machine (a GPU each), at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, the GPU of this process's ``LOCAL_RANK`` under torchrun; else Apple's
    MPS; else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device that is not there is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU")
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but this PyTorch sees no Apple GPU")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


@dataclass(frozen=True)
class Placement:
    """A device, an autocast precision and a memory format, applied to models and batches alike."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile_backend: str | None = None  # torch.compile's backend for the training step ("inductor"); None: eager
    sync_batchnorm: bool = False  # BatchNorm statistics over every rank's batch (DDP on GPUs)

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "fp32", channels_last: bool = False,
                compile_backend: str | None = None, sync_batchnorm: bool = False) -> "Placement":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        where = resolve_device(device)
        if precision == "fp16" and where.type == "cpu":
            raise ValueError("fp16 autocast needs a GPU; use bf16 on a CPU")
        if sync_batchnorm and where.type != "cuda":
            raise ValueError("SyncBatchNorm synchronises GPUs (NCCL); on a CPU leave it off")
        if where.type == "cuda":  # every model sees fixed-size crops: cuDNN's autotuned kernels pay off
            torch.backends.cudnn.benchmark = True
        return cls(where, precision, channels_last, compile_backend, sync_batchnorm)

    @property
    def pin_memory(self) -> bool:
        """Page-locked host batches, so copies to a GPU can overlap with compute."""
        return self.device.type == "cuda"

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def tensor(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device, non_blocking=self.pin_memory)
        if self.channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        return value

    def batch(self, inputs: Any) -> Any:
        """Tensors in (nested dicts, lists and tuples of) ``inputs`` on the device; anything else as it is."""
        if isinstance(inputs, torch.Tensor):
            return self.tensor(inputs)
        if isinstance(inputs, dict):
            return {k: self.batch(v) for k, v in inputs.items()}
        if isinstance(inputs, (list, tuple)):
            return type(inputs)(self.batch(v) for v in inputs)
        return inputs

    def autocast(self):
        """The forward pass's precision (a no-op for fp32)."""
        dtype = PRECISIONS[self.precision]
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, which fp16 needs against underflowing gradients (disabled otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def training_step(self, module: nn.Module, world: int, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` as the training loop calls it: with synchronised BatchNorm (when asked) and wrapped in
        DDP when several processes train, then compiled (when asked). Parameters and state stay ``module``'s."""
        if world > 1:
            if self.sync_batchnorm:
                module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            module = DistributedDataParallel(module, find_unused_parameters=find_unused_parameters,
                                             device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.compile_backend:
            module.compile(backend=self.compile_backend)
        return module

    def distributed_backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

"""Multi-process training with PyTorch's own DDP: ``torchrun --nproc_per_node N emolens train ...``."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(backend: str = "gloo") -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun (``backend``: nccl for CUDA
    tensors, gloo for CPU ones; each process's GPU is its ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without DDP."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-item list without DDP)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave(together: bool) -> None:
    """End this process's part in the process group; ``together``: after every rank got here (a rank that
    exits while another still talks to it aborts that one)."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN statistics), which DDP only syncs before a forward pass."""
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)

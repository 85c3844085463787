"""Reading and writing weights safely: safetensors plus JSON metadata, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .storage import CheckpointError, atomic_write, atomic_write_json


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` state dict read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file can fail in many ways; all mean "not usable"
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict, half: bool = False) -> Path:
    """Write ``path`` (.safetensors) and its metadata ``path.with_suffix('.json')``, each atomically."""
    path = Path(path).with_suffix(".safetensors")
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        tensors[k] = v.contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "emolens": "1"}))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata (the model card) beside the checkpoint ``path``."""
    path = Path(path).with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: its metadata {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: metadata is not a JSON object")
    return meta


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as a ``.safetensors`` file's header lists it; no tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a foreign file can fail in many ways; all mean "not usable"
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (as float32) and metadata of a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path).with_suffix(".safetensors")
    meta = read_meta(path)
    state = read_state_dict(path)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, meta


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load every tensor of ``state`` into ``model`` or fail naming what does not fit; no partial loads."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})"
        )
    model.load_state_dict(state)

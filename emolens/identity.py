"""Which model made a result: a model *is* its weights' content (a sha256), named for people by its spec.

Everything that remembers a model (an index, the ONNX export cache, the feature cache) keys on this
digest, so two models with the same spec and other weights are never taken for one another. Nothing
here imports PyTorch until a digest of live tensors is asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping


#: An int8 model's digest: its fp32 model's, with this suffix (:func:`emolens.quantize.int8_meta`).
INT8_SUFFIX = "-int8"


@dataclass(frozen=True)
class ModelIdentity:
    digest: str  # sha256 of the weights' content
    name: str  # the spec, for messages

    @property
    def precision(self) -> str:
        """"int8" for a quantised model, else "fp32"."""
        return "int8" if self.digest.endswith(INT8_SUFFIX) else "fp32"

    @property
    def fp32_digest(self) -> str:
        """The digest of the fp32 weights this model was made from (its own, for an fp32 model)."""
        return self.digest.removesuffix(INT8_SUFFIX)

    def __str__(self) -> str:
        return f"{self.name} (weights {self.digest[:12]})"


def weights_digest(state: Mapping) -> str:
    """sha256 over a state dict's tensors in name order: name, dtype, shape and bytes of each."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def spec_name(spec: Mapping | None) -> str:
    """``NAME[:key=value,...] on BACKBONE`` for a model spec, as a person would write it."""
    if not spec:
        return "an unnamed model"
    args = ",".join(f"{k}={v}" for k, v in sorted((spec.get("args") or {}).items()))
    return f"{spec.get('name', '?')}{':' + args if args else ''} on {spec.get('backbone', '?')}"


def model_identity(model) -> ModelIdentity:
    """The identity of a live PyTorch model: every tensor of its state, backbone included."""
    return ModelIdentity(weights_digest(model.state_dict()), spec_name(getattr(model, "spec", None)))


@lru_cache(maxsize=4)
def source_digest(root: Path | None = None) -> str:
    """sha256 of the Python source of the installed ``emolens`` package (or of the package at ``root``):
    an edit to any model's code changes it."""
    root = Path(__file__).resolve().parent if root is None else Path(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root).as_posix()}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()

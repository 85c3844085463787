"""The model registry: ``create_model("NAME[:key=value,...]")`` and ``list_models()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    summary: str
    paper: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, summary: str, paper: str = "") -> Callable:
    """Class or function decorator that makes a model available to :func:`create_model` by name."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, summary, paper)
        return builder

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entries() -> list[ModelEntry]:
    return [_REGISTRY[n] for n in list_models()]


def _value(text: str) -> Any:
    """A spec value as bool, int, float or str."""
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"global:loss=multitask,lambda=0.4"`` -> ``("global", {"loss": "multitask", "lambda": 0.4})``."""
    name, _, rest = spec.partition(":")
    args: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"model argument {item!r} in {spec!r} is not key=value")
        args[key.strip()] = _value(val.strip())
    return name.strip(), args


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]

"""Models: one module per published system, all built through the registry."""

from __future__ import annotations

import inspect
from typing import Any

from ..backbones import DEFAULT_BACKBONE
from ..losses import DEFAULT_LOSS, split_loss_arguments
from ..taxonomy import Taxonomy
from . import apse, global_model, joint, maiafa, mlrcnn, multigap  # noqa: F401  (registers the models)
from .base import TASKS, EmotionModel
from .registry import get_entry, list_models, model_entries, parse_model_spec, register_model


COMMON_ARGUMENTS = frozenset({"taxonomy", "task", "backbone", "backbone_weights"})


def model_argument_names(name: str) -> set[str]:
    """Keyword arguments the model ``name`` accepts beyond the common ones."""
    builder = get_entry(name).builder
    names = set()
    for cls in inspect.getmro(builder) if inspect.isclass(builder) else [builder]:
        init = cls.__init__ if inspect.isclass(builder) else cls
        for p in inspect.signature(init).parameters.values():
            if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"):
                names.add(p.name)
        if cls is EmotionModel:
            break
    return names - COMMON_ARGUMENTS


def create_model(
    spec: str,
    taxonomy: Taxonomy | str = "mikels",
    task: str = "emotion",
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = "imagenet",
    **kwargs: Any,
) -> EmotionModel:
    """Build a registered model from ``"NAME[:key=value,...]"``; keyword arguments override the spec's.

    ``loss=NAME`` and the loss' options (``lambda``, ...) in the spec are kept in ``model.spec["loss"]``
    for the training engine.
    """
    name, args = parse_model_spec(spec)
    args.update(kwargs)
    loss_name, loss_args, args = split_loss_arguments(args)
    entry = get_entry(name)
    unknown = set(args) - model_argument_names(name)
    if unknown:
        raise ValueError(f"model {name!r} has no argument(s) {', '.join(sorted(unknown))}")
    model = entry.builder(taxonomy=taxonomy, task=task, backbone=backbone, backbone_weights=backbone_weights, **args)
    model.spec = {"name": name, "args": args, "task": model.task, "taxonomy": model.source_taxonomy.to_dict(),
                  "backbone": backbone, "backbone_weights": backbone_weights,
                  "loss": {"name": loss_name or model.default_loss or DEFAULT_LOSS[model.task], "args": loss_args}}
    return model


__all__ = ["TASKS", "EmotionModel", "create_model", "list_models", "model_entries", "parse_model_spec", "register_model"]

"""Model weights that carry their meaning: tensors in safetensors, the recipe to rebuild in JSON.

A saved model holds its spec (name, arguments, task, taxonomy, backbone), preprocessing,
and whatever the writer adds (dataset, split, metrics, versions). A model trained on a frozen
bundled backbone stores only its own layers; the backbone comes from the installed package.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .checkpoints import CheckpointError, header_shapes, load_checkpoint, load_into, read_meta, save_checkpoint
from .storage import DEFAULT_MODEL, resolve_weights
from .models import EmotionModel, create_model
from .models.base import WEIGHTS_IN_CHECKPOINT
from .models.registry import get_entry
from .taxonomy import Taxonomy

FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    import timm
    import torchvision

    from . import __version__

    return {"emolens": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def model_state(model: EmotionModel, include_backbone: bool | Sequence[str] = True) -> dict[str, torch.Tensor]:
    """The tensors to save: all, all but the backbone's (``False``), or of the backbone only the parts named
    (``["backbone.net.blocks.6", ...]``: tuned stages over bundled weights)."""
    state = model.state_dict()
    if include_backbone is True:
        return state
    kept = tuple(f"{part}." for part in include_backbone or ())
    return {k: v for k, v in state.items() if not k.startswith("backbone.") or k.startswith(kept)}


def save_model(model: EmotionModel, path: str | Path, include_backbone: bool | Sequence[str] = True,
               half: bool = False, **meta) -> Path:
    """Write ``path`` (.safetensors + .json). Leaving out the backbone, or all of it but some parts
    (:func:`model_state`), needs a bundled-weights backbone: the rest comes from its package."""
    if include_backbone is not True and model.spec.get("backbone_weights") != "imagenet":
        raise ValueError("only a model on bundled backbone weights can be saved without its backbone")
    if model.limitations:
        meta["card"] = {**meta.get("card", {}), "limitations": model.limitations}
    full_meta = {"format": FORMAT_VERSION, "spec": model.spec, "preprocessing": model.preprocessing.to_dict(),
                 "include_backbone": include_backbone if isinstance(include_backbone, bool) else list(include_backbone),
                 "versions": library_versions(), **meta}
    return save_checkpoint(path, model_state(model, include_backbone), full_meta, half=half)


def model_from_meta(meta: dict, backbone_weights: str | None = None) -> EmotionModel:
    spec = meta.get("spec")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError("checkpoint metadata has no model spec")
    try:
        args = dict(spec.get("args", {}))
        for name in get_entry(spec["name"]).builder.weight_file_args:
            if args.get(name):
                args[name] = WEIGHTS_IN_CHECKPOINT
        model = create_model(spec["name"], taxonomy=Taxonomy.from_dict(spec["taxonomy"]), task=spec["task"],
                             backbone=spec["backbone"], backbone_weights=backbone_weights, **args)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint metadata does not describe a model emolens can build: {e}") from e
    model.spec = spec
    return model


def load_model(source: str | Path = DEFAULT_MODEL) -> EmotionModel:
    """Rebuild a saved model exactly from its metadata and load its tensors (no partial loads). The
    metadata is checked against the tensor shapes in the weights file's header before anything is
    allocated, so a card that describes another (say, far larger) model is refused at no cost."""
    path = resolve_weights(source)
    meta = read_meta(path)
    with_backbone = meta.get("include_backbone", True)
    check_card(meta, path, with_backbone)
    state, _ = load_checkpoint(path)
    model = model_from_meta(meta, backbone_weights=None if with_backbone is True else meta["spec"].get("backbone_weights"))
    expected = model_state(model, with_backbone)
    load_into(_Subset(model, expected.keys()), state, source=str(path))
    model.meta = meta
    return model.eval()


def init_from(model: EmotionModel, source: str | Path, parts: Sequence[str] | None = None) -> None:
    """Load a saved model's tensors into ``model`` (transfer learning): the two must have the same
    architecture and classes; a checkpoint saved without its backbone leaves the backbone as it is.
    ``parts`` (submodule names, e.g. ``["detector"]``) loads only those, all of them, from a model that
    may differ elsewhere."""
    state, meta = load_checkpoint(resolve_weights(source))
    ours = model.state_dict()
    if parts and "backbone" in parts:
        state = onto_named_backbone(state, model.named_backbone)
    if parts:
        theirs, mine = meta.get("spec", {}).get("backbone"), model.spec.get("backbone")
        read_features = [p for p in parts if p != "backbone"]
        if read_features and "backbone" not in parts and theirs and theirs != mine:
            # a detector (or head) learned on one network's features reads nothing sensible from another's
            raise CheckpointError(f"{source}: its {', '.join(read_features)} learned on backbone {theirs}'s features; "
                                  f"this model's backbone is {mine}: train it on {mine}, or take the backbone too")
        prefixes = tuple(f"{p}." for p in parts)
        for part, prefix in zip(parts, prefixes):
            if not any(k.startswith(prefix) for k in ours):
                raise ValueError(f"the model has no part {part!r} to initialise")
            if not any(k.startswith(prefix) for k in state):
                raise CheckpointError(f"{source}: no tensors of part {part!r}")
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
        missing = [k for k in ours if k.startswith(prefixes) and k not in state and not bundled_in_both(k, meta, model)]
        if missing:
            raise CheckpointError(f"{source}: part tensors missing, e.g. {missing[0]}")
    unknown = [k for k in state if k not in ours]
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensor(s) the model does not have, e.g. {unknown[0]}")
    load_into(_Subset(model, state.keys()), state, source=str(source))


def onto_named_backbone(state: dict, named_backbone: str) -> dict:
    """``state`` with a one-network checkpoint's ``backbone.*`` tensors renamed to where the model keeps the network
    its spec names (``named_backbone``, e.g. multigap's first stream); as it was when the two agree."""
    prefix = f"{named_backbone}."
    if prefix == "backbone." or any(k.startswith(prefix) for k in state):
        return state
    return {prefix + k.removeprefix("backbone.") if k.startswith("backbone.") else k: v for k, v in state.items()}


def bundled_in_both(key: str, meta: dict, model: EmotionModel) -> bool:
    """Whether ``key`` is a backbone tensor that a checkpoint over bundled weights left out (it kept only its tuned
    stages) and that ``model``, built on the same bundled backbone, already holds as it was."""
    saved = meta.get("include_backbone", True)
    spec = meta.get("spec", {})
    return (key.startswith("backbone.") and saved is not True
            and not any(key.startswith(f"{part}.") for part in saved or ())
            and spec.get("backbone_weights") == model.spec.get("backbone_weights") == "imagenet"
            and spec.get("backbone") == model.spec.get("backbone"))


def check_card(meta: dict, path: Path, with_backbone) -> None:
    """Raise :class:`CheckpointError` unless the model ``meta`` describes has exactly the tensors, of the
    shapes, that the header of the weights file ``path`` lists: the model is built on the meta device
    (no memory), the file's tensors are not read."""
    shapes = header_shapes(path)
    with torch.device("meta"), warnings.catch_warnings():
        # a model that reads weight files its spec names (multigap's streams) copies them into nothing here
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        skeleton = model_from_meta(meta)
    expected = {k: tuple(v.shape) for k, v in model_state(skeleton, with_backbone).items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k}: card {expected[k]}, weights {shapes[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        found = [f"{len(names)} {what} (e.g. {', '.join(names[:2])})" for what, names in
                 (("of another shape", wrong), ("missing", missing), ("unexpected", unexpected)) if names]
        raise CheckpointError(f"{path}: its card {path.with_suffix('.json').name} does not fit these weights, "
                              f"tensors {'; '.join(found)}")


class _Subset:
    """``load_into`` over the tensors a checkpoint is meant to hold (all, or all but the backbone)."""

    def __init__(self, model: torch.nn.Module, keys):
        self.model, self.keys = model, list(keys)

    def state_dict(self):
        full = self.model.state_dict()
        return {k: full[k] for k in self.keys}

    def load_state_dict(self, state):
        self.model.load_state_dict(state, strict=len(self.keys) == len(self.model.state_dict()))

"""Several datasets as one training set, each image keeping the label spaces its own dataset has.

A label space is a dataset's emotion classes, named by its taxonomy (``mikels``, ``emotion6``,
``polarity``), or one dataset's valence and arousal ratings, ``affect@<kind>`` (common scale). Targets are
namespaced by space (``mikels.label``, ``mikels.distribution``, ``affect@oasis``); an image outside a space
carries -1 or NaN there, so a loss or a figure of that space leaves it out. A model meets every rating set
with one shared ``affect`` head, or with a head per set (rating studies anchor their scales differently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..taxonomy import POLARITY, get_taxonomy
from .protocols import Fold, Protocol, fingerprint, make_protocol
from .samples import EmotionDataset

AFFECT_SPACE = "affect"
AFFECT_HEADS = ("shared", "per_dataset")


def is_affect(space: str) -> bool:
    """Whether ``space`` holds valence and arousal: the shared ``affect`` or one dataset's ``affect@kind``."""
    return space == AFFECT_SPACE or space.startswith(AFFECT_SPACE + "@")


def serves(model_spaces, space: str) -> bool:
    """Whether a model with heads for ``model_spaces`` answers ``space``: a rating set through its own head or
    through the shared ``affect`` one."""
    return space in model_spaces or (is_affect(space) and AFFECT_SPACE in model_spaces)


def rating_output(outputs, space: str):
    """The output that answers rating set ``space``: its own head's, else the shared ``affect``."""
    return outputs[space] if space in outputs else outputs[AFFECT_SPACE]


def label_spaces(dataset: EmotionDataset) -> tuple[str, ...]:
    """The spaces ``dataset`` labels: its classes (not OASIS's polarity, which is read off its valence), and
    ``affect@<kind>`` where its images are rated."""
    spaces = []
    if not (dataset.taxonomy is POLARITY and dataset.has_affect):
        spaces.append(dataset.taxonomy.name)
    if dataset.has_affect:
        spaces.append(f"{AFFECT_SPACE}@{dataset.kind}")
    return tuple(spaces)


def space_targets(dataset: EmotionDataset) -> dict[str, np.ndarray]:
    """The namespaced targets of one dataset's own spaces."""
    out: dict[str, np.ndarray] = {}
    for space in label_spaces(dataset):
        if is_affect(space):
            out[space] = dataset.affect
            continue
        out[f"{space}.label"] = dataset.labels
        if dataset.has_distribution:
            out[f"{space}.distribution"] = dataset.distributions
    return out


def space_sizes(spaces) -> dict[str, int]:
    """Outputs per space: a taxonomy's classes, or valence and arousal."""
    return {s: 2 if is_affect(s) else get_taxonomy(s).num_classes for s in spaces}


@dataclass
class JointDataset(EmotionDataset):
    """The members' samples one after the other; :meth:`targets` fills what a member does not label."""

    members: list[EmotionDataset] = field(default_factory=list)

    @classmethod
    def of(cls, members: list[EmotionDataset]) -> "JointDataset":
        if len(members) < 2:
            raise ValueError("joint training takes two datasets or more")
        first = members[0]
        return cls("joint", Path("."), first.taxonomy, [s for m in members for s in m.samples],
                   missing=[f"{m.kind}:{name}" for m in members for name in m.missing],
                   spec=";".join(m.spec for m in members), members=list(members))

    @property
    def offsets(self) -> list[int]:
        return [int(o) for o in np.cumsum([0] + [len(m) for m in self.members[:-1]])]

    def member_rows(self, rows: list[int]) -> list[list[int]]:
        """``rows`` of the joint dataset split by member, as each member's own row numbers."""
        return [[r - start for r in rows if start <= r < start + len(member)]
                for member, start in zip(self.members, self.offsets)]

    @property
    def spaces(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for m in self.members for s in label_spaces(m)))

    def targets(self) -> dict[str, np.ndarray]:
        """Every member's space targets over all samples; -1 labels and NaN elsewhere."""
        parts = [space_targets(m) for m in self.members]
        keys = list(dict.fromkeys(k for p in parts for k in p))
        out = {}
        for key in keys:
            like = next(p[key] for p in parts if key in p)
            fill = -1 if like.dtype.kind == "i" else np.nan
            out[key] = np.concatenate([p[key] if key in p else np.full((len(m),) + like.shape[1:], fill, like.dtype)
                                       for p, m in zip(parts, self.members)])
        return out

    def protocol(self, kind: str, seed: int = 0, k: int = 5, **params) -> Protocol:
        """Each member's protocol as a single-dataset run of it makes it (same seed, same folds), joined;
        ``params`` as for :func:`make_protocol` (e.g. a split's ``fractions``)."""
        member_folds = [make_protocol(m, kind, seed=seed, k=k, task="emotion", **params).folds for m in self.members]
        folds = [Fold(*([r + start for fold, start in zip(parts, self.offsets) for r in getattr(fold, part)]
                        for part in ("train", "val", "test"))) for parts in zip(*member_folds)]
        return Protocol(kind, seed, folds, self.spec, fingerprint(self), {"task": "joint", "k": k, **params})


def open_datasets(specs: list[str] | str) -> EmotionDataset:
    """One dataset, or several (a list, or specs joined by ``;`` as a joint run records them) as a
    :class:`JointDataset`."""
    from .readers import load_dataset

    specs = [s for s in (specs.split(";") if isinstance(specs, str) else specs) if s]
    members = [load_dataset(s) for s in specs]
    return members[0] if len(members) == 1 else JointDataset.of(members)


def protocol_for(dataset: EmotionDataset, kind: str, seed: int = 0, k: int = 5, task: str = "emotion") -> Protocol:
    """The protocol of a single-dataset run, or for a joint dataset each member's own, joined."""
    if isinstance(dataset, JointDataset):
        return dataset.protocol(kind, seed, k)
    return make_protocol(dataset, kind, seed=seed, k=k, task=task)


def joint_spec(model_spec: str, dataset: JointDataset) -> str:
    """``model_spec`` as the trunk of a joint model with a head for each of ``dataset``'s label spaces (a
    ``joint`` spec passes unchanged); a trunk's own arguments ride after ``/``. ``affect_heads=per_dataset``
    in the spec gives each rated dataset its own valence/arousal head instead of one shared ``affect``;
    ``embed``, ``affect_loss`` and ``affect_weight`` are the joint model's and its loss's, not the trunk's."""
    from ..models.registry import parse_model_spec

    name, args = parse_model_spec(model_spec)
    if name == "joint":
        return model_spec
    loss = args.pop("loss", None)
    if loss not in (None, "joint"):
        raise ValueError(f"a joint model trains each label space with its own loss, not {loss!r}; "
                         "affect_loss=mse|l1|ccc picks valence and arousal's")
    heads = args.pop("affect_heads", "shared")
    if heads not in AFFECT_HEADS:
        raise ValueError(f"affect_heads must be {' or '.join(AFFECT_HEADS)}, got {heads!r}")
    outer = {k: args.pop(k) for k in ("affect_loss", "affect_weight", "embed") if k in args}
    trunk = "/".join([name, *(f"{k}={v}" for k, v in args.items())])
    spaces = [s for s in dataset.spaces if not is_affect(s)]
    rated = [s for s in dataset.spaces if is_affect(s)]
    spaces += rated if heads == "per_dataset" else [AFFECT_SPACE] if rated else []
    return ",".join([f"joint:trunk={trunk}", f"spaces={'+'.join(spaces)}", *(f"{k}={v}" for k, v in outer.items())])

"""Evaluation protocols: seeded stratified splits and k-folds as saved index lists.

A protocol file records the dataset, the seed and a fingerprint of the sample list, so a run
can be repeated exactly and a changed dataset is noticed instead of silently re-split.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..checkpoints import atomic_write_json
from ..taxonomy import TASKS
from .samples import EmotionDataset

PAPER_SPLIT = (0.80, 0.05, 0.15)  # train / val / test of papers 001-003


@dataclass
class Fold:
    train: list[int]
    val: list[int]
    test: list[int]

    def to_dict(self) -> dict:
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass
class Protocol:
    """Named folds over one dataset (one fold for a split)."""

    kind: str  # "split" or "kfold"
    seed: int
    folds: list[Fold]
    dataset: str = ""
    fingerprint: str = ""
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "dataset": self.dataset, "fingerprint": self.fingerprint,
                "params": self.params, "folds": [f.to_dict() for f in self.folds]}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, dataset: EmotionDataset | None = None) -> "Protocol":
        d = json.loads(Path(path).read_text())
        proto = cls(d["kind"], int(d["seed"]), [Fold(f["train"], f["val"], f["test"]) for f in d["folds"]],
                    d.get("dataset", ""), d.get("fingerprint", ""), d.get("params", {}))
        if dataset is not None and proto.fingerprint and proto.fingerprint != fingerprint(dataset):
            raise ValueError(f"{path}: the protocol was made for another sample list than dataset {dataset.spec or dataset.kind}")
        return proto


def fingerprint(dataset: EmotionDataset) -> str:
    """Hash of the sample paths (relative to the root) and labels, in order."""
    h = hashlib.sha256()
    for s in dataset.samples:
        try:
            rel = s.path.relative_to(dataset.root).as_posix()
        except ValueError:
            rel = s.path.as_posix()
        h.update(f"{rel}\t{s.label}\n".encode())
    return h.hexdigest()[:16]


def _stratified_take(labels: np.ndarray, idx: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``idx`` into parts of the given fractions, class by class.

    Each class gives every part the whole-number share of its members; the members left
    over go, one by one, to the part furthest below its overall target, so small parts
    (a 5% validation set) are not rounded away on small datasets.
    """
    frac = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    target = frac * len(idx)
    parts: list[list[int]] = [[] for _ in frac]
    leftovers: list[int] = []
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c]).tolist()
        start = 0
        for k, share in enumerate(np.floor(frac * len(members)).astype(int)):
            parts[k].extend(members[start:start + share])
            start += share
        leftovers.extend(members[start:])
    for member in leftovers:
        k = int(np.argmax(target - np.array([len(p) for p in parts])))
        parts[k].append(member)
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def stratified_split(labels: Sequence[int], fractions: Sequence[float] = PAPER_SPLIT, seed: int = 0) -> Fold:
    """One seeded stratified train/val/test split (80/5/15 by default)."""
    if len(fractions) != 3 or min(fractions) < 0:
        raise ValueError("fractions are (train, val, test), non-negative")
    y = np.asarray(labels)
    train, val, test = _stratified_take(y, np.arange(len(y)), fractions, np.random.default_rng(seed))
    empty = [part for part, rows, share in zip(("train", "validation", "test"), (train, val, test), fractions)
             if share > 0 and len(rows) == 0]
    if empty:
        raise ValueError(f"a {'/'.join(f'{100 * f:g}' for f in fractions)} split of {len(y)} images leaves no "
                         f"{' and no '.join(empty)} images: use more images")
    return Fold(train.tolist(), val.tolist(), test.tolist())


def stratified_kfold(labels: Sequence[int], k: int = 5, seed: int = 0, val_fraction: float = 0.1) -> list[Fold]:
    """Seeded stratified k-fold; each fold's validation part is carved, stratified, out of its training part.

    Classes with fewer than ``k`` members are spread as far as they go (scikit-learn warns).
    """
    y = np.asarray(labels)
    if k < 2:
        raise ValueError("k-fold needs k >= 2")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    folds = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        splits = list(skf.split(np.zeros(len(y)), y))
    for train_idx, test_idx in splits:
        train, val = _stratified_take(y, np.asarray(train_idx), (1 - val_fraction, val_fraction), rng)
        folds.append(Fold(train.tolist(), val.tolist(), np.sort(test_idx).tolist()))
    return folds


def task_targets(dataset: EmotionDataset, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices usable for ``task``, their class labels) - polarity drops ambiguous emotions."""
    if task == "emotion":
        return np.arange(len(dataset)), dataset.labels
    if task == "polarity":
        pol = dataset.polarities
        keep = np.flatnonzero(pol >= 0)
        if len(keep) == 0:
            raise ValueError(f"dataset {dataset.kind} has no polarity labels")
        return keep, pol[keep]
    if task == "distribution":
        if not dataset.has_distribution:
            raise ValueError(f"dataset {dataset.kind} has no emotion distributions; use task emotion")
        return np.arange(len(dataset)), dataset.labels
    if task == "joint":  # one dataset scored by a joint model: all of it, as a single-dataset run splits it
        return np.arange(len(dataset)), dataset.labels
    if task == "va":  # the images with ratings, stratified on the dataset's own labels
        if not dataset.has_affect:
            raise ValueError(f"dataset {dataset.kind} has no valence and arousal ratings; they come with oasis "
                             "and emotion6")
        keep = np.flatnonzero(~np.isnan(dataset.affect).any(1))
        return keep, dataset.labels[keep]
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def make_protocol(dataset: EmotionDataset, kind: str = "split", seed: int = 0, k: int = 5, task: str = "emotion",
                  **params) -> Protocol:
    """A split or k-fold protocol over the samples usable for ``task``, stratified on the task's labels.

    Indices always refer to ``dataset.samples``.
    """
    keep, y = task_targets(dataset, task)
    if kind == "split":
        local = [stratified_split(y, params.get("fractions", PAPER_SPLIT), seed)]
    elif kind == "kfold":
        local = stratified_kfold(y, k, seed, params.get("val_fraction", 0.1))
        params = {**params, "k": k}
    elif kind == "official":
        if not dataset.official_split:
            raise ValueError(f"dataset {dataset.kind} has no official split")
        position = {int(i): n for n, i in enumerate(keep)}
        train = np.array([position[i] for i in dataset.official_split["train"] if i in position])
        test = sorted(position[i] for i in dataset.official_split["test"] if i in position)
        tr, val = _stratified_take(y, train, (0.9, 0.1), np.random.default_rng(seed))
        local = [Fold(tr.tolist(), val.tolist(), test)]
    else:
        raise ValueError(f"unknown protocol {kind!r}; use split, kfold or official")
    folds = [Fold(keep[f.train].tolist(), keep[f.val].tolist(), keep[f.test].tolist()) for f in local]
    return Protocol(kind, seed, folds, dataset.spec, fingerprint(dataset), {**params, "task": task})

"""Emotion taxonomies as data, and the conversions between labels, votes and distributions.

Class order is always taken from a :class:`Taxonomy`; nothing downstream assumes
eight classes or a positive-first order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

POSITIVE, NEGATIVE = 1, 0


@dataclass(frozen=True)
class Taxonomy:
    """An ordered set of emotion classes with their polarity.

    ``polarity[i]`` is 1 (positive), 0 (negative) or ``None`` (ambiguous, e.g.
    surprise); ambiguous classes have no polarity label.
    """

    name: str
    classes: tuple[str, ...]
    polarity: tuple[int | None, ...]
    description: str = ""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.polarity):
            raise ValueError(f"taxonomy {self.name!r}: {len(self.classes)} classes but {len(self.polarity)} polarities")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"taxonomy {self.name!r}: duplicate class names")
        for p in self.polarity:
            if p not in (POSITIVE, NEGATIVE, None):
                raise ValueError(f"taxonomy {self.name!r}: polarity must be 1, 0 or None, got {p!r}")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.classes)})

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Index of a class name (case-insensitive)."""
        key = name.strip().lower()
        if key not in self._index:
            raise KeyError(f"{name!r} is not a class of taxonomy {self.name!r} ({', '.join(self.classes)})")
        return self._index[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._index

    @property
    def positive_mask(self) -> np.ndarray:
        return np.array([p == POSITIVE for p in self.polarity])

    @property
    def negative_mask(self) -> np.ndarray:
        return np.array([p == NEGATIVE for p in self.polarity])

    @property
    def has_polarity(self) -> bool:
        return bool(self.positive_mask.any() and self.negative_mask.any())

    def polarity_of(self, label: int) -> int | None:
        return self.polarity[label]

    def polarity_distribution(self, distribution: np.ndarray) -> np.ndarray:
        """(negative, positive) mass of distributions ``(..., C)``; ambiguous mass is dropped and the rest renormalised.

        Rows with no polar mass at all come out as NaN.
        """
        d = np.asarray(distribution, dtype=np.float64)
        pos = d[..., self.positive_mask].sum(-1)
        neg = d[..., self.negative_mask].sum(-1)
        total = pos + neg
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.stack([neg / total, pos / total], axis=-1)
        return out

    def with_polarity(self, **overrides: int | None) -> "Taxonomy":
        """A copy with the polarity of some classes changed, e.g. ``surprise=1``."""
        pol = list(self.polarity)
        for name, value in overrides.items():
            pol[self.index(name)] = value
        return Taxonomy(self.name, self.classes, tuple(pol), self.description)

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "polarity": list(self.polarity), "description": self.description}

    @classmethod
    def from_dict(cls, d: dict) -> "Taxonomy":
        return cls(d["name"], tuple(d["classes"]), tuple(d["polarity"]), d.get("description", ""))


MIKELS = Taxonomy(
    "mikels",
    ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"),
    (1, 1, 1, 1, 0, 0, 0, 0),
    "Mikels' eight emotions (FI, Flickr_LDL, Twitter_LDL, ArtPhoto, Abstract, IAPS-subset).",
)
EMOTION6 = Taxonomy(
    "emotion6",
    ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"),
    (0, 0, 0, 1, 0, None, None),
    "Ekman's six plus neutral in Emotion6 order; surprise and neutral have no polarity.",
)
EMOTIONROI = Taxonomy(
    "emotionroi",
    ("anger", "disgust", "fear", "joy", "sadness", "surprise"),
    (0, 0, 0, 1, 0, 1),
    "EmotionROI's six; surprise counts as positive, as in paper 003 and the EmotionROI release.",
)
WEBEMO = Taxonomy(
    "webemo",
    ("anger", "fear", "joy", "love", "sadness", "surprise", "confusion"),
    (0, 0, 1, 1, 0, None, None),
    "WEBEmo's seven (Parrott's middle level); surprise and confusion have no polarity.",
)
POLARITY = Taxonomy("polarity", ("negative", "positive"), (0, 1), "Binary sentiment polarity: 0 negative, 1 positive.")


#: The dimensions of dimensional affect, in the order emolens keeps them.
AFFECT_DIMENSIONS = ("valence", "arousal")


@dataclass(frozen=True)
class AffectScale:
    """A dataset's rating scale of valence and arousal (OASIS 1-7; Emotion6 and IAPS's SAM 1-9).

    emolens's common scale is [-1, 1], linear in the ratings: the scale's low end is -1, its high end 1 and
    its midpoint (neutral valence, middling arousal) 0, so sets rated on different scales train together
    and a figure can be reported back on a dataset's own scale."""

    low: float
    high: float

    def to_common(self, ratings) -> np.ndarray:
        return 2 * (np.asarray(ratings, dtype=np.float64) - self.low) / (self.high - self.low) - 1

    def from_common(self, values) -> np.ndarray:
        return self.low + (np.asarray(values, dtype=np.float64) + 1) * (self.high - self.low) / 2


#: What a ``va`` model predicts: valence and arousal on the common scale, not classes.
AFFECT = Taxonomy("affect", AFFECT_DIMENSIONS, (None, None), "Valence and arousal on the common scale [-1, 1].")

#: What a model can be trained to predict: the dataset's emotion classes, polarity, the emotion
#: distribution, valence and arousal (``va``), or every label space of several datasets (``joint``).
TASKS = ("emotion", "polarity", "distribution", "va", "joint")

OASIS_SCALE = AffectScale(1.0, 7.0)
SAM9_SCALE = AffectScale(1.0, 9.0)

TAXONOMIES: dict[str, Taxonomy] = {t.name: t for t in (MIKELS, EMOTION6, EMOTIONROI, WEBEMO, POLARITY)}


def get_taxonomy(name: str | Taxonomy) -> Taxonomy:
    if isinstance(name, Taxonomy):
        return name
    try:
        return TAXONOMIES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown taxonomy {name!r}; known: {', '.join(TAXONOMIES)}") from None


# --- votes, distributions, labels -------------------------------------------------------


def votes_to_distribution(votes: Sequence[float] | np.ndarray) -> np.ndarray:
    """Normalise non-negative vote counts ``(..., C)`` to distributions summing to 1."""
    v = np.asarray(votes, dtype=np.float64)
    if np.any(~np.isfinite(v)) or np.any(v < 0):
        raise ValueError("votes must be finite and non-negative")
    total = v.sum(-1, keepdims=True)
    if np.any(total == 0):
        raise ValueError("a row of votes is all zero; it has no distribution")
    return v / total


@dataclass(frozen=True)
class DominantLabels:
    labels: np.ndarray  # (N,) int
    probability: np.ndarray  # (N,) the dominant class' share
    ties: int  # rows whose maximum was shared by several classes


def dominant_label(distribution: np.ndarray, atol: float = 1e-9) -> DominantLabels:
    """Argmax of each row; a tie goes to the class that comes first in the taxonomy, and is counted."""
    d = np.atleast_2d(np.asarray(distribution, dtype=np.float64))
    labels = d.argmax(-1)
    top = d.max(-1)
    ties = int(((d >= top[:, None] - atol).sum(-1) > 1).sum())
    return DominantLabels(labels, top, ties)


def labels_to_polarity(labels: Iterable[int], taxonomy: Taxonomy) -> np.ndarray:
    """Polarity label per class label: 1 positive, 0 negative, -1 where the class is ambiguous."""
    table = np.array([-1 if p is None else p for p in taxonomy.polarity])
    return table[np.asarray(list(labels), dtype=np.int64)]


# --- Mikels' wheel ----------------------------------------------------------------------

#: Mikels' eight around the valence-arousal circumplex; neighbours are one step apart and
#: the last wraps round to the first. Replace it (or pass ``order=``) for another wheel.
MIKELS_WHEEL_ORDER: tuple[str, ...] = (
    "amusement", "excitement", "awe", "contentment", "sadness", "disgust", "fear", "anger",
)


def wheel_steps(taxonomy: Taxonomy = MIKELS, order: Sequence[str] | None = None) -> np.ndarray:
    """``(C, C)`` number of steps along the shorter arc of the wheel, in taxonomy order."""
    order = tuple(order or MIKELS_WHEEL_ORDER)
    if sorted(order) != sorted(taxonomy.classes):
        raise ValueError(f"wheel order {order} does not hold exactly the classes of taxonomy {taxonomy.name!r}")
    pos = np.array([order.index(c) for c in taxonomy.classes])
    n = len(order)
    diff = np.abs(pos[:, None] - pos[None, :])
    return np.minimum(diff, n - diff)


def emotion_distance(taxonomy: Taxonomy = MIKELS, order: Sequence[str] | None = None) -> np.ndarray:
    """Paper 001's emotion distance ``d_ij = 1 + steps(i, j)`` on Mikels' wheel (1 on the diagonal)."""
    return 1 + wheel_steps(taxonomy, order)


def wheel_distribution(
    label: int | np.ndarray,
    probability: float | np.ndarray,
    distance: np.ndarray | None = None,
) -> np.ndarray:
    """Emotion distribution of paper 001 Eq. 4 from a dominant emotion and its probability.

    The dominant class keeps ``p*``; the remaining ``1 - p*`` is shared among the other
    classes in proportion to ``1 / d_ij``, so closer emotions get more mass. Rows sum to 1.
    """
    dist = emotion_distance() if distance is None else np.asarray(distance, dtype=np.float64)
    labels = np.atleast_1d(np.asarray(label, dtype=np.int64))
    p = np.broadcast_to(np.asarray(probability, dtype=np.float64), labels.shape)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("the dominant probability must lie in [0, 1]")
    inv = 1.0 / dist[labels].astype(np.float64)  # (N, C)
    inv[np.arange(len(labels)), labels] = 0.0
    out = inv / inv.sum(-1, keepdims=True) * (1.0 - p)[:, None]
    out[np.arange(len(labels)), labels] = p
    return out[0] if np.ndim(label) == 0 else out

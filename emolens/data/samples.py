"""What a dataset reader yields: samples with labels in an explicit taxonomy."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..taxonomy import AffectScale, Taxonomy


class LabelFileError(ValueError):
    """A label file is malformed; names the file, the line (1-based, when known) and the reason."""

    def __init__(self, file: str | Path, line: int | None, reason: str):
        self.file, self.line, self.reason = str(file), line, reason
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {reason}")


@dataclass
class Sample:
    """One image with its labels; ``label`` indexes the dataset's taxonomy."""

    path: Path
    label: int
    distribution: np.ndarray | None = None
    polarity: int | None = None  # 1 positive, 0 negative, None ambiguous
    region_map: Path | None = None
    affect: np.ndarray | None = None  # (valence, arousal) on the common scale [-1, 1] (see AffectScale)


@dataclass
class EmotionDataset:
    """Samples of one dataset, and what the reader had to leave out."""

    kind: str
    root: Path
    taxonomy: Taxonomy
    samples: list[Sample]
    missing: list[str] = field(default_factory=list)  # listed in the label file, absent on disk
    skipped: Counter = field(default_factory=Counter)  # reason -> count, for entries the format lets us skip
    ties: int = 0  # samples whose dominant emotion was a tie (broken towards the first class)
    official_split: dict[str, list[int]] | None = None
    spec: str = ""
    #: Per-image side features aligned with ``samples`` (e.g. ``"anp"``: ANP detector scores), (N, D) each.
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    #: The scale the dataset's valence and arousal ratings were given on (``None``: it has none).
    affect_scale: AffectScale | None = None
    #: Parts the format may hold beyond images and labels: part ("stimuli maps" or "official split") -> (where
    #: they would be, what runs without them).
    optional_parts: dict[str, tuple[str, str]] = field(default_factory=dict)

    def parts_found(self) -> dict[str, str]:
        """For each of :attr:`optional_parts`, what was found (counts) or that it was not."""
        held = self._parts_held()
        return {part: held[part] or f"none ({where} absent)" for part, (where, _) in self.optional_parts.items()}

    def parts_missing(self) -> dict[str, str]:
        """What runs without each of :attr:`optional_parts` that was not found."""
        held = self._parts_held()
        return {part: without for part, (_, without) in self.optional_parts.items() if not held[part]}

    def _parts_held(self) -> dict[str, str]:
        maps = sum(s.region_map is not None for s in self.samples)
        return {"stimuli maps": f"{maps} of {len(self)} images" if maps else "",
                "official split": ", ".join(f"{k} {len(v)}" for k, v in (self.official_split or {}).items())}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def has_distribution(self) -> bool:
        return bool(self.samples) and all(s.distribution is not None for s in self.samples)

    @property
    def distributions(self) -> np.ndarray:
        if not self.has_distribution:
            raise ValueError(f"dataset {self.kind} has no emotion distributions")
        return np.stack([s.distribution for s in self.samples]).astype(np.float32)

    @property
    def has_affect(self) -> bool:
        return self.affect_scale is not None and any(s.affect is not None for s in self.samples)

    @property
    def affect(self) -> np.ndarray:
        """(N, 2) valence and arousal on the common scale [-1, 1]; NaN for a sample without ratings."""
        if self.affect_scale is None:
            raise ValueError(f"dataset {self.kind} has no valence and arousal ratings")
        missing = np.full(2, np.nan, dtype=np.float32)
        return np.stack([missing if s.affect is None else s.affect for s in self.samples]).astype(np.float32) \
            if self.samples else np.zeros((0, 2), np.float32)

    @property
    def polarities(self) -> np.ndarray:
        """1 positive, 0 negative, -1 where the sample's emotion has no polarity."""
        return np.array([-1 if s.polarity is None else s.polarity for s in self.samples], dtype=np.int64)

    def subset(self, rows: list[int]) -> "EmotionDataset":
        """The samples at ``rows`` (in that order), with their side features and official split."""
        position = {r: n for n, r in enumerate(rows)}
        split = None if self.official_split is None else {
            part: [position[i] for i in indices if i in position] for part, indices in self.official_split.items()}
        return replace(self, samples=[self.samples[r] for r in rows], official_split=split,
                       extras={k: v[rows] for k, v in self.extras.items()})

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.taxonomy.num_classes)
        return {c: int(n) for c, n in zip(self.taxonomy.classes, counts)}

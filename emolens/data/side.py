"""Per-image side features that come from outside the image pipeline, aligned with a dataset's samples.

Paper 004 fuses Adjective-Noun-Pair (ANP) detector scores with the image streams. No ANP detector
ships offline, so the scores come from a file the user gives, as a dataset option
(``flickr_ldl=ROOT:anp=anp.npy``):

- ``.npy``: a (N, D) array, one row per sample in the dataset's order (``emolens datasets info``);
- ``.csv``: rows ``image,v1,...,vD`` (image path relative to the dataset root; no header),
  matched by name, so its order is free; every sample needs a row.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .samples import EmotionDataset, LabelFileError

#: Dataset options that name a side-feature file.
SIDE_FEATURES = ("anp",)


def read_side_features(file: Path, dataset: EmotionDataset) -> np.ndarray:
    """The (N, D) float32 features of ``dataset``'s samples from ``file``; errors name file and line."""
    if not file.is_file():
        raise LabelFileError(file, None, "side-feature file not found")
    if file.suffix.lower() == ".npy":
        return _read_npy(file, len(dataset))
    if file.suffix.lower() == ".csv":
        return _read_csv(file, dataset)
    raise LabelFileError(file, None, "side features must be a .npy or .csv file")


def _read_npy(file: Path, count: int) -> np.ndarray:
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as e:
        raise LabelFileError(file, None, f"not a plain numeric .npy array ({e})") from e
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise LabelFileError(file, None, f"expected a 2-D numeric array, got shape {array.shape} of {array.dtype}")
    if len(array) != count:
        raise LabelFileError(file, None, f"{len(array)} rows for a dataset of {count} samples (one row per sample, "
                                         "in the dataset's order)")
    return _finite(file, array.astype(np.float32))


def _read_csv(file: Path, dataset: EmotionDataset) -> np.ndarray:
    index = {str(s.path.relative_to(dataset.root)) if s.path.is_relative_to(dataset.root) else s.path.name: i
             for i, s in enumerate(dataset.samples)}
    rows: dict[int, np.ndarray] = {}
    width = None
    with open(file, newline="", encoding="utf-8-sig") as f:
        for line, record in enumerate(csv.reader(f), 1):
            if not record or not "".join(record).strip():
                continue
            name, values = record[0].strip(), record[1:]
            if width is None:
                width = len(values)
            if len(values) != width or width == 0:
                raise LabelFileError(file, line, f"{len(values)} values where the first row had {width}")
            try:
                vector = np.array([float(v) for v in values], dtype=np.float32)
            except ValueError as e:
                raise LabelFileError(file, line, f"not a number ({e})") from e
            if name not in index:
                continue  # a row for an image the dataset left out (missing, unlabelled) is not an error
            if index[name] in rows:
                raise LabelFileError(file, line, f"second row for {name}")
            rows[index[name]] = vector
    missing = [s.path.name for i, s in enumerate(dataset.samples) if i not in rows]
    if missing:
        raise LabelFileError(file, None, f"no row for {len(missing)} sample(s), e.g. {', '.join(missing[:3])}")
    return _finite(file, np.stack([rows[i] for i in range(len(dataset))]))


def _finite(file: Path, array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise LabelFileError(file, None, "contains NaN or infinite values")
    return array

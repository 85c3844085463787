"""Boxes from maps: the connected components of a thresholded map (EmotionROI stimuli maps, class
activation maps), as ``x1, y1, x2, y2`` pixel boxes. NumPy and SciPy only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .data.samples import EmotionDataset
from .preprocessing import Preprocessing


def map_boxes(values: np.ndarray, threshold: float = 0.5, max_boxes: int = 3, min_area: int = 4) -> np.ndarray:
    """The bounding boxes of the connected regions where ``values >= threshold x max``, largest first.

    ``values`` is a 2-D map in pixel units of the image it describes; a box spans whole pixels
    (``x2 = last column + 1``). Components smaller than ``min_area`` pixels are noise and dropped;
    a map without a positive value has no regions.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a region map is 2-D, got shape {values.shape}")
    peak = float(values.max()) if values.size else 0.0
    if not peak > 0:
        return np.zeros((0, 4), dtype=np.float32)
    labels, count = ndimage.label(values >= threshold * peak)  # 4-connectivity
    if count == 0:
        return np.zeros((0, 4), dtype=np.float32)
    areas = ndimage.sum_labels(np.ones_like(values), labels, index=np.arange(1, count + 1))
    boxes = []
    for component in np.argsort(-areas, kind="stable")[:max_boxes]:
        if areas[component] < min_area:
            break
        rows, cols = ndimage.find_objects(labels)[component]
        boxes.append((cols.start, rows.start, cols.stop, rows.stop))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def stimuli_boxes(path: str | Path, preprocessing: Preprocessing, threshold: float = 0.5,
                  max_boxes: int = 3) -> np.ndarray:
    """Boxes of an EmotionROI stimuli map in the frame the model sees (the evaluation crop)."""
    with Image.open(path) as img:
        view = preprocessing.crop(img.convert("L")).convert("L")
    return map_boxes(np.asarray(view, dtype=np.float32), threshold, max_boxes)


def padded_boxes(per_image: list[np.ndarray], max_boxes: int) -> np.ndarray:
    """(N, max_boxes, 4) with NaN rows where an image has fewer boxes (one array for a whole dataset)."""
    out = np.full((len(per_image), max_boxes, 4), np.nan, dtype=np.float32)
    for i, boxes in enumerate(per_image):
        out[i, : len(boxes[:max_boxes])] = boxes[:max_boxes]
    return out


def dataset_region_boxes(dataset: EmotionDataset, preprocessing: Preprocessing, max_boxes: int = 3) -> np.ndarray:
    """(N, max_boxes, 4) stimuli-map boxes of every sample in the evaluation crop's frame, NaN-padded;
    a sample without a map has none."""
    if not any(s.region_map for s in dataset.samples):
        raise ValueError(f"dataset {dataset.kind} has no region ground truth (stimuli maps); "
                         "train the region detector on class-activation pseudo-boxes (regions=cam) instead")
    empty = np.zeros((0, 4), dtype=np.float32)
    return padded_boxes([stimuli_boxes(s.region_map, preprocessing, max_boxes=max_boxes) if s.region_map else empty
                         for s in dataset.samples], max_boxes)

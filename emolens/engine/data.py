"""Feeding models: image datasets that survive bad files, task targets, and the frozen-backbone feature cache."""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from ..checkpoints import save_checkpoint
from ..data.samples import EmotionDataset
from ..data.transforms import eval_transform
from ..identity import weights_digest
from ..images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from ..taxonomy import dominant_label

Targets = dict[str, np.ndarray]


def task_targets_arrays(dataset: EmotionDataset, task: str) -> Targets:
    """Per-sample targets for a task: ``label``, and ``distribution``/``label_prob`` where votes exist."""
    out: Targets = {}
    dist = dataset.distributions if dataset.has_distribution else None
    if task == "polarity":
        out["label"] = dataset.polarities
        if dist is not None:
            pol = dataset.taxonomy.polarity_distribution(dist).astype(np.float32)
            pol = np.nan_to_num(pol, nan=0.5)
            out["distribution"] = pol
            out["label_prob"] = np.take_along_axis(pol, np.maximum(out["label"], 0)[:, None], 1)[:, 0]
    else:
        out["label"] = dataset.labels
        if dist is not None:
            out["distribution"] = dist
            out["label_prob"] = dominant_label(dist).probability.astype(np.float32)
    return out


def class_balanced_batches(rows: Sequence[int], labels: np.ndarray, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of P classes x M images batches (M >= 2, P x M <= batch_size), as many batches as
    ``rows`` fills; a class with fewer than M images is drawn with replacement."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for r in rows:
        by_class.setdefault(int(labels[r]), []).append(int(r))
    classes = sorted(by_class)
    p = max(1, min(len(classes), batch_size // 2))
    m = max(2, batch_size // p)
    batches = []
    for _ in range(max(1, math.ceil(len(rows) / (p * m)))):
        batch = []
        for c in rng.choice(classes, size=p, replace=False):
            members = by_class[int(c)]
            batch += rng.choice(members, size=m, replace=len(members) < m).tolist()
        batches.append(batch)
    return batches


def batch_targets(targets: Targets, index: torch.Tensor) -> dict[str, torch.Tensor]:
    idx = index.numpy()
    return {k: torch.as_tensor(v[idx]) for k, v in targets.items()}


class ImageFiles(Dataset):
    """Images by path; a file that cannot be used yields its error instead of stopping the loader."""

    def __init__(self, paths: Sequence[Path | str], transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"index": i, "image": self.transform(load_image(self.paths[i], self.max_pixels))}
        except ImageLoadError as e:
            return {"index": i, "error": e.reason}


def collate_images(items: list[dict]) -> dict[str, Any]:
    """Stack the good items; keep ``(index, reason)`` of the bad ones."""
    good = [it for it in items if "image" in it]
    return {
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "image": torch.stack([it["image"] for it in good]) if good else torch.empty(0),
        "errors": [(it["index"], it["error"]) for it in items if "error" in it],
    }


def image_loader(paths, transform, batch_size: int, workers: int, shuffle: bool = False, generator=None,
                 sampler=None, max_pixels: int = DEFAULT_MAX_PIXELS, pin_memory: bool = False) -> DataLoader:
    return DataLoader(ImageFiles(paths, transform, max_pixels), batch_size=batch_size, shuffle=shuffle and sampler is None,
                      num_workers=workers, collate_fn=collate_images, generator=generator, sampler=sampler,
                      persistent_workers=False, prefetch_factor=4 if workers else None, pin_memory=pin_memory)


@dataclass
class FeatureCache:
    """Backbone outputs (eval transform, no augmentation) for a list of images, kept in fp16.

    ``features["pooled"]`` is (N, D); ``features["levels"]`` a list of (N, C, H, W). ``errors``
    maps the position of an unusable image to the reason; those rows are zeros and must not be used.
    """

    features: dict[str, Any]
    count: int
    errors: dict[int, str] = field(default_factory=dict)

    def batch(self, rows: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.features.items():
            out[key] = [v[rows].float() for v in value] if isinstance(value, list) else value[rows].float()
        return out

    def save(self, path: Path, meta: dict) -> None:
        tensors = {}
        for key, value in self.features.items():
            if isinstance(value, list):
                tensors.update({f"{key}.{i}": v for i, v in enumerate(value)})
            else:
                tensors[key] = value
        save_checkpoint(path, tensors, {**meta, "errors": {str(k): v for k, v in self.errors.items()}})

    def usable(self, rows: Sequence[int]) -> list[int]:
        """``rows`` without the images that could not be read."""
        return [int(r) for r in rows if int(r) not in self.errors]

    @classmethod
    def load(cls, path: Path, meta: dict) -> "FeatureCache | None":
        """The cache at ``path`` if it was made with exactly ``meta``, else ``None``."""
        from safetensors.torch import load_file

        meta_path = path.with_suffix(".json")
        if not (path.is_file() and meta_path.is_file()):
            return None
        saved = json.loads(meta_path.read_text())
        errors = {int(k): v for k, v in saved.pop("errors", {}).items()}
        if saved != json.loads(json.dumps(meta)):
            return None
        tensors = load_file(str(path))
        features: dict[str, Any] = {}
        lists: dict[str, list] = {}
        for name, value in tensors.items():
            key, _, position = name.partition(".")
            if position:
                lists.setdefault(key, []).append((int(position), value))
            else:
                features[key] = value
        features.update({key: [v for _, v in sorted(items)] for key, items in lists.items()})
        return cls(features, int(saved["count"]), errors)


def cache_key(paths: Sequence[Path], backbone, keys: Sequence[str]) -> dict:
    """What a feature cache depends on: the images, the backbone and its weights' content, the levels
    it gives, the preprocessing."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        st = p.stat() if p.exists() else None
        h.update(f"{p}\t{st.st_size if st else -1}\t{int(st.st_mtime) if st else -1}\n".encode())
    return {"images": h.hexdigest()[:20], "count": len(paths), "backbone": backbone.name,
            "weights": weights_digest(backbone.state_dict()), "strides": getattr(backbone, "strides", None),
            "preprocessing": backbone.preprocessing.to_dict(), "keys": sorted(keys)}


@torch.inference_mode()
def compute_features(backbone, paths: Sequence[Path], keys: Sequence[str], batch_size: int = 32, workers: int = 2,
                     progress: bool = True, placement=None) -> FeatureCache:
    """Run the (frozen) backbone once over ``paths`` (on ``placement``'s device); unusable images are
    recorded, not fatal. The features are kept in fp16 on the CPU."""
    was_training = backbone.training
    backbone.eval()
    loader = image_loader(paths, eval_transform(backbone.preprocessing), batch_size, workers,
                          pin_memory=placement is not None and placement.pin_memory)
    stores: dict[str, list[torch.Tensor]] = {}
    is_list: dict[str, bool] = {}
    errors = {}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("caching backbone features", total=len(paths))
        for batch in loader:
            errors.update({i: r for i, r in batch["errors"]})
            if len(batch["index"]):
                images = batch["image"] if placement is None else placement.tensor(batch["image"])
                with placement.autocast() if placement is not None else nullcontext():
                    out = backbone(images)
                idx = batch["index"]
                for key in keys:
                    is_list[key] = isinstance(out[key], list)
                    parts = out[key] if is_list[key] else [out[key]]
                    if key not in stores:
                        stores[key] = [torch.zeros(len(paths), *t.shape[1:], dtype=torch.float16) for t in parts]
                    for store, t in zip(stores[key], parts):
                        store[idx] = t.half().cpu()
            bar.update(task, advance=len(batch["index"]) + len(batch["errors"]))
    backbone.train(was_training)
    if not stores:
        raise RuntimeError("no image could be read: nothing to cache")
    features = {key: parts if is_list[key] else parts[0] for key, parts in stores.items()}
    return FeatureCache(features, len(paths), errors)

"""Feeding models: image datasets that survive bad files, task targets, and the frozen-backbone feature cache."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from ..storage import atomic_write_json
from .placement import Placement
from ..data.joint import JointDataset, space_targets
from ..data.samples import EmotionDataset
from ..backbones import blank_image, eval_mode
from ..data.transforms import eval_transform, train_transform
from ..identity import weights_digest
from ..images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from ..taxonomy import dominant_label

Targets = dict[str, np.ndarray]


def task_targets_arrays(dataset: EmotionDataset, task: str) -> Targets:
    """Per-sample targets for a task: ``label``, and ``distribution``/``label_prob`` where votes exist."""
    if task == "joint":
        return dataset.targets() if isinstance(dataset, JointDataset) else space_targets(dataset)
    if task == "va":
        if not dataset.has_affect:
            raise ValueError(f"dataset {dataset.kind} has no valence and arousal ratings")
        return {"label": dataset.labels, "affect": dataset.affect}
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
    """Images by path; a file that cannot be used yields its error instead of stopping the loader.
    ``seeded_transform`` (a random one, for training) serves the items asked for with a seed; ``min_side`` (a
    model's :attr:`Preprocessing.resize`) lets large JPEGs decode at the reduced scale inference uses."""

    def __init__(self, paths: Sequence[Path | str], transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS,
                 seeded_transform: Callable | None = None, min_side: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.seeded_transform = seeded_transform or transform
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key``, or ``(key, seed)``: the seeded transform then draws from ``seed`` alone, so an image's
        augmentation depends on neither the worker that decodes it nor what that worker decoded before."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        try:
            image = load_image(self.paths[i], self.max_pixels, self.min_side)
            if seed is None:
                return {"index": i, "image": self.transform(image)}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return {"index": i, "image": self.seeded_transform(image)}
        except ImageLoadError as e:
            return {"index": i, "error": e.reason}


class PlannedBatches:
    """A batch sampler that yields the batches it was last given: one persistent loader serves every epoch
    and every subset, each pass planned anew (:func:`epoch_batches`) before the loader is iterated."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def epoch_batches(rows: Sequence[int], batch_size: int, train: bool, seed: int, rank: int = 0, world: int = 1,
                  balanced_labels: np.ndarray | None = None) -> list[list[int]]:
    """This rank's batches of sample ``rows`` for one pass, shuffled by ``seed`` when training (or P x M
    class-balanced with ``balanced_labels``). In training every rank gets as many batches as the others (rows
    repeat to fill the last, as in ``DistributedSampler``), so that DDP's gradient exchanges stay in step."""
    if train and balanced_labels is not None:
        batches = class_balanced_batches(rows, balanced_labels, batch_size, seed)
        return [batches[i % len(batches)] for i in range(rank, math.ceil(len(batches) / world) * world, world)]
    order = np.asarray(rows, dtype=np.int64)
    if train:
        order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).numpy()]
        if world > 1:
            order = np.resize(order, math.ceil(len(order) / world) * world)
    order = order[rank::world]
    return [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]


def collate_images(items: list[dict]) -> dict[str, Any]:
    """Stack the good items; keep ``(index, reason)`` of the bad ones."""
    good = [it for it in items if "image" in it]
    return {
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "image": torch.stack([it["image"] for it in good]) if good else torch.empty(0),
        "errors": [(it["index"], it["error"]) for it in items if "error" in it],
    }


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: from a fork server that has imported this module and nothing else, never by
    forking the caller, whose ONNX Runtime sessions, OpenMP pools or server threads a forked child inherits
    without their threads (a worker that then frees such a session waits forever)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    multiprocessing.set_forkserver_preload([__name__])  # each worker then starts without importing torch anew
    return multiprocessing.get_context("forkserver")


def image_loader(paths, transform, batch_size: int, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 pin_memory: bool = False, seeds: Sequence[int] | None = None, min_side: int | None = None) -> DataLoader:
    """One pass over ``paths`` in order; with ``seeds`` (one per path) ``transform`` is a random one drawn from
    each image's seed alone; ``min_side`` as for :class:`ImageFiles`."""
    files = ImageFiles(paths, transform, max_pixels, min_side=min_side)
    keys = list(zip(range(len(paths)), seeds)) if seeds is not None else None
    return DataLoader(files, batch_size=batch_size, sampler=keys, num_workers=workers,
                      collate_fn=collate_images, prefetch_factor=4 if workers else None, pin_memory=pin_memory,
                      multiprocessing_context=worker_context() if workers else None,
                      generator=torch.Generator().manual_seed(0))  # a pass leaves the caller's random state as it was


def planned_loader(paths, transform, workers: int, pin_memory: bool = False,
                   seeded_transform: Callable | None = None, min_side: int | None = None) -> tuple[DataLoader, PlannedBatches]:
    """A loader whose workers live as long as it does (no start-up per epoch or per pass), fed the batches
    that the returned :class:`PlannedBatches` holds when the loader is iterated; items given with a seed
    get ``seeded_transform``, so one loader serves training and evaluation passes; ``min_side`` as for
    :class:`ImageFiles`."""
    plan = PlannedBatches()
    loader = DataLoader(ImageFiles(paths, transform, seeded_transform=seeded_transform, min_side=min_side),
                        batch_sampler=plan, num_workers=workers, collate_fn=collate_images, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None, pin_memory=pin_memory,
                        multiprocessing_context=worker_context() if workers else None,
                        # its own generator: making an iterator never draws from the training's random state (a
                        # persistent loader draws once, so a resumed run's dropout would differ from a whole run's)
                        generator=torch.Generator().manual_seed(0))
    return loader, plan


@dataclass
class FeatureCache:
    """Backbone outputs for a list of images (in the evaluation view, or one random view: :func:`build_cache`), in
    fp16 on disk and read lazily (memory-mapped), so a cache never has to fit in memory.

    ``features["pooled"]`` is (N, D); ``features["levels"]`` a list of (N, C, H, W). ``errors``
    maps the position of an unusable image to the reason; those rows are zeros and must not be used.
    """

    features: dict[str, Any]
    count: int
    errors: dict[int, str] = field(default_factory=dict)

    def batch(self, rows: torch.Tensor) -> dict[str, Any]:
        order = np.asarray(rows)

        def take(array) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array[order])).float()

        return {key: [take(v) for v in value] if isinstance(value, list) else take(value)
                for key, value in self.features.items()}

    def usable(self, rows: Sequence[int]) -> list[int]:
        """``rows`` without the images that could not be read."""
        return [int(r) for r in rows if int(r) not in self.errors]

    def part(self, start: int, count: int) -> "FeatureCache":
        """Rows ``start`` to ``start + count`` as a cache of their own (views, nothing copied): a joint
        dataset's member scored from the joint cache."""
        features = {key: [v[start:start + count] for v in value] if isinstance(value, list) else
                    value[start:start + count] for key, value in self.features.items()}
        return FeatureCache(features, count, {r - start: e for r, e in self.errors.items() if start <= r < start + count})


@dataclass
class CachedViews:
    """Several caches of the same images, each of other random crops and flips: a training batch takes each of its
    images from one view, drawn from the batch's seed."""

    caches: list[FeatureCache]

    def batch(self, rows: torch.Tensor, seed: Sequence[int]) -> dict[str, Any]:
        order = np.asarray(rows)
        choice = np.random.default_rng(list(seed)).integers(len(self.caches), size=len(order))

        def take(arrays: list) -> torch.Tensor:  # one feature, from every view
            out = np.empty((len(order), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
            for view, array in enumerate(arrays):
                picked = choice == view
                out[picked] = array[order[picked]]
            return torch.from_numpy(out).float()

        first = self.caches[0].features
        return {key: [take([c.features[key][i] for c in self.caches]) for i in range(len(value))]
                if isinstance(value, list) else take([c.features[key] for c in self.caches])
                for key, value in first.items()}


@dataclass
class CachePlan:
    """A feature cache folder: what it holds (``meta``), each feature's per-image shape, and its size."""

    folder: Path
    meta: dict
    shapes: dict[str, tuple[int, ...]]  # "pooled", "levels.0", ... -> shape of one image's feature
    shard_size: int

    @property
    def bytes(self) -> int:
        return self.meta["count"] * sum(2 * int(np.prod(shape)) for shape in self.shapes.values())

    @property
    def shards(self) -> int:
        return max(1, math.ceil(self.meta["count"] / self.shard_size))


def plan_cache(backbone, keys: Sequence[str], meta: dict, folder: Path, shard_size: int = 512) -> CachePlan:
    """The layout of a cache, from one forward pass of a blank image (nothing is written)."""
    with eval_mode(backbone), torch.inference_mode():
        out = backbone(blank_image(backbone))
    shapes = {}
    for key in keys:
        parts = out[key] if isinstance(out[key], list) else [out[key]]
        for i, t in enumerate(parts):
            shapes[f"{key}.{i}" if isinstance(out[key], list) else key] = tuple(t.shape[1:])
    return CachePlan(Path(folder), meta, shapes, shard_size)


def open_cache(plan: CachePlan) -> FeatureCache | None:
    """The finished cache ``plan`` describes, memory-mapped; ``None`` while any shard is missing."""
    progress = _read_json(plan.folder / "shards.json")
    if _read_json(plan.folder / "meta.json") != _jsonable(plan.meta) or progress is None:
        return None
    if len(progress["done"]) < plan.shards:
        return None
    features: dict[str, Any] = {}
    for name in plan.shapes:
        array = np.load(plan.folder / f"{name}.npy", mmap_mode="r")
        key, _, position = name.partition(".")
        if position:
            features.setdefault(key, []).append(array)
        else:
            features[key] = array
    return FeatureCache(features, plan.meta["count"], {int(k): v for k, v in progress["errors"].items()})


@torch.inference_mode()
def build_cache(plan: CachePlan, backbone, paths: Sequence[Path], batch_size: int = 32, workers: int = 2,
                progress: bool = True, placement: Placement | None = None, view: int | None = None) -> FeatureCache:
    """Fill the cache shard by shard (``plan.shard_size`` images each): a shard's rows are written and
    flushed, then the shard is recorded as done in one atomic write, so a killed build resumes at the
    first shard not recorded. Unusable images are recorded, not fatal. The images are seen in the evaluation
    view, or with ``view`` in a random crop and flip that only ``view`` and the image's row decide."""
    placement = placement or Placement(torch.device("cpu"))
    plan.folder.mkdir(parents=True, exist_ok=True)
    state = _read_json(plan.folder / "shards.json")
    if _read_json(plan.folder / "meta.json") != _jsonable(plan.meta) or state is None:
        for stale in plan.folder.glob("*.npy"):
            stale.unlink()
        state = {"done": [], "errors": {}}
        atomic_write_json(plan.folder / "meta.json", plan.meta)
        atomic_write_json(plan.folder / "shards.json", state)
    arrays = {}
    for name, shape in plan.shapes.items():
        file = plan.folder / f"{name}.npy"
        arrays[name] = (np.load(file, mmap_mode="r+") if file.is_file() else
                        np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=(plan.meta["count"], *shape)))
    todo = [k for k in range(plan.shards) if k not in state["done"]]
    shard_rows = {k: range(k * plan.shard_size, min(len(paths), (k + 1) * plan.shard_size)) for k in todo}
    with eval_mode(backbone), Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("caching backbone features" + (f" (random view {view + 1})" if view is not None else ""),
                            total=len(paths), completed=len(paths) - sum(map(len, shard_rows.values())))
        pre = backbone.preprocessing
        for shard, rows in shard_rows.items():
            first = rows.start
            loader = image_loader([paths[r] for r in rows], eval_transform(pre) if view is None else train_transform(pre),
                                  batch_size, workers, pin_memory=placement.pin_memory, min_side=pre.resize,
                                  seeds=None if view is None else [(view + 1) * 1_000_003 + r for r in rows])
            for batch in loader:
                state["errors"].update({str(first + i): r for i, r in batch["errors"]})
                if len(batch["index"]):
                    with placement.autocast():
                        out = backbone(placement.tensor(batch["image"]))
                    at = (first + batch["index"]).numpy()
                    for name in plan.shapes:
                        key, _, position = name.partition(".")
                        value = out[key][int(position)] if position else out[key]
                        arrays[name][at] = value.half().cpu().numpy()
                bar.update(task, advance=len(batch["index"]) + len(batch["errors"]))
            for array in arrays.values():
                array.flush()
            state["done"].append(shard)
            atomic_write_json(plan.folder / "shards.json", state)
    if len(state["errors"]) == len(paths):
        raise RuntimeError("no image could be read: nothing to cache")
    del arrays
    return open_cache(plan)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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

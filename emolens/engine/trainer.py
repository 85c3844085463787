"""fit / evaluate for any emolens model: it knows only the outputs dict, the loss and the task.

The checkpoint is chosen on validation data, never on test; ``last.safetensors`` is written
after every epoch so an interrupted run resumes where it stopped. Every epoch reseeds from
``(seed, epoch)``, so a resumed run draws the same batches and augmentations as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from .. import metrics as M
from ..backbones import Backbone, blank_image, eval_mode
from ..checkpoints import CheckpointError, load_checkpoint, load_into, save_checkpoint
from ..data.joint import JointDataset, is_affect, label_spaces, rating_output, serves
from ..data.protocols import Fold
from ..data.samples import EmotionDataset
from ..data.transforms import eval_transform, train_transform
from ..losses import build_loss
from ..models import EmotionModel
from ..regions import dataset_region_boxes
from ..retrieval.metrics import evaluate_retrieval
from ..taxonomy import AFFECT_DIMENSIONS, MIKELS_WHEEL_ORDER, AffectScale, Taxonomy, wheel_steps
from ..weights import init_from, model_state, save_model
from .data import (CachedViews, FeatureCache, Targets, batch_targets, build_cache, cache_key, epoch_batches, open_cache,
                   plan_cache, planned_loader, task_targets_arrays)
from .distributed import barrier, gather, init_distributed, is_main, rank_and_world, sync_buffers
from .placement import Placement, loader_workers

console = Console(stderr=True)

#: The loss on the progress bar is refreshed every this many batches (reading it waits for the device).
PROGRESS_EVERY = 20
#: Validation figure each ``select`` option maximises (losses and divergences are negated).
SELECT = {"loss": -1, "accuracy": 1, "macro_f1": 1, "balanced_accuracy": 1, "kl": -1, "ccc": 1, "map8": 1, "map2": 1}
#: Figures of the embedding (validation images query each other, paper 002's leave-one-out protocol).
RETRIEVAL_SELECT = ("map8", "map2")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd (momentum 0.9, as in the papers) or adamw
    lr: float | None = None  # default: 1e-3 fine-tuning, 3e-3 on a frozen backbone (SGD); a tenth for AdamW
    weight_decay: float = 5e-4
    step_size: int | None = None  # step decay every N epochs (default: a third of the epochs)
    lr_steps: tuple[int, ...] | None = None  # decay at these epochs instead (e.g. 30, 60)
    warmup_epochs: int = 0  # linear warm-up of the learning rate over the first epochs
    backbone_lr: float | None = None  # the backbone's own learning rate (default: the model's)
    accumulate: int = 1  # batches whose gradients add up to one optimizer step
    gamma: float = 0.1
    patience: int | None = 10  # early stopping: epochs without a better validation figure
    select: str = "loss"  # validation figure that picks the checkpoint
    freeze_backbone: bool = False
    tune_stages: int = 0  # train the backbone's last N stages only (EfficientNet); the rest is frozen and cached
    cache_views: int = 0  # with a cached frozen part: N random crops and flips of each image cached for training
    workers: int | None = None  # image-decoding processes (default: this machine's, see loader_workers)
    seed: int = 0
    init: str | None = None  # start from this run's (or checkpoint's) weights: transfer learning
    init_parts: tuple[str, ...] | None = None  # only these submodules from ``init`` (e.g. a detector)
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N, mps
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler)
    channels_last: bool = False  # NHWC memory format, faster for convolutions on GPUs and recent CPUs
    compile_backend: str | None = None  # torch.compile the training step with this backend ("inductor")
    sync_batchnorm: bool = False  # DDP on GPUs: BatchNorm statistics over all ranks' batches

    cache_budget: float | None = None  # GiB of frozen-backbone features kept on disk (default: 4 on a CPU, 0 on a GPU)

    def __post_init__(self):
        if self.workers is None:
            self.workers = loader_workers()

    def placement(self) -> Placement:
        return Placement.resolve(self.device, self.precision, self.channels_last, self.compile_backend,
                                 self.sync_batchnorm)

    def cache_budget_bytes(self, placement: Placement) -> float:
        """Above this, a frozen backbone runs on the fly instead of being cached (on a GPU that is faster
        than reading features back, so the default there is no cache)."""
        budget = self.cache_budget if self.cache_budget is not None else (0.0 if placement.device.type == "cuda" else 4.0)
        return budget * 2**30

    def lr_factor(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (0-based) over the base rate: warm-up, then step decay."""
        warm = min(1.0, (epoch + 1) / (self.warmup_epochs + 1)) if self.warmup_epochs else 1.0
        if self.lr_steps:
            passed = sum(epoch >= m for m in self.lr_steps)
        else:
            passed = epoch // (self.step_size or max(1, math.ceil(self.epochs / 3)))
        return warm * self.gamma ** passed

    @property
    def caches_features(self) -> bool:
        """Whether a frozen part of the backbone runs once per image and is cached (within the budget)."""
        return self.freeze_backbone or self.tune_stages > 0

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        base = 3e-3 if self.freeze_backbone else 1e-3
        return base if self.optimizer == "sgd" else base / 10


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    val_metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    bad_images: dict[int, str] = field(default_factory=dict)


# --- metrics for a task -------------------------------------------------------------------------


def task_metrics(task: str, taxonomy: Taxonomy, targets: Targets, rows: np.ndarray, predicted: dict[str, np.ndarray],
                 affect_scale: AffectScale | None = None) -> dict[str, float]:
    """Figures for the predictions of the samples ``rows`` (what :func:`prediction_tensors` names): class
    probabilities; for ``va`` valence and arousal (errors on ``affect_scale``, the dataset's own, when given;
    ``ccc`` and ``pearson``: the two dimensions' mean); for ``joint`` every space's (:func:`joint_metrics`)."""
    if task == "joint":
        return joint_metrics(targets, rows, predicted, affect_scale)
    probs = predicted["values"]
    if task == "va":
        out = M.affect_report(targets["affect"][rows], probs, affect_scale)
        for name in ("ccc", "pearson"):
            out[name] = float(np.mean([out.get(f"{d}_{name}", np.nan) for d in AFFECT_DIMENSIONS]))
        return out
    y = targets["label"][rows]
    pred = probs.argmax(1)
    out = M.classification_report(y, pred, taxonomy.num_classes)
    if task == "polarity":
        out["positive_recall"] = M.polarity_report(y, pred)["positive_recall"]
    elif sorted(taxonomy.classes) == sorted(MIKELS_WHEEL_ORDER):
        out.update(M.wheel_errors(y, pred, wheel_steps(taxonomy)))
    if "distribution" in targets:
        out.update(M.distribution_report(targets["distribution"][rows], probs))
    return out


def joint_metrics(targets: Targets, rows: np.ndarray, predicted: dict[str, np.ndarray],
                  affect_scale: AffectScale | None = None) -> dict[str, float]:
    """Figures of every label space the samples ``rows`` carry, each over the images labelled in it and named
    by it (``mikels_accuracy``, ``emotion6_kl``, ``valence_pearson``; with several rating sets, by set:
    ``oasis_valence_pearson``)."""
    out: dict[str, float] = {}
    several_rating_sets = sum(is_affect(k) for k in targets) > 1
    for key, target in targets.items():
        space, _, kind = key.rpartition(".")
        if kind == "label":
            labelled = target[rows] >= 0
            if labelled.any():
                probs = predicted[f"{space}.logits"][labelled]
                y = target[rows][labelled]
                figures = M.classification_report(y, probs.argmax(1), probs.shape[1])
                if f"{space}.distribution" in targets:
                    dist = targets[f"{space}.distribution"][rows][labelled]
                    voted = ~np.isnan(dist).any(1)
                    if voted.any():
                        figures.update(M.distribution_report(dist[voted], probs[voted]))
                out.update({f"{space}_{name}": value for name, value in figures.items()})
        elif is_affect(key):
            rated = ~np.isnan(target[rows]).all(1)
            if rated.any():
                figures = M.affect_report(target[rows][rated], rating_output(predicted, key)[rated], affect_scale)
                prefix = f"{key.partition('@')[2]}_" if several_rating_sets else ""  # oasis_valence_pearson
                out.update({prefix + name: value for name, value in figures.items()})
    return out


# --- batches from images or from cached features -------------------------------------------------


#: What a batch holds and how the model meets it: cached backbone features (the head alone), the cached output of
#: the backbone's frozen stages (its tuned stages and the head), images through a frozen backbone run under
#: no_grad (the head's view is the same as from the cache), or images through all.
FEEDS = ("cached", "stages", "frozen", "images")


def feed_for(config: TrainConfig, cache: FeatureCache | None) -> str:
    """The :data:`FEEDS` entry that training under ``config`` with ``cache`` (or without one) uses."""
    if cache is not None:
        return "stages" if config.tune_stages else "cached"
    return "frozen" if config.freeze_backbone else "images"


class _Forward(nn.Module):
    """The trainable computation, so DDP can wrap it."""

    def __init__(self, model: EmotionModel, feed: str):
        super().__init__()
        self.model, self.feed = model, feed

    def forward(self, inputs):
        return run_model(self.model, inputs, self.feed)


def run_model(model: EmotionModel, inputs: dict, feed: str) -> dict:
    """Outputs for one batch fed as ``feed`` (one of :data:`FEEDS`); side features (``dataset.extras``)
    ride along in every case."""
    if feed == "cached":
        return model.head_outputs(inputs)
    if feed == "stages":
        rest = {k: v for k, v in inputs.items() if k not in ("frozen", "frozen_levels")}
        return model.head_outputs({**model.backbone.from_frozen(inputs["frozen"], inputs.get("frozen_levels")), **rest})
    extras = {k: v for k, v in inputs.items() if k != "images"}
    if feed == "frozen":
        with torch.no_grad():
            features = model.backbone(inputs["images"])
        return model.head_outputs({**features, **extras})
    return model(inputs["images"], extras=extras)


class _Batches:
    """Yields ``(inputs, index, errors)`` for sample rows, from the feature cache or by decoding images."""

    def __init__(self, dataset: EmotionDataset, cache: FeatureCache | None, config: TrainConfig, model: EmotionModel,
                 placement: Placement, feed: str, balanced_labels: np.ndarray | None = None,
                 views: CachedViews | None = None):
        self.placement = placement  # batches come out on its device
        self.views = views  # training batches come from these random views instead of the cache's evaluation view
        self.paths = [s.path for s in dataset.samples]
        self.balanced_labels = balanced_labels  # training batches of P classes x M images (metric losses)
        missing = [k for k in model.extra_keys if k not in dataset.extras]
        if missing:
            raise ValueError(f"model {model.spec.get('name')} needs side features {', '.join(missing)}: give them as a "
                             f"dataset option, e.g. {dataset.kind}=ROOT:{missing[0]}=FILE")
        self.extras = {k: torch.from_numpy(dataset.extras[k]) for k in model.extra_keys}
        self.cache, self.config = cache, config
        self.affect_scale = dataset.affect_scale  # figures of valence and arousal on the dataset's own scale
        self.feed = feed
        # A frozen backbone sees what a cache would hold: random crops only where the cache keeps random views.
        augment = model.random_crops and (self.feed == "images" or (self.feed == "frozen" and config.cache_views > 0))
        self.train_tf = train_transform(model.preprocessing) if augment else eval_transform(model.preprocessing)
        self.eval_tf = eval_transform(model.preprocessing)
        self.min_side = model.preprocessing.resize
        self.loader: tuple | None = None  # the persistent loader and its plan, made on first use

    def count(self, rows: list[int], train: bool, epoch_seed: int, rank: int, world: int) -> int:
        """How many batches :meth:`__call__` plans for these arguments."""
        return len(self._plan(rows, train, epoch_seed, rank, world))

    def _plan(self, rows: list[int], train: bool, epoch_seed: int, rank: int, world: int) -> list[list[int]]:
        return epoch_batches(self.cache.usable(rows) if self.cache is not None else rows, self.config.batch_size,
                             train, epoch_seed, rank, world, self.balanced_labels)

    def __call__(self, rows: list[int], train: bool, epoch_seed: int, rank: int, world: int):
        batches = self._plan(rows, train, epoch_seed, rank, world)
        if self.cache is not None:
            for number, batch in enumerate(batches):
                idx = torch.as_tensor(batch, dtype=torch.long)
                features = (self.views.batch(idx, (epoch_seed, rank, number)) if train and self.views is not None
                            else self.cache.batch(idx))
                yield self.placement.batch({**features, **self._extras(idx)}), idx, []
            return
        if self.loader is None:  # one pool of workers for training and evaluation passes alike
            self.loader = planned_loader(self.paths, self.eval_tf, self.config.workers, self.placement.pin_memory,
                                         seeded_transform=self.train_tf, min_side=self.min_side)
        loader, plan = self.loader
        # Each image's crop and flip come from the epoch's seed and its row: the same, run after run.
        plan.batches = [[(r, epoch_seed * 1_000_003 + r) if train else r for r in batch] for batch in batches]
        for batch in loader:
            errors = batch["errors"]
            if len(batch["index"]):
                idx = batch["index"]
                yield self.placement.batch({"images": batch["image"], **self._extras(idx)}), idx, errors
            elif errors:
                yield None, None, errors

    def _extras(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.extras.items()}


def feature_cache(model: EmotionModel, dataset: EmotionDataset, cache_dir: Path, config: TrainConfig,
                  progress: bool = True, placement: Placement | None = None, view: int | None = None) -> FeatureCache | None:
    """The frozen backbone's features (or, tuning the last stages, its frozen stages' output) of every sample of
    ``dataset`` in the evaluation view (or random view number ``view``), on disk under ``cache_dir`` (built once,
    resumable); ``None`` when these and ``config.cache_views`` random views would take more than the cache budget:
    the backbone then runs on the fly."""
    placement = placement or config.placement()
    paths = [s.path for s in dataset.samples]
    source = frozen_source(model) if config.tune_stages else model.backbone
    keys = source.output_keys if config.tune_stages else list(model.feature_keys)
    meta = cache_key(paths, source, keys)
    if view is not None:
        meta["view"] = view
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    # caches of other backbones, weights or levels live side by side
    plan = plan_cache(source, keys, meta, Path(cache_dir) / f"features-{source.name}-{digest}")
    cache = open_cache(plan)
    if cache is not None:
        return cache
    budget = config.cache_budget_bytes(placement)
    copies = 1 + config.cache_views
    size = (f"{len(paths)} images x {plan.bytes / max(len(paths), 1) / 2**10:.0f} KiB"
            f"{f' x {copies} views' if copies > 1 else ''} = {copies * plan.bytes / 2**30:.2f} GiB")
    if copies * plan.bytes > budget:
        if is_main() and progress:
            console.print(f"backbone features would take {size}, above the cache budget of {budget / 2**30:.2f} GiB: "
                          "the frozen backbone runs on the fly")
        return None
    if is_main():
        if progress:  # one cache per view, each built in turn: say which, beside the size of them all
            which = "evaluation view" if view is None else f"random view {view + 1} of {config.cache_views}"
            console.print(f"caching backbone features, {which} ({size} in all): {plan.folder}")
        cache = build_cache(plan, source, paths, config.batch_size, config.workers, progress, placement, view)
    barrier()
    return cache if cache is not None else open_cache(plan)


# --- optimiser state in safetensors ------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"__optim__.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- the loop ---------------------------------------------------------------------------------------


def model_targets_arrays(model: EmotionModel, dataset: EmotionDataset) -> Targets:
    """The extra training targets ``model.target_keys`` asks for, per sample."""
    known = {"region_boxes": lambda: dataset_region_boxes(dataset, model.preprocessing)}
    unknown = [k for k in model.target_keys if k not in known]
    if unknown:
        raise ValueError(f"no dataset gives the training targets {', '.join(unknown)}")
    return {k: known[k]() for k in model.target_keys}


#: Losses that read each image's vote share p* of its dominant emotion (paper 001's L_multi and Eq. 10).
VOTE_SHARE_LOSSES = ("multitask", "label_prob")


def training_notes(model: EmotionModel, dataset: EmotionDataset) -> list[str]:
    """What a run's figures depend on that its settings do not show: a constant p* where the data has no votes."""
    loss = model.spec["loss"]
    if loss["name"] in VOTE_SHARE_LOSSES and not dataset.has_distribution:
        default = build_loss(loss["name"], model.taxonomy, **loss["args"]).loss.default_label_prob
        return [f"{dataset.spec or dataset.kind} has no votes: the label probability p* of loss {loss['name']} is the "
                f"constant {default} for every image (give the dataset's votes, e.g. fi=ROOT:votes=FILE)"]
    return []


def _run_meta(model: EmotionModel, dataset: EmotionDataset, fold: Fold, config: TrainConfig) -> dict:
    return {"dataset": dataset.spec, "task": model.task,
            "split": {"train": fold.train, "val": fold.val, "test": fold.test}, "train_config": asdict(config)}


def fit(model: EmotionModel, dataset: EmotionDataset, fold: Fold, out_dir: str | Path, config: TrainConfig | None = None,
        resume: bool = False, cache_dir: str | Path | None = None, progress: bool = True) -> FitResult:
    """Train ``model`` on ``fold.train``, choose the epoch on ``fold.val``; ``fold.test`` is not looked at."""
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    placement = config.placement()
    rank, world = init_distributed(placement.distributed_backend())
    torch.manual_seed(config.seed)
    task = model.task
    targets = {**task_targets_arrays(dataset, task), **model_targets_arrays(model, dataset)}
    loss_fn = placement.model(build_loss(model.spec["loss"]["name"], model.taxonomy, **model.spec["loss"]["args"]))
    if config.init:  # before any feature is cached: a frozen backbone's features are the transferred one's
        init_from(model, config.init, config.init_parts)
    placement.model(model)

    freeze_backbone_parts(model, config)
    cache_folder = Path(cache_dir or out_dir / "cache")
    cache = (feature_cache(model, dataset, cache_folder, config, progress and is_main(), placement)
             if config.caches_features else None)
    views = (CachedViews([feature_cache(model, dataset, cache_folder, config, progress and is_main(), placement, k)
                          for k in range(config.cache_views)]) if cache is not None and config.cache_views else None)
    balanced = getattr(loss_fn, "needs_class_balanced_batches", False)
    batches = _Batches(dataset, cache, config, model, placement, feed_for(config, cache),
                       targets["label"] if balanced else None, views)
    # A model that freezes parts of itself between epochs leaves parameters without gradients under DDP.
    staged = type(model).start_epoch is not EmotionModel.start_epoch
    if world > 1 and not staged:  # DDP waits for a gradient of every trainable parameter: freeze those never reached
        probe = [b for b in batches(fold.train[:config.batch_size], False, 0, 0, 1) if b[0] is not None]

        def probe_loss() -> torch.Tensor:
            inputs, idx, _ = probe[0]
            model.train()
            if config.freeze_backbone:
                model.backbone.eval()
            batch = placement.batch(batch_targets(targets, idx))
            with placement.autocast():
                outputs = run_model(model, {**inputs, "targets": batch}, batches.feed)
                return loss_fn(outputs, batch) + sum(outputs.get("losses", {}).values())

        unreached = freeze_unreached(model, probe_loss) if probe else []
        if unreached and is_main() and progress:
            console.print(f"{len(unreached)} parameter tensor(s) get no gradient from the loss and stay as they are "
                          f"(e.g. {', '.join(sorted(unreached)[:3])})", highlight=False)
    scaler = placement.grad_scaler()
    lr = config.learning_rate()
    params = [{"params": [p for p in model.head_parameters() if p.requires_grad]}]
    trainable_backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    if trainable_backbone:
        params.append({"params": trainable_backbone, "lr": config.backbone_lr or lr})
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use sgd or adamw")
    if config.accumulate < 1:
        raise ValueError("accumulate must be at least 1")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, config.lr_factor)
    if config.select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}")
    if config.select in RETRIEVAL_SELECT and model.task not in ("emotion", "polarity"):
        raise ValueError(f"select {config.select} ranks class-labelled validation images by their embedding: "
                         f"task {model.task} has no classes to rank by")

    run_meta = _run_meta(model, dataset, fold, config)
    start_epoch, best_score, best_epoch, stale = 0, -math.inf, -1, 0
    history: list[dict] = []
    best_val: dict[str, float] = {}
    seconds_before = 0.0
    bad_images: dict[int, str] = dict(cache.errors) if cache else {}
    last_path = out_dir / "last.safetensors"
    if resume and last_path.is_file():
        state, meta = load_checkpoint(last_path)
        if meta.get("spec") != model.spec or meta.get("split") != run_meta["split"]:
            raise CheckpointError(f"{last_path} belongs to another model or split; start a new run folder")
        changed = changed_settings(meta.get("train_config", {}), config)
        if changed:
            raise CheckpointError(f"{out_dir} was trained with other settings ({'; '.join(changed)}): resuming would "
                                  "mix two runs; use another output folder (or --init from this run)")
        load_into(model, {k: v for k, v in state.items() if not k.startswith("__optim__.")}, source=str(last_path))
        _restore_optimizer(opt, {k: v for k, v in state.items() if k.startswith("__optim__.")}, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start_epoch, best_score, best_epoch = meta["epoch"] + 1, meta["best_score"], meta["best_epoch"]
        stale, history, best_val = meta["stale"], meta["history"], meta.get("best_val", {})
        seconds_before = meta.get("train_seconds", 0.0)
        if is_main():
            console.print(f"resuming {out_dir} at epoch {start_epoch + 1}")

    runner = placement.training_step(_Forward(model, batches.feed), world, find_unused_parameters=staged)
    t0 = time.perf_counter()
    sign = SELECT[config.select]
    for epoch in range(start_epoch, config.epochs):
        if stale >= (config.patience or math.inf):
            break
        epoch_seed = config.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        model.start_epoch(epoch)
        model.train()
        if config.freeze_backbone:
            model.backbone.eval()  # frozen BN statistics
        total, count, pending = torch.zeros((), device=placement.device), 0, 0
        last = batches.count(fold.train, True, epoch_seed, rank, world) - 1
        opt.zero_grad(set_to_none=True)
        with Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                      TimeRemainingColumn(), console=console, transient=True, disable=not (progress and is_main())) as bar:
            bar_task = bar.add_task("train", total=len(fold.train), epoch=epoch + 1, loss=float("nan"))
            for number, (inputs, idx, errors) in enumerate(batches(fold.train, True, epoch_seed, rank, world)):
                bad_images.update(errors)
                if inputs is None:
                    continue
                batch = placement.batch(batch_targets(targets, idx))
                steps = pending + 1 == config.accumulate or number == last
                # DDP exchanges gradients only on the micro-batch that ends an accumulation
                with runner.no_sync() if world > 1 and not steps else contextlib.nullcontext():
                    with placement.autocast():
                        outputs = runner({**inputs, "targets": batch})  # a head may train parts of itself on them
                        loss = loss_fn(outputs, batch) + sum(outputs.get("losses", {}).values())
                    scaler.scale(loss / config.accumulate).backward()
                pending += 1
                if steps:
                    step_optimizer(opt, scaler)
                    pending = 0
                total += loss.detach().float() * len(idx)  # on the device: no host sync per step
                count += len(idx)
                if number % PROGRESS_EVERY == 0 and not bar.disable:
                    bar.update(bar_task, loss=float(total) / max(count, 1))
                bar.update(bar_task, advance=len(idx) * world)
        if pending:  # the planned last batch could not be read: its accumulation still makes a step
            step_optimizer(opt, scaler)
        epoch_lrs = [group["lr"] for group in opt.param_groups]
        sched.step()
        sync_buffers(model)  # so that validation and the saved weights see the same BN statistics on every rank
        train_loss = sum(gather(float(total))) / max(sum(gather(count)), 1)
        val_metrics, errors = evaluate_rows(model, batches, fold.val, targets, loss_fn, rank, world,
                                            retrieval=config.select in RETRIEVAL_SELECT)
        bad_images.update(errors)
        score = sign * (val_metrics["loss"] if config.select == "loss" else val_metrics[config.select])
        history.append({"epoch": epoch + 1, "lr": epoch_lrs, "train_loss": train_loss,
                        **{f"val_{k}": v for k, v in val_metrics.items()}})
        improved = best_epoch < 0 or score > best_score  # a NaN figure (one validation image) still keeps epoch 1
        if improved:
            best_score, best_epoch, best_val, stale = score, epoch, val_metrics, 0
        else:
            stale += 1
        if is_main():
            if improved:
                save_model(model, out_dir / "best.safetensors", include_backbone=saved_backbone(model, config),
                           **run_meta, epoch=epoch + 1, val_metrics=val_metrics)
            opt_tensors, opt_meta = _optimizer_tensors(opt)
            save_checkpoint(last_path, {**model_state(model), **opt_tensors},
                            {"spec": model.spec, **run_meta, "epoch": epoch, "best_score": best_score,
                             "best_epoch": best_epoch, "stale": stale, "history": history, "best_val": best_val,
                             "optimizer": opt_meta, "scheduler": sched.state_dict(),
                             "train_seconds": seconds_before + time.perf_counter() - t0})
            shown = " ".join(f"{k} {v:.4f}" for k, v in val_metrics.items() if k in ("loss", "accuracy", "macro_f1", "kl"))
            console.print(f"epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f}  val {shown}" + ("  *" if improved else ""))
        barrier()
    if bad_images and is_main():
        console.print(f"[yellow]{len(bad_images)} image(s) could not be used and were left out[/]")
    return FitResult(best_epoch + 1, sign * best_score, best_val, history, seconds_before + time.perf_counter() - t0,
                     bad_images)


def freeze_backbone_parts(model: EmotionModel, config: TrainConfig) -> None:
    """Stop the gradients of what ``config`` keeps frozen: the whole backbone, or all but its last stages (refused
    where the model reads levels those stages would freeze); cached random views are refused where nothing frozen
    is cached or the model trains on the evaluation view only."""
    if config.freeze_backbone and config.tune_stages:
        raise ValueError("freezing the backbone and tuning its last stages exclude each other: choose one")
    if config.cache_views and not config.caches_features:
        raise ValueError("cached random views need a cached frozen part: add --freeze-backbone or --tune-stages")
    if config.cache_views and not model.random_crops:
        raise ValueError(f"model {model.spec.get('name')} trains on the evaluation view only (its targets lie in that "
                         "view's frame): random views cannot be cached for it")
    if config.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    elif config.tune_stages:
        backbone = split_backbone(model, config.tune_stages)
        with eval_mode(backbone), torch.no_grad():
            cached = frozen_source(model)(blank_image(backbone))
            given = backbone.from_frozen(cached["frozen"], cached.get("frozen_levels"))
        missing = [k for k in model.feature_keys if k not in given]
        if missing:
            raise ValueError(f"model {model.spec.get('name')} reads the backbone's {', '.join(missing)}, which come from "
                             f"stages that tuning the last {config.tune_stages} would freeze: tune more of them")


def frozen_source(model: EmotionModel) -> nn.Module:
    """What a feature cache runs when ``model``'s last stages are tuned: its backbone's frozen stages, which also
    give the levels within them where the model reads levels (maiafa's and mlrcnn's finer ones)."""
    return model.backbone.frozen_stages(levels=bool({"levels", "level_means"} & set(model.feature_keys)))


def split_backbone(model: EmotionModel, count: int) -> Backbone:
    """``model``'s backbone with its last ``count`` stages tuned and the rest frozen (once)."""
    backbone = model.backbone
    if not isinstance(backbone, Backbone):
        raise ValueError(f"model {model.spec.get('name')} runs {type(backbone).__name__}, not one backbone whose "
                         "last stages could be tuned: fine-tune it all or freeze it")
    if backbone.first_tuned != backbone.stage_count - count:
        backbone.tune_last_stages(count)
    return backbone


def saved_backbone(model: EmotionModel, config: TrainConfig) -> bool | list[str]:
    """What of the backbone a checkpoint keeps: nothing of bundled weights left frozen, only the tuned stages of
    bundled weights, else all of it (a backbone that ``init`` loaded is not the bundled one)."""
    backbone_from_init = config.init is not None and (not config.init_parts or "backbone" in config.init_parts)
    if model.spec.get("backbone_weights") != "imagenet" or not config.caches_features or backbone_from_init:
        return True
    return [f"backbone.{part}" for part in model.backbone.tuned_parts(config.tune_stages)] if config.tune_stages else False


#: Settings of where and how fast a run goes, not of what it learns: a resumed run may change them.
RUN_ENVIRONMENT = ("workers", "device", "cache_budget", "compile_backend")


#: Settings that name a file: the same file reached by another path (a symlink, a relative path) is the same setting.
FILE_SETTINGS = ("init",)


def same_setting(name: str, saved, now) -> bool:
    if name in FILE_SETTINGS and isinstance(saved, str) and isinstance(now, str):
        return os.path.realpath(saved) == os.path.realpath(now)
    return saved == now


def changed_settings(saved: dict, config: TrainConfig) -> list[str]:
    """``"name saved -> now"`` for each training setting of ``config`` that differs from a run's ``saved`` one."""
    now = json.loads(json.dumps(asdict(config)))  # as the checkpoint's JSON holds it (tuples as lists)
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items()  # a setting newer than the run: its default
            if k not in RUN_ENVIRONMENT and k in saved and not same_setting(k, saved[k], v)]


def freeze_unreached(model: nn.Module, training_loss: Callable[[], torch.Tensor]) -> list[str]:
    """Stop the gradients of the trainable parameters that ``training_loss()`` (one batch's loss) does not
    reach, e.g. the fully connected layers of a VGG stream whose conv blocks alone are read; returns their names.
    BatchNorm statistics and the random state are restored, so training goes on as it would without this probe."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    buffers = [b.detach().clone() for b in model.buffers()]
    random_state = torch.get_rng_state()
    grads = torch.autograd.grad(training_loss(), [p for _, p in trainable], allow_unused=True)
    with torch.no_grad():
        for saved, buffer in zip(buffers, model.buffers()):
            buffer.copy_(saved)
    torch.set_rng_state(random_state)
    unreached = [(name, p) for (name, p), grad in zip(trainable, grads) if grad is None]
    for _, p in unreached:
        p.requires_grad_(False)
    return [name for name, _ in unreached]


def step_optimizer(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


@torch.inference_mode()
def evaluate_rows(model: EmotionModel, batches: _Batches, rows: list[int], targets: Targets, loss_fn: nn.Module | None,
                  rank: int = 0, world: int = 1, retrieval: bool = False) -> tuple[dict[str, float], dict[int, str]]:
    """Metrics (and mean loss) of ``model`` on sample ``rows``, gathered over all ranks; with ``retrieval``,
    also mAP8 and mAP2 of the ``embedding`` outputs, the rows querying each other."""
    model.eval()
    seen, predictions, losses, errors = [], [], [], {}
    for inputs, idx, errs in batches(rows, False, 0, rank, world):
        errors.update(errs)
        if inputs is None:
            continue
        with batches.placement.autocast():
            outputs = run_model(model, inputs, batches.feed)
            if loss_fn is not None:
                losses.append(float(loss_fn(outputs, batches.placement.batch(batch_targets(targets, idx)))) * len(idx))
        seen.append(idx.numpy())
        predicted = prediction_tensors(model.task, outputs)
        if retrieval:
            if "embedding" not in outputs:
                raise ValueError(f"model {model.spec.get('name')} gives no embedding to rank validation images by")
            predicted["embedding"] = torch.nn.functional.normalize(outputs["embedding"].float(), dim=1)
        predictions.append({k: v.float().cpu().numpy() for k, v in predicted.items()})
    parts = gather((seen, predictions, losses, errors))
    seen = np.concatenate([a for p in parts for a in p[0]] or [np.zeros(0, dtype=np.int64)])
    errors = {k: v for p in parts for k, v in p[3].items()}
    if len(seen) == 0:
        raise RuntimeError("no usable image to evaluate on")
    batches_out = [b for p in parts for b in p[1]]
    predicted = {k: np.concatenate([b[k] for b in batches_out]) for k in batches_out[0]}
    embedding = predicted.pop("embedding", None)
    out = task_metrics(model.task, model.taxonomy, targets, seen, predicted, batches.affect_scale)
    if embedding is not None:
        labels = targets["label"][seen]
        if np.bincount(labels).max() > 1:
            figures = evaluate_retrieval(embedding, labels, None, None, model.taxonomy.polarity)
            out.update({k: figures[k] for k in RETRIEVAL_SELECT})
        else:  # no image has another of its class to find
            out.update(dict.fromkeys(RETRIEVAL_SELECT, float("nan")))
    if loss_fn is not None:
        out["loss"] = sum(x for p in parts for x in p[2]) / len(seen)
    out["n"] = float(len(seen))
    return out, errors


def prediction_tensors(task: str, outputs: dict) -> dict[str, torch.Tensor]:
    """What a task's figures are computed from: class probabilities (``values``), valence and arousal for
    ``va``, and for ``joint`` every space's probabilities (``<space>.logits``, softmaxed) and ``affect``."""
    if task == "va":
        return {"values": outputs["affect"]}
    if task == "joint":
        return {k: (v.float().softmax(-1) if k.endswith(".logits") else v) for k, v in outputs.items()
                if k.endswith(".logits") or is_affect(k)}
    return {"values": outputs["logits"].float().softmax(-1)}


def check_labels_fit(model: EmotionModel, dataset: EmotionDataset) -> None:
    """Refuse, before any work, to score a model on labels it does not predict (class sets and order)."""
    if model.task == "joint":
        members = dataset.members if isinstance(dataset, JointDataset) else [dataset]
        unknown = {s for m in members for s in label_spaces(m) if not serves(model.spaces, s)}
        if unknown:
            raise ValueError(f"the model has no head for {', '.join(sorted(unknown))} (its spaces: "
                             f"{', '.join(model.spaces)})")
        return
    if model.task == "va":
        if not dataset.has_affect:
            raise ValueError(f"the model predicts valence and arousal, but {dataset.spec or dataset.kind} has no "
                             "ratings of them")
        return
    if model.task == "polarity":
        if not dataset.taxonomy.has_polarity:
            raise ValueError(f"the model predicts polarity, but the classes of {dataset.spec or dataset.kind} "
                             f"({dataset.taxonomy.name}) have none")
        return
    if tuple(model.taxonomy.classes) != tuple(dataset.taxonomy.classes):
        raise ValueError(f"the model predicts {model.taxonomy.name} ({', '.join(model.taxonomy.classes)}), but "
                         f"{dataset.spec or dataset.kind} is labelled in {dataset.taxonomy.name} "
                         f"({', '.join(dataset.taxonomy.classes)}): score it on a dataset of its classes")


def _batches_for(model: EmotionModel, dataset: EmotionDataset, config: TrainConfig, cache_dir: str | Path | None,
                 progress: bool, cache: FeatureCache | None = None) -> _Batches:
    """Batches for scoring, on the configured device with ``model`` moved there: from the frozen backbone's
    feature cache when there is one (``cache``, given, or the one under ``cache_dir``), else from images."""
    placement = config.placement()
    placement.model(model)
    if config.tune_stages:  # a model loaded from its checkpoint is not split yet
        split_backbone(model, config.tune_stages)
    if cache is None and cache_dir and config.caches_features:
        cache = feature_cache(model, dataset, Path(cache_dir), config, progress, placement)
    # scoring without a cache runs the whole model
    return _Batches(dataset, cache, config, model, placement, feed_for(config, cache) if cache is not None else "images")


def evaluate(model: EmotionModel, dataset: EmotionDataset, rows: list[int], config: TrainConfig | None = None,
             cache_dir: str | Path | None = None, progress: bool = True, with_errors: bool = False,
             cache: FeatureCache | None = None):
    """Metrics of a trained model on some samples of ``dataset`` (for the test split, say); with
    ``with_errors``, also ``{row: reason}`` of the images that could not be used. ``cache``: the frozen
    backbone's features of ``dataset`` already at hand."""
    check_labels_fit(model, dataset)
    batches = _batches_for(model, dataset, config or TrainConfig(), cache_dir, progress, cache)
    targets = task_targets_arrays(dataset, model.task)
    metrics, errors = evaluate_rows(model, batches, rows, targets, None, *rank_and_world())
    if batches.cache is not None:
        wanted = set(rows)
        errors = {**{r: e for r, e in batches.cache.errors.items() if r in wanted}, **errors}
    return (metrics, errors) if with_errors else metrics


def member_caches(model: EmotionModel, dataset: JointDataset, config: TrainConfig, cache_dir: str | Path | None,
                  progress: bool = True) -> list[FeatureCache | None]:
    """Each member's rows of the joint dataset's frozen-feature cache under ``cache_dir`` (views: one cache
    serves every member); ``None`` each where the features are not cached."""
    if config.tune_stages:
        split_backbone(model, config.tune_stages)
    cache = (feature_cache(model, dataset, Path(cache_dir), config, progress)
             if cache_dir and config.caches_features else None)
    return [cache.part(start, len(m)) if cache else None for m, start in zip(dataset.members, dataset.offsets)]


def evaluate_members(model: EmotionModel, dataset: JointDataset, rows: list[int], config: TrainConfig,
                     caches: Sequence[FeatureCache | None], progress: bool = True) -> list[tuple[EmotionDataset, dict]]:
    """(member, its figures on its own scale) for each member with images among the joint ``rows``;
    ``caches`` as :func:`member_caches` gives them."""
    return [(member, evaluate(model, member, member_rows, config, progress=progress, cache=cache))
            for member, member_rows, cache in zip(dataset.members, dataset.member_rows(rows), caches) if member_rows]


@torch.inference_mode()
def embed(model: EmotionModel, dataset: EmotionDataset, row_sets: Sequence[list[int]], config: TrainConfig | None = None,
          cache_dir: str | Path | None = None, progress: bool = True,
          cache: FeatureCache | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each set of rows: (the rows that could be used, their L2-normalised ``embedding`` outputs).
    The feature cache is read once for all sets; under DDP each rank embeds its share and every rank gets all."""
    batches = _batches_for(model, dataset, config or TrainConfig(), cache_dir, progress, cache)
    model.eval()
    out = []
    for rows in row_sets:
        seen, vectors = [], []
        for inputs, idx, _ in batches(rows, False, 0, *rank_and_world()):
            if inputs is None:
                continue
            seen.append(idx.numpy())
            with batches.placement.autocast():
                embedding = run_model(model, inputs, batches.feed)["embedding"].float()
            vectors.append(torch.nn.functional.normalize(embedding, dim=1).cpu().numpy())
        parts = gather((seen, vectors))
        seen, vectors = [a for p in parts for a in p[0]], [v for p in parts for v in p[1]]
        if not seen:
            raise RuntimeError("no usable image to embed")
        seen, vectors = np.concatenate(seen), np.concatenate(vectors)
        position = {row: i for i, row in enumerate(rows)}
        order = np.argsort([position[row] for row in seen.tolist()], kind="stable")  # the ranks' shares in row order
        out.append((seen[order], vectors[order]))
    return out

"""The ``emolens`` command: a thin layer over the Python API."""

from __future__ import annotations

import io
import math
import os
import re
import sqlite3
import sys
import warnings
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from .identity import ModelIdentity
from .images import ImageLoadError, load_image
from .storage import CheckpointError, output_folder, writable_target
from .terminal import MIN_PATH_WIDTH, display_path, fitted_table, result_table, room_for_paths, shortened

app = typer.Typer(help="Visual emotion analysis: predict, train, evaluate, index and search.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
datasets_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

console = Console()
err_console = Console(stderr=True)

#: Exit codes: every input got a result / some inputs failed / the command could not run / interrupted.
EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 3, 2, 130
#: What stops a command with a message and exit 2: bad arguments, unreadable files and checkpoints, a disk
#: that is full or read-only, a database that is not one.
CANNOT_RUN = (ValueError, KeyError, OSError, CheckpointError, sqlite3.Error)  # a malformed label file is a ValueError
#: Bounds the options share: beyond them a value is a typo, not a setting (and some would overflow SQLite or FAISS).
MAX_BATCH, MAX_WORKERS, MAX_HITS = 1_000_000, 256, 100_000
#: Fewer connections than this would let a handful of slow clients shut everyone else out.
MIN_CONNECTIONS = 64


def fail(message: str) -> None:
    """Print ``message`` literally (a path or an exception's text may hold ``[...]``) and exit 2."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))
    raise typer.Exit(EXIT_ERROR)


def output_format(fmt: str | None, out: Path | None, formats: tuple[str, ...]) -> str:
    """``--format`` as given, else the one ``--out``'s suffix names (``.json``, ``.csv``), else a table;
    exits with a message for a format not in ``formats``."""
    if fmt is None:
        suffix = out.suffix.lower().lstrip(".") if out is not None else ""
        fmt = suffix if suffix in formats else "table"
    if fmt not in formats:
        fail(f"unknown format {fmt!r}; use {', '.join(formats[:-1])} or {formats[-1]}")
    return fmt


def report_bad_files(errors: list[ImageLoadError]) -> None:
    if not errors:
        return
    paths = [display_path(e.path) for e in errors]
    room = min(max(map(len, paths)), max(MIN_PATH_WIDTH, err_console.width // 2))  # the reason folds beside it
    table = result_table(f"{len(errors)} file(s) could not be used")
    table.title_style = "bold yellow"
    table.add_column("path", overflow="fold", width=room)
    table.add_column("reason", overflow="fold")
    for path, e in zip(paths, errors):
        table.add_row(shortened(path, room), e.reason)
    err_console.print(table)


#: What the `torch` extra installs, and how a machine without a GPU gets PyTorch's smaller CPU build first.
TORCH_HINT = ("pip install 'emolens[torch]' (on a machine without a GPU, first: pip install torch torchvision "
              "--index-url https://download.pytorch.org/whl/cpu)")
TORCH_MODULES = ("torch", "torchvision", "timm", "safetensors", "pytorch_grad_cam", "matplotlib", "onnx")


def require_torch(command: str) -> None:
    """Stop ``command`` with what to install when PyTorch and its companions are not installed."""
    try:
        for module in TORCH_MODULES:
            __import__(module)
    except ImportError as e:
        fail(f"`emolens {command}` needs PyTorch and its companions ({e.name or e} is missing): {TORCH_HINT}")


def report_skipped(skipped: list[ImageLoadError]) -> None:
    """One line for the files a folder scan passed over (not image names): how many of each extension, with
    a few names; they are no failure, but never pass silently."""
    if not skipped:
        return
    by_extension: dict[str, list[str]] = {}
    for e in skipped:
        by_extension.setdefault(Path(e.path).suffix.lower() or "(none)", []).append(Path(e.path).name)
    kinds = "; ".join(f"{ext} {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                      for ext, names in sorted(by_extension.items(), key=lambda item: -len(item[1])))
    err_console.print(f"skipped {len(skipped)} file(s) whose names are not image names: {kinds}; name a file "
                      "itself to read it anyway", highlight=False, markup=False)


@app.command("list-models")
def list_models_cmd() -> None:
    """List the registered models."""
    require_torch("list-models")
    from .models import model_entries

    table = Table(title="emolens models")
    table.add_column("name", style="bold")
    table.add_column("what it is")
    table.add_column("paper")
    for entry in model_entries():
        table.add_row(entry.name, entry.summary, entry.paper)
    console.print(table)


@datasets_app.command("info")
def datasets_info(
    spec: str = typer.Argument(..., help="KIND=ROOT[:option=value,...], e.g. flickr_ldl=../shared/data/flickr_ldl"),
    check_images: bool = typer.Option(False, "--check-images", help="Open every image and report the unreadable ones."),
) -> None:
    """Counts per class, missing files, distribution summary and polarity balance of a dataset."""
    require_torch("datasets info")
    from .data import load_dataset

    try:
        ds = load_dataset(spec)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(str(e))
    tax = ds.taxonomy
    counts = ds.class_counts()
    n = len(ds)
    console.print(f"[bold]{ds.kind}[/] at {ds.root}: {n} images, taxonomy [bold]{tax.name}[/] ({tax.num_classes} classes)")
    if ds.missing:
        console.print(f"[yellow]{len(ds.missing)} listed image(s) are missing on disk and were skipped[/] (e.g. {', '.join(ds.missing[:3])})")
    for reason, count in sorted(ds.skipped.items()):
        console.print(f"[yellow]{count} entr(y/ies) skipped: {reason}[/]")
    if ds.ties:
        console.print(f"{ds.ties} sample(s) had a tied dominant emotion (given to the class listed first)")

    table = Table(title="classes (dominant emotion)")
    for col in ("class", "polarity", "images", "share"):
        table.add_column(col, justify="right" if col in ("images", "share") else "left")
    mean_dist = ds.distributions.mean(0) if ds.has_distribution else None
    if mean_dist is not None:
        table.add_column("mean distribution", justify="right")
    for i, cls in enumerate(tax.classes):
        pol = {1: "positive", 0: "negative", None: "-"}[tax.polarity[i]]
        row = [cls, pol, str(counts[cls]), f"{counts[cls] / max(n, 1):.3f}"]
        if mean_dist is not None:
            row.append(f"{mean_dist[i]:.3f}")
        table.add_row(*row)
    console.print(table)

    pol = ds.polarities
    console.print(f"polarity: {(pol == 1).sum()} positive, {(pol == 0).sum()} negative, {(pol < 0).sum()} without polarity")
    if ds.has_distribution:
        d = ds.distributions
        entropy = -(np.where(d > 0, d * np.log(np.maximum(d, 1e-12)), 0)).sum(1)
        console.print(f"distributions: mean dominant share {d.max(1).mean():.3f}, mean entropy {entropy.mean():.3f} nats "
                      f"(uniform: {np.log(tax.num_classes):.3f})")
    for part, what in ds.parts_found().items():
        console.print(f"{part}: {what}", highlight=False, markup=False)
    hints = [f"without the {part}, {without}" for part, without in ds.parts_missing().items()]
    if hints:
        console.print("; ".join(hints), highlight=False, markup=False)
    if check_images:
        errors = []
        with Progress(console=err_console, transient=True) as progress:
            for s in progress.track(ds.samples, description="checking images"):
                try:
                    load_image(s.path)
                except ImageLoadError as e:
                    errors.append(e)
        report_bad_files(errors)
        console.print(f"images checked: {n - len(errors)} readable, {len(errors)} unreadable")
        if errors:
            raise typer.Exit(EXIT_SOME_FAILED)


def train_config(o: dict):
    """The :class:`TrainConfig` that a training command's options (its ``ctx.params``) describe; an unknown
    or absent device is an error here, before any work."""
    from .engine import TrainConfig

    def listed(text: str | None, kind):
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip()) if text else None

    config = TrainConfig(
        epochs=o["epochs"], batch_size=o["batch_size"], optimizer=o["optimizer"], lr=o["lr"],
        freeze_backbone=o["freeze_backbone"], tune_stages=o["tune_stages"],
        cache_views=o["cache_views"], workers=o["workers"], seed=o["seed"], select=o["select"],
        patience=o["patience"] or None, init=o["init"], init_parts=listed(o["init_parts"], str), device=o["device"],
        precision=o["precision"], channels_last=o["channels_last"], weight_decay=o["weight_decay"],
        lr_steps=listed(o["lr_steps"], int), step_size=o["lr_step_every"], gamma=o["gamma"],
        warmup_epochs=o["warmup"], backbone_lr=o["backbone_lr"], accumulate=o["accumulate"],
        cache_budget=o["cache_budget"], compile_backend="inductor" if o["compile_step"] else None,
        sync_batchnorm=o["sync_bn"])
    config.placement()
    return config


EPOCHS = typer.Option(30, min=1, help="Training epochs.")
BATCH = typer.Option(32, "--batch-size", min=1, max=MAX_BATCH, help="Images per batch.")
OPTIM = typer.Option("sgd", help="sgd (momentum 0.9, step decay, as in the papers) or adamw.")
LR = typer.Option(None, help="Learning rate (default: 1e-3 fine-tuning, 3e-3 frozen; a tenth with adamw).")
FREEZE = typer.Option(False, "--freeze-backbone", help="Train only the model's own layers; the backbone's features are "
                      "cached on disk once (within --cache-budget) or computed on the fly.")
TUNE_STAGES = typer.Option(0, "--tune-stages", min=0, help="Train only the backbone's last N stages and its head conv "
                           "(EfficientNet backbones; BatchNorm statistics stay ImageNet's): the frozen stages' output "
                           "is cached like --freeze-backbone's features, so fine-tuning runs on a CPU.")
CACHE_VIEWS = typer.Option(0, "--cache-views", min=0, help="With --freeze-backbone or --tune-stages: also cache N random "
                          "crops and flips of each image; each training epoch takes every image from one of them "
                          "(augmentation at cache speed; evaluation keeps the plain view).")
LIMIT = typer.Option(None, "--limit", min=1, help="Use only N images of the dataset (each class in turn), for a quick check "
                     "of a long run; the same as the dataset option limit=N.")
CACHE_BUDGET = typer.Option(None, "--cache-budget", help="GiB of frozen-backbone features kept on disk (default 4 on a "
                            "CPU, 0 on a GPU); above it the frozen backbone runs on the fly.")
WORKERS = typer.Option(None, min=0, max=MAX_WORKERS, help="Image-decoding worker processes (default: the CPUs "
                       "this process may use, shared among torchrun's processes on the machine; at most 16).")
SEED = typer.Option(0, help="Seed for splits, initialisation and batches.")
SELECT = typer.Option("loss", help="Validation figure that picks the checkpoint: loss, accuracy, macro_f1, "
                     "balanced_accuracy, kl, ccc (va: valence's and arousal's mean), or map8 / map2 (the "
                     "embedding's mAP, validation images querying each other).")
PATIENCE = typer.Option(10, min=0, help="Stop after this many epochs without a better validation figure (0: no early stopping).")
INIT = typer.Option(None, "--init", help="Start from this run's weights (transfer learning; same model and classes). "
                    "In a benchmark, {fold} in the path is replaced by the fold number.")
INIT_PARTS = typer.Option(None, "--init-parts", help="Take only these parts (submodules, comma-separated, e.g. "
                          "detector,cam_head) from --init; the rest of the model may differ.")
TASK = typer.Option("emotion", help="emotion (the dataset's classes), polarity, distribution, or va (valence and "
                   "arousal: oasis, emotion6).")
DEVICE = typer.Option("auto", help="auto (CUDA when present; under torchrun the GPU of LOCAL_RANK), cpu, cuda, "
                      "cuda:N or mps.")
PRECISION = typer.Option("fp32", help="fp32, bf16 (autocast; CPUs and recent GPUs) or fp16 (autocast with a "
                         "gradient scaler; GPUs).")
CHANNELS_LAST = typer.Option(False, "--channels-last", help="NHWC memory format for convolutional backbones.")
PRECISION_INFER = typer.Option("fp32", "--precision", help="fp32, or int8 (ONNX Runtime on the CPU; about 1.7x "
                               "faster) where the model's int8 version passed its gate against fp32; else fp32 runs "
                               "and says why. Part of the model's identity: an index answers the precision it was "
                               "built with.")
INDEX_PRECISION = typer.Option(None, "--precision", help="fp32 or int8, as for `predict` (default: the precision "
                               "the --db index was built with, else fp32).")
INFER_DEVICE = typer.Option("cpu", help="cpu (the default: ONNX Runtime where the model exports), or auto, cuda, "
                            "cuda:N, mps to run the PyTorch model there.")
WEIGHT_DECAY = typer.Option(5e-4, "--weight-decay", help="Weight decay of the optimizer.")
LR_STEPS = typer.Option(None, "--lr-steps", help="Epochs at which the learning rate is multiplied by --gamma, "
                        "e.g. 30,60 (default: every --lr-step-every epochs).")
LR_STEP_EVERY = typer.Option(None, "--lr-step-every", help="Decay every N epochs (default: a third of the epochs).")
GAMMA = typer.Option(0.1, "--gamma", help="Factor of each learning-rate decay.")
WARMUP = typer.Option(0, "--warmup", min=0, help="Epochs of linear learning-rate warm-up.")
BACKBONE_LR = typer.Option(None, "--backbone-lr", help="Learning rate of the backbone when it trains (default: --lr).")
ACCUMULATE = typer.Option(1, "--accumulate", min=1, help="Batches whose gradients make one optimizer step "
                          "(effective batch = --batch-size x this).")
COMPILE = typer.Option(False, "--compile", help="torch.compile the training step (inductor; the first steps take "
                       "minutes to compile).")
SYNC_BN = typer.Option(False, "--sync-bn", help="Under torchrun on GPUs: BatchNorm statistics over every GPU's batch.")


def with_limit(spec: str, limit: int | None) -> str:
    """``spec`` with the dataset option ``limit=N`` added (when ``limit`` is given)."""
    if limit is None:
        return spec
    from .data import parse_spec

    return f"{spec}{',' if parse_spec(spec)[2] else ':'}limit={limit}"


@app.command()
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., help="NAME[:key=value,...], e.g. global:loss=multitask,lambda=0.4"),
    data: list[str] = typer.Option(..., help="KIND=ROOT[:option=value,...]; given twice or more, one model learns "
                                   "every dataset's labels (a joint model: one head per label space)."),
    out: Path = typer.Option(..., help="Run folder (checkpoints, protocol, metrics)."),
    task: str = TASK,
    protocol: str = typer.Option("split", help="split (80/5/15), kfold, or official (the dataset's own split)."),
    fold: int = typer.Option(0, min=0, help="Which fold of a k-fold protocol to train."),
    folds: int = typer.Option(5, min=2, help="k of the k-fold protocol."),
    backbone: str = typer.Option("efficientnet_lite0", help="timm backbone name."),
    backbone_weights: str = typer.Option("imagenet", help="'imagenet' (bundled), a local weights file, or 'none'."),
    freeze_backbone: bool = FREEZE, tune_stages: int = TUNE_STAGES, cache_views: int = CACHE_VIEWS,
    epochs: int = EPOCHS, batch_size: int = BATCH,
    optimizer: str = OPTIM,
    lr: float = LR, workers: int = WORKERS, seed: int = SEED, select: str = SELECT, patience: int = PATIENCE,
    init: str = INIT, init_parts: str = INIT_PARTS, device: str = DEVICE, precision: str = PRECISION,
    channels_last: bool = CHANNELS_LAST, weight_decay: float = WEIGHT_DECAY, lr_steps: str = LR_STEPS,
    lr_step_every: int = LR_STEP_EVERY, gamma: float = GAMMA, warmup: int = WARMUP, backbone_lr: float = BACKBONE_LR,
    accumulate: int = ACCUMULATE, cache_budget: float = CACHE_BUDGET, limit: int = LIMIT,
    compile_step: bool = COMPILE, sync_bn: bool = SYNC_BN,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint."),
) -> None:
    """Train a model; the checkpoint is chosen on validation data, then scored once on the test part."""
    require_torch("train")
    from .data import Protocol
    from .data.joint import JointDataset, joint_spec, open_datasets, protocol_for
    from .engine import evaluate, fit
    from .engine.distributed import is_main
    from .engine.trainer import evaluate_members, member_caches, training_notes
    from .models import create_model
    from .weights import load_model
    from .checkpoints import atomic_write_json

    try:
        output_folder(out)
        ds = open_datasets([with_limit(d, limit) for d in data])
        if isinstance(ds, JointDataset):
            model, task = joint_spec(model, ds), "joint"
        weights = None if backbone_weights.lower() == "none" else backbone_weights
        import torch

        torch.manual_seed(seed)  # the head's initial weights are part of what the seed fixes
        net = create_model(model, taxonomy=ds.taxonomy, task=task, backbone=backbone, backbone_weights=weights)
        config = train_config(ctx.params)
        proto_path = out / "protocol.json"  # written once the model and options are known to be sound
        if resume and proto_path.is_file():
            proto = Protocol.load(proto_path, ds)
        else:
            proto = protocol_for(ds, protocol, seed=seed, k=folds, task=task)
            if is_main():
                proto.save(proto_path)
        if not 0 <= fold < len(proto.folds):
            fail(f"fold {fold} does not exist: the protocol has {len(proto.folds)}")
        chosen = proto.folds[fold]
        result = fit(net, ds, chosen, out, config, resume=resume)
        # Every rank scores its share of the test part (the figures are gathered); rank 0 writes them.
        test, test_errors = evaluate(load_model(out), ds, chosen.test, config, cache_dir=out / "cache",
                                     with_errors=True)
        bad = {ds.samples[i].path.as_posix(): r for i, r in sorted({**result.bad_images, **test_errors}.items())}
        by_dataset = {}
        if isinstance(ds, JointDataset):  # each dataset's figures on its own scale
            best = load_model(out)
            caches = member_caches(best, ds, config, out / "cache")
            by_dataset = {m.spec: figures for m, figures in evaluate_members(best, ds, chosen.test, config, caches)}
        if is_main():
            notes = training_notes(net, ds)
            for note in notes:
                err_console.print(f"note: {note}", highlight=False, markup=False)
            atomic_write_json(out / "metrics.json", {"best_epoch": result.best_epoch, "val": result.val_metrics,
                                                     "test": test, "test_by_dataset": by_dataset, "notes": notes,
                                                     "train_seconds": result.train_seconds, "bad_images": bad})
            console.print(f"best epoch {result.best_epoch} (on validation); test: " +
                          ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "n"))
    except typer.Exit:  # click's Exit is a RuntimeError: let a reported failure through as it is
        raise
    except (*CANNOT_RUN, RuntimeError) as e:
        fail(str(e))
    if is_main() and bad:
        report_bad_files([ImageLoadError(path, reason) for path, reason in bad.items()])
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder or .safetensors checkpoint."),
    data: str = typer.Option(None, help="KIND=ROOT[:...]; default: the dataset the model was trained on."),
    split: str = typer.Option("test", help="test, val or train part of the run's split; 'all' for every sample."),
    batch_size: int = BATCH, workers: int = WORKERS, device: str = DEVICE, precision: str = PRECISION,
    channels_last: bool = CHANNELS_LAST,
) -> None:
    """Score a trained model on a part of its split, or on all of another dataset."""
    require_torch("evaluate")
    from .data.joint import open_datasets
    from .engine import TrainConfig, evaluate as evaluate_model
    from .weights import load_model

    try:
        model = load_model(run)
        spec = data or model.meta.get("dataset")
        if not spec:
            fail("the checkpoint names no dataset: pass --data")
        ds = open_datasets(spec)
        if split == "all":
            rows = list(range(len(ds)))
        elif spec == model.meta.get("dataset") and split in model.meta.get("split", {}):
            rows = model.meta["split"][split]
        else:
            fail(f"the split part {split!r} belongs to the training dataset; use --split all for another dataset")
        config = TrainConfig(batch_size=batch_size, workers=workers, device=device, precision=precision,
                             channels_last=channels_last)
        metrics = evaluate_model(model, ds, rows, config)
    except CANNOT_RUN as e:
        fail(str(e))
    table = Table(title=f"{run} on {spec} ({split}, {int(metrics.pop('n'))} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)


@app.command()
def benchmark(
    ctx: typer.Context,
    data: list[str] = typer.Option(..., help="KIND=ROOT[:...]; given twice or more, each model is the trunk of a "
                                   "joint model over every dataset's label spaces, scored on each dataset."),
    models: str = typer.Option(None, help="Model specs separated by ; or spaces (a spec may hold commas: "
                               "global:loss=multitask,lambda=0.4)."),
    recipe: Path = typer.Option(None, "--recipe", help="A paper's recipe (recipes/*.toml): its settings, each "
                                "overridden by an option given here, and the figure the paper reports."),
    model_arg: list[str] = typer.Option(None, "--model-arg", help="KEY=VALUE set in every model spec, e.g. "
                                        "detector_weights=coco.pth (repeatable)."),
    out: Path = typer.Option(Path("results"), help="Folder for folds, runs, feature cache and results.json."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Folder of the frozen-backbone feature cache (default: "
                                   "OUT/cache); benchmarks of the same images may share one, each cache being keyed "
                                   "by the images, the backbone's weights, the features and the view."),
    task: str = TASK, folds: int = typer.Option(5, min=2, help="k of the k-fold cross-validation."),
    backbone: str = typer.Option(None, help="timm backbone for every model (default: each model's default)."),
    backbone_weights: str = typer.Option("imagenet", help="'imagenet' (bundled), a local weights file, or 'none'."),
    freeze_backbone: bool = FREEZE, tune_stages: int = TUNE_STAGES, cache_views: int = CACHE_VIEWS,
    epochs: int = EPOCHS, batch_size: int = BATCH,
    optimizer: str = OPTIM,
    lr: float = LR, workers: int = WORKERS, seed: int = SEED, select: str = SELECT, patience: int = PATIENCE,
    init: str = INIT, init_parts: str = INIT_PARTS, device: str = DEVICE, precision: str = PRECISION,
    channels_last: bool = CHANNELS_LAST, weight_decay: float = WEIGHT_DECAY, lr_steps: str = LR_STEPS,
    lr_step_every: int = LR_STEP_EVERY, gamma: float = GAMMA, warmup: int = WARMUP, backbone_lr: float = BACKBONE_LR,
    accumulate: int = ACCUMULATE, cache_budget: float = CACHE_BUDGET, limit: int = LIMIT,
    compile_step: bool = COMPILE, sync_bn: bool = SYNC_BN,
    retrieval: bool = typer.Option(False, "--retrieval", help="Also score retrieval by embedding (mAP8, mAP2, NN, "
                                   "FT, ST, DCG, F1, ANMRR); a joint run scores the dataset of its first class space."),
    retrieval_protocol: str = typer.Option("gallery", "--retrieval-protocol", help="gallery (test images query the "
                                           "training images) or loo (each test image queries the other test images)."),
    protocol: str = typer.Option("kfold", help="kfold (--folds) or split (the papers' 80/5/15, one split)."),
) -> None:
    """k-fold cross-validation of several models on identical folds; prints mean ± std per model."""
    require_torch("benchmark")
    from .data import parse_spec
    from .data.joint import JointDataset, joint_spec, open_datasets
    from .engine.benchmark import headline_columns, run_benchmark
    from .engine.distributed import is_main
    from .recipes import load_recipe, with_model_args

    o = dict(ctx.params)
    paper = None
    try:
        output_folder(out)
        if recipe is not None:
            paper = load_recipe(recipe)
            o = recipe_options(ctx, paper, o)
            kinds = "+".join(parse_spec(d)[0] for d in data)
            if kinds != paper.dataset:
                err_console.print(f"recipe {paper.name} was made for {paper.dataset}, not {kinds}: its "
                                  "figures are not the paper's to compare with", highlight=False)
        if not o["models"]:
            fail("name the models to run (--models) or a recipe (--recipe)")
        specs = split_model_list(o["models"])
        if o["model_arg"]:
            specs = with_model_args(specs, dict(pair.partition("=")[::2] for pair in o["model_arg"]))
        ds = open_datasets([with_limit(d, o["limit"]) for d in data])
        if isinstance(ds, JointDataset):
            specs, o["task"] = [joint_spec(s, ds) for s in specs], "joint"
        config = train_config(o)
        weights = None if o["backbone_weights"].lower() == "none" else o["backbone_weights"]
        results = run_benchmark(ds, specs, o["task"], out, o["folds"], o["seed"], config, o["backbone"], weights,
                                progress=True, log=lambda m: err_console.print(m), retrieval=o["retrieval"],
                                protocol=o["protocol"], retrieval_protocol=o["retrieval_protocol"],
                                recipe=paper.about() if paper else None, cache_dir=cache_dir)
    except typer.Exit:
        raise
    except (*CANNOT_RUN, RuntimeError) as e:
        fail(str(e))
    if not is_main():  # under torchrun rank 0 reports
        return
    first = next(iter(results["models"].values()))["mean"]
    columns = headline_columns(first) + ["train_seconds", "infer_ms_per_image"]
    title = f"{results['folds']}-fold CV (mean ± std)" if o["protocol"] == "kfold" else "80/5/15 split"
    table = Table(title=f"{' + '.join(data)}: {o['task']}, {title}, seed {o['seed']}")
    wide = Console(width=max(console.width, 60 + 18 * len(columns)))
    table.add_column("model")
    for c in columns:
        table.add_column(c, justify="right")
    for spec, r in results["models"].items():
        table.add_row(spec, *[f"{r['mean'][c]:.3f} ± {r['std'][c]:.3f}" for c in columns])
    if paper is not None:
        rows = {"reported": paper.reported} if paper.reported else {}
        for row, figures in {**rows, **paper.paper_table}.items():
            table.add_row(f"paper {paper.paper}, {row}", *[f"{figures[c]:.3f}" if c in figures else "-" for c in columns],
                          style="italic")
    wide.print(table)
    if paper is not None:
        console.print(f"{paper.title}: {paper.reproduces}" + (f". Not reproduced here: {paper.cannot}" if paper.cannot else ""),
                      highlight=False)
        if paper.cpu_protocol:
            console.print(f"This project's CPU protocol, not the paper's: {paper.cpu_protocol}", highlight=False)
    console.print(f"results: {out / 'results.json'}")


def recipe_options(ctx: typer.Context, recipe, options: dict) -> dict:
    """``options`` with the recipe's settings where the command line left an option at its default, after
    checking that the user gave what the recipe requires."""
    from .recipes import MODEL_ARG

    params = {p.name: p for p in ctx.command.params}
    # by name: typer may carry its own copy of click, whose ParameterSource is another class
    given = {name for name in params if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    out = dict(options)
    for name, value in recipe.settings.items():
        if name not in params or name in ("data", "recipe", "out", "cache_dir"):
            raise ValueError(f"{recipe.path}: unknown setting {name!r}")
        if name not in given:
            try:
                out[name] = params[name].process_value(ctx, value)
            except typer.BadParameter as e:
                raise ValueError(f"{recipe.path}: setting {name!r}: {e.message}") from None
    model_args = {pair.partition("=")[0] for pair in out.get("model_arg") or []}
    for name, what in recipe.requires.items():
        supplied = name.removeprefix(MODEL_ARG) in model_args if name.startswith(MODEL_ARG) else name in given
        if not supplied:
            flag = f"--model-arg {name.removeprefix(MODEL_ARG)}=..." if name.startswith(MODEL_ARG) else \
                f"--{name.replace('_', '-')}"
            fail(f"recipe {recipe.name} needs {flag}: {what}")
    return out


def has_affect(predictions) -> bool:
    """Whether the model behind ``predictions`` rates valence and arousal."""
    return any(p.valence is not None for p in predictions)


def prediction_table(predictions, classes: list[str], width: int) -> Table:
    """One row per image with every class's probability where the terminal is wide enough; otherwise the
    top emotion, its probability, polarity, and valence and arousal (common scale, -1 to 1) where the model
    rates them, else the next two emotions. Paths are shortened to fit (file names whole)."""
    affect = has_affect(predictions)
    columns = {"emotion": [p.emotion for p in predictions], "p": [f"{p.probability:.2f}" for p in predictions],
               "polarity": [p.polarity or "-" for p in predictions]}
    if affect:
        columns |= {"valence": [f"{p.valence:+.2f}" for p in predictions],
                    "arousal": [f"{p.arousal:+.2f}" for p in predictions]}
    every_class = {**columns, **{c: [f"{p.distribution[c]:.2f}" for p in predictions] for c in classes}}
    runners_up = {**columns, "then": [", ".join(f"{c} {p.distribution[c]:.2f}" for c in sorted(
        (c for c in classes if c != p.emotion), key=lambda c: -p.distribution[c])[:2]) for p in predictions]}
    chosen = next((c for c in (every_class, *([] if affect else [runners_up])) if room_for_paths(width, c) >=
                   MIN_PATH_WIDTH), columns)
    return fitted_table(f"emolens: {len(predictions)} image(s)", [p.source for p in predictions], chosen, width,
                        left=("emotion", "polarity", "then"))


def index_precision(precision: str | None, built: ModelIdentity | None) -> str:
    """``--precision`` as given, else the precision of ``built``, the model an index was built with (fp32 without one)."""
    if precision is not None:
        return precision
    return built.precision if built is not None else "fp32"


def open_predictor(model: str | None, **options):
    """A :class:`Predictor`, saying on stderr what takes time (the first ONNX export of a model) and what
    went wrong on the way (one line each), so that stdout carries results alone."""
    import warnings

    from .predict import Predictor
    from .runtime import export_pending

    if options.get("backend", "auto") != "torch" and export_pending(model):
        err_console.print("exporting the model for ONNX Runtime (once per model; up to a minute)...", highlight=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            predictor = Predictor(model, **options)
        except ImportError as e:  # a PyTorch model, or --backend torch, on the core install
            raise RuntimeError(f"this model needs PyTorch ({e.name or e} is missing): {TORCH_HINT}") from e
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {w.message}", soft_wrap=True, highlight=False)
    return predictor


def split_model_list(models: str) -> list[str]:
    """Model specs contain commas (``global:loss=multitask,lambda=0.4``), so specs are separated by ';' or spaces."""
    return [m for m in re.split(r"[;\s]+", models.strip()) if m]


@app.command()
def predict(
    paths: list[str] = typer.Argument(None, help="Image files or folders (recursive); '-' reads a list from stdin."),
    model: str = typer.Option(None, help="Run folder, .safetensors or .onnx file (default: the embedded model)."),
    fmt: str = typer.Option(None, "--format", help="table, json or csv (default: as --out's suffix "
                            "names it, .json or .csv; else table)."),
    out: Path = typer.Option(None, "--out", help="Write the results to this file instead of standard output."),
    batch_size: int = BATCH,
    workers: int = typer.Option(None, min=0, max=MAX_WORKERS,
                                help="Decoding threads (default: CPUs, at most 4; 0 decodes in line)."),
    backend: str = typer.Option("auto", help="auto (ONNX Runtime where the model exports), onnx or torch."),
    device: str = INFER_DEVICE,
    precision: str = PRECISION_INFER,
    demo: bool = typer.Option(False, "--demo", help="Run on sample photos that scikit-learn ships."),
    engine: str = typer.Option("local", "--engine", help="local (this process), or ray: an actor pool on a Ray "
                               "cluster writing Parquet shards to --out (a folder or URI); a re-run skips finished "
                               "shards. Needs `pip install \"emolens[ray]\"`."),
    ray_address: str = typer.Option(None, "--ray-address", help="With ray: a running cluster's address (default: "
                                    "a local cluster on this machine's CPUs)."),
    actors: int = typer.Option(None, "--actors", min=1, max=100_000, help="With ray: actors (default: the "
                               "cluster's CPUs / --actor-cpus)."),
    actor_cpus: int = typer.Option(1, "--actor-cpus", min=1, max=256, help="With ray: CPUs (inference threads) per actor."),
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, max=10_000_000, help="With ray: images per "
                                   "Parquet shard (the unit of resumption)."),
    column: str = typer.Option("path", "--column", help="With ray: the column of paths or URIs in a .csv or "
                               ".parquet input list."),
) -> None:
    """Which emotions each image evokes: top emotion, its probability, polarity, the full distribution, and
    valence and arousal (-1 to 1) where the model rates them. Interrupted (Ctrl-C), it still gives the results of the images it finished."""
    from .images import scan_images
    from .predict import Prediction, PredictionError

    fmt = output_format(fmt, out, ("table", "json", "csv"))
    if engine not in ("local", "ray"):
        fail(f"unknown engine {engine!r}; use local or ray")
    inputs = list(paths or [])
    if demo:
        inputs += [str(p) for p in demo_images()]
    if inputs == ["-"] or "-" in inputs:
        inputs = [p for p in inputs if p != "-"] + [line.strip() for line in sys.stdin if line.strip()]
    if not inputs:
        fail("no images given: name files or folders, '-' for a list on stdin, or --demo")
    if engine == "ray":
        predict_on_ray(inputs, out, model, precision, ray_address, actors, actor_cpus, batch_size, shard_size,
                       column, device)
        return
    if out is not None:
        try:
            writable_target(out)  # refused before any image is scored, not after
        except OSError as e:
            fail(str(e))
    scan = scan_images(inputs)
    try:
        predictor = open_predictor(model, batch_size=batch_size, workers=workers, backend=backend, device=device,
                                   precision=precision)
    except Exception as e:  # any failure to build the model means nothing can run
        fail(f"cannot load model {model or 'default'}: {e}")
    good, bad, interrupted = [], [PredictionError(e.path, e.reason) for e in scan.errors], False
    try:
        with Progress(console=err_console, transient=True) as progress:
            bar = progress.add_task("predicting", total=len(scan.files))
            for results in predictor.predict_iter(scan.files):
                for r in results:
                    (good if isinstance(r, Prediction) else bad).append(r)
                progress.advance(bar, len(results))
    except KeyboardInterrupt:
        interrupted = True
    try:
        write_predictions(good, bad, predictor.taxonomy.classes, fmt, out, skipped=scan.skipped)
    except OSError as e:
        fail(f"cannot write {out or 'standard output'}: {e}")
    report_bad_files([ImageLoadError(e.source, e.reason) for e in bad])
    report_skipped(scan.skipped)
    if interrupted:
        done = len(good) + len(bad) - len(scan.errors)
        err_console.print(f"interrupted: results for the {done} of {len(scan.files)} image(s) finished"
                          + (f" are in {out}" if out else " are above"), highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    if bad:
        raise typer.Exit(EXIT_SOME_FAILED)


def predict_on_ray(inputs: list[str], out: Path | None, model, precision: str, address, actors, actor_cpus: int,
                   batch_size: int, shard_size: int, column: str, device: str) -> None:
    """``predict --engine ray``: Parquet shards in ``out``; rows of unusable images carry their reason."""
    if out is None:
        fail("--engine ray writes Parquet shards: give --out FOLDER (or a URI such as s3://bucket/scores)")
    try:
        import ray  # noqa: F401  (only whether it is installed)
        from .ray_scoring import list_sources, score_with_ray
        from .shards import is_uri
    except ImportError:
        fail('--engine ray needs Ray and pyarrow: pip install "emolens[ray]"')
    if not is_uri(str(out)):
        try:
            output_folder(out)
        except OSError as e:
            fail(f"cannot write shards to {out}: {e}")
    sources, errors = list_sources(inputs, column)
    report_bad_files(errors)
    if not sources:
        fail("no images to score")
    try:
        with Progress(console=err_console, transient=True) as progress:
            bar = progress.add_task(f"scoring on Ray into {out}", total=len(sources))
            report = score_with_ray(sources, str(out), model, precision, address, actors, actor_cpus, batch_size,
                                    shard_size, device, on_shard=lambda n: progress.advance(bar, n))
    except KeyboardInterrupt:
        err_console.print(f"interrupted: the finished shards are in {out}; run the same command again to resume",
                          highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    except (ValueError, OSError, ConnectionError) as e:  # another run's folder, an unreachable cluster or store
        fail(f"cannot score on Ray: {e}")
    console.print(f"{out}: {report.shards} shard(s) of {len(sources)} image(s); this run scored {report.scored} "
                  f"shard(s) ({report.images} images, {report.failed} could not be used) in {report.seconds:.1f} s; "
                  f"{report.skipped} were already done", highlight=False)
    if report.failed or errors:
        raise typer.Exit(EXIT_SOME_FAILED)


def write_predictions(good, bad, classes: list[str], fmt: str, out: Path | None,
                      skipped: list[ImageLoadError] = ()) -> None:
    """Predictions (and the inputs that failed; in JSON, the files a folder scan skipped too) as a table,
    JSON or CSV, on stdout or atomically into ``out``."""
    import csv
    import io
    import json

    buffer = io.StringIO()
    if fmt == "json":
        json.dump({"predictions": [p.to_dict() for p in good],
                   "errors": [{"source": e.source, "reason": e.reason} for e in bad],
                   "skipped": [{"source": e.path, "reason": e.reason} for e in skipped]}, buffer, indent=2)
        buffer.write("\n")
    elif fmt == "csv":
        writer = csv.writer(buffer)
        affect = has_affect(good)
        writer.writerow(["source", "emotion", "probability", "polarity", "positive_probability",
                         *(["valence", "arousal"] if affect else []), *classes])
        for p in good:
            writer.writerow([p.source, p.emotion, f"{p.probability:.4f}", p.polarity or "",
                             "" if p.positive_probability is None else f"{p.positive_probability:.4f}",
                             *([f"{p.valence:.4f}", f"{p.arousal:.4f}"] if affect else []),
                             *[f"{p.distribution[c]:.4f}" for c in classes]])
    elif not good:  # the table of the files that failed says it all
        pass
    elif out is None:
        console.print(prediction_table(good, classes, console.width))
        return
    else:
        buffer.write(rendered(prediction_table(good, classes, 200)))
    write_text(out, buffer.getvalue())


def rendered(table: Table, width: int = 200) -> str:
    """A table as plain text, for a file."""
    console_to_text = Console(file=io.StringIO(), width=width)
    console_to_text.print(table)
    return console_to_text.file.getvalue()


def write_text(out: Path | None, text: str) -> None:
    """``text`` on standard output, or atomically into the regular file ``out`` (a link: into its target)."""
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()  # a full or closed stream fails here, where the caller reports it
    else:
        from .storage import atomic_write_bytes

        atomic_write_bytes(out, text.encode())


@app.command()
def index(
    paths: list[str] = typer.Argument(None, help="Image files or folders (recursive) to index."),
    db: Path = typer.Option(..., help="Index folder (SQLite metadata + FAISS vectors); created if absent."),
    shards: str = typer.Option(None, "--from", help="Instead of images: a folder (or URI) of scored Parquet shards "
                               "(`predict --engine ray`), added without scoring again; the vectors are kept out of core "
                               "(float16 rows on disk; above 100,000 an IVF-PQ index on FAISS's on-disk lists)."),
    model: str = typer.Option(None, help="Run folder, .safetensors or .onnx file (default: the embedded model)."),
    batch_size: int = BATCH,
    backend: str = typer.Option("auto", help="auto, onnx or torch."),
    device: str = INFER_DEVICE,
    precision: str = INDEX_PRECISION,
) -> None:
    """Embed a folder tree into a persistent affective index; re-running adds, updates and drops files.
    A killed run resumes without re-embedding what it finished."""
    from .retrieval.index import AffectiveIndex, AffectiveIndexError, built_with

    if shards is not None:
        if paths:
            fail("give image folders or --from SHARDS, not both")
        index_from_shards(shards, db)
        return
    if not paths:
        fail("name image files or folders to index, or --from a folder of scored shards")

    try:
        predictor = open_predictor(model, batch_size=batch_size, backend=backend, keep=("embedding",), device=device,
                                   precision=index_precision(precision, built_with(db)))
        store = AffectiveIndex(db, create=True)
    except Exception as e:  # any failure to build the model or open the index means nothing can run
        fail(f"cannot index: {e}")
    try:
        with Progress(console=err_console, transient=True) as progress:
            bar = progress.add_task("indexing", total=None)
            report = store.update(paths, predictor, on_batch=lambda n: progress.advance(bar, n))
    except KeyboardInterrupt:
        err_console.print(f"interrupted: every finished batch is kept in {db}; run the same command again to "
                          "resume where it stopped", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    except (AffectiveIndexError, *CANNOT_RUN, RuntimeError) as e:  # faiss reports a failed write as RuntimeError
        fail(f"cannot write the index in {db}: {e}")
    finally:
        store.close()
    console.print(f"{db}: {report.total} image(s) in the index; this run: {report.added} added, {report.updated} "
                  f"updated, {report.removed} removed, {report.unchanged} unchanged, {len(report.failed)} could not "
                  "be used", highlight=False)
    if report.repaired:
        console.print(f"repaired the emotion scores of {report.repaired} row(s) of a damaged index")
    report_bad_files([ImageLoadError(e.source, e.reason) for e in report.failed])
    report_skipped(report.skipped)
    if report.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def index_from_shards(shards: str, db: Path) -> None:
    """``index --from``: the rows of scored shards into the index in ``db``."""
    from .retrieval.index import AffectiveIndex, AffectiveIndexError

    try:
        import pyarrow  # noqa: F401  (only whether it is installed)
    except ImportError:
        fail('--from reads Parquet shards: pip install "emolens[ray]"')
    try:
        store = AffectiveIndex(db, create=True)
    except AffectiveIndexError as e:
        fail(f"cannot index: {e}")
    try:
        with Progress(console=err_console, transient=True) as progress:
            bar = progress.add_task(f"indexing the shards of {shards}", total=None)
            report = store.update_from_shards(shards, on_shard=lambda n: progress.advance(bar, n))
    except KeyboardInterrupt:
        err_console.print(f"interrupted: every finished shard is kept in {db}; run the same command again to resume",
                          highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    except (AffectiveIndexError, *CANNOT_RUN, RuntimeError) as e:
        fail(f"cannot index {shards} into {db}: {e}")
    finally:
        store.close()
    console.print(f"{db}: {report.total} image(s) in the index; this run: {report.shards} shard(s), {report.added} "
                  f"added, {report.failed} row(s) with an error left out; {report.skipped} shard(s) taken before",
                  highlight=False)


@app.command()
def search(
    query: str = typer.Argument(None, help="An image: find the indexed images that feel most like it."),
    db: Path = typer.Option(..., help="Index folder made by `emolens index`."),
    emotion: str = typer.Option(None, help="Instead of an image: the images most likely to evoke this emotion."),
    valence: str = typer.Option(None, help="Keep to images whose valence lies in LOW:HIGH (common scale, -1 "
                                "unpleasant to 1 pleasant; e.g. 0.5:1). Alone: the images nearest the range's centre."),
    arousal: str = typer.Option(None, help="Keep to images whose arousal lies in LOW:HIGH (-1 calm to 1 excited)."),
    k: int = typer.Option(10, "-k", min=1, max=MAX_HITS, help="How many results."),
    model: str = typer.Option(None, help="The model the index was built with (default: the embedded model)."),
    precision: str = INDEX_PRECISION,
    fmt: str = typer.Option(None, "--format", help="table or json (default: json where --out ends in .json)."),
    out: Path = typer.Option(None, "--out", help="Write the results to this file instead of standard output."),
) -> None:
    """Affective search: by example image, by emotion, or by valence and arousal; ranges narrow any of them."""
    import json

    from .retrieval.index import AffectFilter, AffectiveIndex, AffectiveIndexError

    fmt = output_format(fmt, out, ("table", "json"))
    try:
        within = AffectFilter.parse(valence, arousal)
        if out is not None:
            writable_target(out)  # refused before the search, not after it
    except (ValueError, OSError) as e:
        fail(str(e))
    if query is not None and emotion is not None or not (query or emotion or within):
        fail("give a query image or --emotion (one of them), or --valence/--arousal ranges")
    ranges = ", ".join(f"{name} {r.low:g} to {r.high:g}" for name, r in within.ranges())
    try:
        store = AffectiveIndex(db)
        if emotion is not None:
            hits, title = store.search_emotion(emotion, k, within), f"images most likely to evoke {emotion}"
        elif query is not None:
            predictor = open_predictor(model, keep=("embedding",), precision=index_precision(precision, store.model))
            found, hits = store.search_image(query, predictor, k, within)
            title = f"feels like {query} ({found.emotion} {found.probability:.2f})"
        else:
            hits, title = store.search_affect(within, k), "images nearest the centre of the ranges (score: distance)"
        if not hits:
            err_console.print(f"no image found: {why_empty(store, within)}", highlight=False, markup=False)
    except ImageLoadError as e:
        fail(f"{e.path}: {e.reason}")
    except (AffectiveIndexError, KeyError) as e:
        fail(str(e.args[0]) if e.args else str(e))
    except CANNOT_RUN as e:
        fail(f"cannot search {db}: {e}")
    if fmt == "json":
        text = json.dumps({"hits": [h.__dict__ for h in hits]}, indent=2) + "\n"
    else:
        table = search_table(title + (f"; {ranges}" if ranges else ""), hits, console.width if out is None else 200)
        if out is None:
            if hits:  # with none, the line on stderr says why
                console.print(table)
            return
        text = rendered(table)
    try:
        write_text(out, text)
    except OSError as e:
        fail(f"cannot write {out or 'standard output'}: {e}")


def why_empty(store, within) -> str:
    """Why a search of ``store`` found nothing: an empty index, or ranges that hold no image of it."""
    if len(store) == 0:
        return "the index holds no image"
    if not within:
        return "no indexed image is still the file it was (run `emolens index` again)"
    spans = store.affect_spans()
    held = "; ".join(f"its {name} spans {low:+.2f} to {high:+.2f}" for name, (low, high) in spans.items())
    return f"no image of the {len(store)} in the index lies in the ranges ({held})"


def search_table(title: str, hits, width: int) -> Table:
    """Ranked hits: score, top emotion, its probability, polarity, and valence and arousal where rated."""
    columns = {"score": [f"{h.score:.3f}" for h in hits], "emotion": [h.emotion for h in hits],
               "p": [f"{h.probability:.2f}" for h in hits], "polarity": [h.polarity or "-" for h in hits]}
    if any(h.valence is not None for h in hits):
        columns |= {"valence": [f"{h.valence:+.2f}" for h in hits], "arousal": [f"{h.arousal:+.2f}" for h in hits]}
    return fitted_table(title, [h.path for h in hits], columns, width,
                        before={"#": [str(rank) for rank in range(1, len(hits) + 1)]}, left=("emotion", "polarity"))


@app.command()
def serve(
    model: str = typer.Option(None, help="Run folder, .safetensors or .onnx file (default: the embedded model)."),
    db: Path = typer.Option(None, help="Index folder for search (made by `emolens index`)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free one)."),
    max_upload_mb: float = typer.Option(20, min=0.01, max=1024, help="Largest accepted upload per file, MiB."),
    max_files: int = typer.Option(16, min=1, max=1024, help="Most images per request."),
    device: str = INFER_DEVICE,
    precision: str = INDEX_PRECISION,
    max_connections: int = typer.Option(2048, min=MIN_CONNECTIONS, max=1_000_000, help="Connections open at once "
                                        "(silent ones are closed after 10 s, slow bodies after 60 s); more get 503."),
    allowed_host: list[str] = typer.Option(None, "--allowed-host", help="Another host name browsers may reach "
                                           "the server by (repeatable; loopback names and --host always are)."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Server processes, each with its model, "
                                "sharing the CPUs (the connection and queue limits hold per process)."),
) -> None:
    """The JSON API (OpenAPI at /docs) for prediction and affective search."""
    import json
    from dataclasses import asdict

    import uvicorn

    from .retrieval.index import built_with
    from .server import LOOPBACK_HOSTS, SETTINGS_VARIABLE, HeaderTimeoutH11, Limits, create_app

    if not math.isfinite(max_upload_mb):  # click's range check lets NaN through
        fail(f"--max-upload-mb must be a number of MiB, got {max_upload_mb}")
    hosts = (*LOOPBACK_HOSTS, *([host] if host not in ("0.0.0.0", "::") else []), *(allowed_host or []))
    limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_files=max_files)
    precision = index_precision(precision, built_with(db) if db is not None else None)
    try:  # with several workers too: a bad model or index is said here, once, not by each worker
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            api = create_app(model, db, limits, allowed_hosts=hosts, device=device, precision=precision,
                             workers=workers)
    except Exception as e:  # any failure to load the model or index means nothing can run
        fail(f"cannot start: {e}")
    for w in caught:  # e.g. int8 asked for and fp32 kept, with the reason
        err_console.print(f"[yellow]warning:[/] {w.message}", soft_wrap=True, highlight=False)
    raise_open_file_limit(max_connections + 256)
    # Connections beyond the limit get 503; idle keep-alive and silent new connections are closed.
    options = dict(host=host, port=port, http=HeaderTimeoutH11, limit_concurrency=max_connections,
                   timeout_keep_alive=5, backlog=2048, timeout_graceful_shutdown=10)
    if workers == 1:
        uvicorn.run(api, **options)
        return
    del api  # each worker builds its own
    os.environ[SETTINGS_VARIABLE] = json.dumps({
        "model": None if model is None else os.path.abspath(model) if os.path.exists(model) else model,
        "db": None if db is None else os.path.abspath(db), "limits": asdict(limits), "allowed_hosts": list(hosts),
        "device": device, "precision": precision, "workers": workers})
    uvicorn.run("emolens.server:app_from_environment", factory=True, workers=workers, **options)


@app.command()
def explain(
    paths: list[str] = typer.Argument(..., help="Image files or folders (recursive)."),
    out: Path = typer.Option(..., help="Folder for the PNGs (one per image)."),
    model: str = typer.Option("default", help="Run folder, .safetensors file, 'default', or a registered model "
                                              "spec (its head untrained: for looking at the architecture only)."),
    method: str = typer.Option("gradcam", help="gradcam or gradcam++ (seconds an image on a CPU), or scorecam "
                                               "(one forward pass per channel: minutes an image on a CPU)."),
    target: str = typer.Option(None, help="Explain this emotion instead of the predicted one."),
    device: str = INFER_DEVICE,
    precision: str = typer.Option("fp32", "--precision", help="int8: report the distribution, polarity and "
                                  "valence/arousal of the int8 model `predict --precision int8` runs (the maps "
                                  "come from the fp32 weights' gradients)."),
) -> None:
    """Where the emotion comes from: class-activation maps and the model's own maps over each image, with its distribution."""
    require_torch("explain")
    from .explain import MANIFEST, METHODS, explain_files, output_names
    from .images import scan_images

    if method not in METHODS:
        fail(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    try:
        output_folder(out)
    except OSError as e:
        fail(f"cannot write explanations to {out}: {e}")
    try:
        from .engine.placement import resolve_device

        resolve_device(device)
        loaded = load_any_model(model)
        if target is not None:
            loaded.taxonomy.index(target)
        numbers = open_predictor(model, precision=precision) if precision != "fp32" else None
    except Exception as e:  # any failure to build the model means nothing can run
        fail(f"cannot explain with {model}: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    scan = scan_images(paths)
    with Progress(console=err_console, transient=True) as progress:
        bar = progress.add_task(f"explaining {len(scan.files)} image(s) with {method}", total=len(scan.files))
        try:
            written, errors = explain_files(loaded, scan.files, out, method, target,
                                            on_image=lambda: progress.advance(bar), device=device,
                                            numbers=numbers)
        except OSError as e:
            fail(str(e))
    console.print(f"wrote {len(written)} explanation(s) to {out}; which image each explains: {out / MANIFEST}",
                  highlight=False, soft_wrap=True)  # paths unbroken, for copying
    renamed = [(source, png) for source, png in zip(scan.files, output_names([str(f) for f in scan.files]))
               if png != f"{Path(source).stem}.png" and (out / png) in written]
    for source, png in renamed:  # same-named images from different folders, or names made file-system safe
        console.print(f"  {display_path(str(source))} -> {png}", highlight=False, markup=False, soft_wrap=True)
    bad = list(scan.errors) + errors
    report_bad_files(bad)
    report_skipped(scan.skipped)
    if bad:
        raise typer.Exit(EXIT_SOME_FAILED)


def load_any_model(source: str):
    """A saved model (run folder, ``.safetensors``, ``default``) or a fresh registered one by spec."""
    from .models import create_model, list_models
    from .weights import load_model

    if str(source).endswith(".onnx"):
        raise CheckpointError("an ONNX export cannot be explained (Grad-CAM needs the network's gradients): "
                              "give the run folder or .safetensors file it was exported from")
    if source == "default" or Path(source).exists():
        return load_model(source)
    if source.split(":", 1)[0] not in list_models():
        raise CheckpointError(f"no such file or folder, and no registered model of that name "
                              f"(models: {', '.join(list_models())})")
    err_console.print(f"[yellow]{source}: a fresh model with an untrained head; its explanations show the "
                      "architecture, not learned emotions[/]")
    return create_model(source)


@app.command()
def export(
    onnx: Path = typer.Option(..., help="Where to write the .onnx file (its metadata goes beside it as .json)."),
    model: str = typer.Option(None, help="Run folder or .safetensors file (default: the embedded model)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or int8: quantised statically, calibrated on "
                                  "--calibration images of --data, and written only where it passes its gate "
                                  "against fp32 on --data (task figures on 5-fold test parts, top-emotion agreement)."),
    data: list[str] = typer.Option(None, "--data", help="With int8: KIND=ROOT, the model's own datasets (repeatable)."),
    calibration: int = typer.Option(300, "--calibration", min=10, max=100_000, help="With int8: calibration images."),
) -> None:
    """Export a model to ONNX for ONNX Runtime: faster CPU inference, no PyTorch needed to run it."""
    require_torch("export")
    from .runtime import PRECISIONS, ExportError, export_onnx
    from .weights import load_model

    if precision not in PRECISIONS:
        fail(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not data:
        fail("int8 needs --data KIND=ROOT: the images it is calibrated on and gated against fp32 with")
    try:
        loaded = load_model(model or "default")
    except Exception as e:  # any failure to build the model means nothing can run
        fail(f"cannot load model {model or 'default'}: {e}")
    try:
        if precision == "int8":
            export_int8(loaded, onnx, data, calibration)
            return
        data_bytes, meta = export_onnx(loaded, onnx)
    except ExportError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {onnx}: {e}")
    console.print(f"wrote {onnx.with_suffix('.onnx')} ({len(data_bytes) / 2**20:.1f} MiB; outputs: "
                  f"{', '.join(meta['outputs'])})")


def export_int8(loaded, onnx: Path, data: list[str], calibration: int) -> None:
    """Quantise ``loaded`` to int8 on ``data`` and write it to ``onnx`` where it passes its gate."""
    import tempfile

    from .data import load_dataset
    from .quantize import build_int8
    from .runtime import export_onnx
    from .storage import atomic_write_bytes

    try:
        datasets = [load_dataset(spec) for spec in data]
    except Exception as e:  # unreadable label files, missing folders
        fail(f"cannot read the data: {e}")
    paths = [str(s.path) for d in datasets for s in d.samples]
    chosen = sorted(np.random.default_rng(0).choice(len(paths), min(calibration, len(paths)), replace=False))
    calibrated_on = f"{len(chosen)} images of {', '.join(d.spec for d in datasets)} (seed 0)"
    with tempfile.TemporaryDirectory(prefix="emolens-export-") as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(loaded, fp32_path)
        with Progress(console=err_console, transient=True) as progress:
            progress.add_task(f"calibrating on {len(chosen)} images, correcting biases, measuring against fp32",
                              total=None)
            gate = build_int8(fp32_path, [paths[i] for i in chosen], datasets, calibrated_on, int8_path)
        for name, value in gate.fp32.items():
            console.print(f"{name}: fp32 {value:.4f}, int8 {gate.int8[name]:.4f}", highlight=False)
        console.print(f"top emotion agrees on {gate.agreement:.3f} of {gate.images} images", highlight=False)
        if not gate.passed:
            fail(f"not written: {gate.reason}")
        target = Path(os.path.realpath(onnx.with_suffix(".onnx")))  # through a link, to its target
        for suffix in (".onnx", ".json"):
            atomic_write_bytes(target.with_suffix(suffix), int8_path.with_suffix(suffix).read_bytes())
    console.print(f"wrote {onnx.with_suffix('.onnx')} (int8, {target.stat().st_size / 2**20:.1f} MiB); run it with "
                  "--model", highlight=False)


def raise_open_file_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` sockets and files where the hard limit allows (soft limits are often 1024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: the system's limit stays
        pass


def demo_images() -> list[Path]:
    """Photos that scikit-learn ships (a temple in China, a flower)."""
    from importlib import resources

    folder = Path(str(resources.files("sklearn.datasets") / "images"))
    return sorted(folder.glob("*.jpg"))


def main() -> None:
    """The ``emolens`` command. Output that never reached standard output (a full disk, a closed stream) is
    an error, exit 2, even after a command finished: a success is never claimed for unwritten results."""
    try:
        app()
    except SystemExit as done:  # how click ends every command
        code = done.code
    except OSError as e:  # commands report the files they write; this is the terminal or a redirect failing
        code = output_failed(e)
    if "torch.distributed" in sys.modules:  # a command run by torchrun (never imported on the core install)
        from .engine.distributed import leave

        leave(together=code in (None, 0, EXIT_SOME_FAILED))
    try:
        sys.stdout.flush()
    except OSError as e:
        code = output_failed(e)
    sys.exit(code)


def output_failed(error: OSError) -> int:
    err_console.print(Text.assemble(("error:", "bold red"), f" cannot write standard output: {error}"))
    sys.stdout = open(os.devnull, "w")  # nothing more to flush into the failed stream at exit
    return EXIT_ERROR

"""k-fold cross-validation of several models on identical folds: the harness behind the README's tables."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import atomic_write_json
from ..data import EmotionDataset, Fold, Protocol
from ..data.joint import JointDataset, protocol_for
from ..data.transforms import eval_transform
from ..models import create_model
from ..weights import library_versions, load_model
from ..retrieval.metrics import evaluate_retrieval
from .data import FeatureCache, image_loader, task_targets_arrays
from .distributed import broadcast, init_distributed, is_main
from .trainer import TrainConfig, embed, evaluate, evaluate_members, fit, member_caches, training_notes

#: Columns of the printed table (those a task has).
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "positive_recall", "kl", "cosine", "wheel_distance",
            "valence_pearson", "valence_ccc", "valence_mae", "arousal_pearson", "arousal_ccc", "arousal_mae")
RETRIEVAL_HEADLINE = ("map8", "map2", "nn", "ft", "st", "dcg", "f1", "anmrr")
#: Per-dataset figures of a joint model, each as ``<dataset kind>.<space>_<figure>`` or ``<kind>.<figure>``.
JOINT_HEADLINE = ("accuracy", "macro_f1", "kl", "valence_pearson", "valence_ccc", "arousal_pearson", "arousal_ccc",
                  "map8", "map2")


def headline_columns(figures: dict) -> list[str]:
    """The columns a results table shows for these figures, in a fixed order."""
    plain = [m for m in (*HEADLINE, *RETRIEVAL_HEADLINE) if m in figures]
    joint = [k for k in figures if "." in k and k.rpartition(".")[2].endswith(JOINT_HEADLINE)]
    return plain + joint


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


@torch.inference_mode()
def inference_ms_per_image(model, paths, batch_size: int = 32, workers: int = 2) -> float:
    """End-to-end milliseconds per image (decode, transform, full model) over ``paths``."""
    model.eval()
    loader = image_loader(paths, eval_transform(model.preprocessing), batch_size, workers,
                          min_side=model.preprocessing.resize)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        if len(batch["index"]):
            model(batch["image"])
            n += len(batch["index"])
    return 1000 * (time.perf_counter() - t0) / max(n, 1)


def summarise(fold_metrics: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = [k for k in fold_metrics[0] if all(k in m for m in fold_metrics)]
    arr = {k: np.array([m[k] for m in fold_metrics], dtype=np.float64) for k in keys}
    return ({k: float(np.nanmean(v)) for k, v in arr.items()},
            {k: float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in arr.items()})


RETRIEVAL_PROTOCOLS = ("gallery", "loo")


def retrieval_figures(model, dataset: EmotionDataset, fold, config: TrainConfig, cache_dir: Path | None,
                      progress: bool, protocol: str = "gallery", cache: FeatureCache | None = None) -> dict[str, float]:
    """Paper 002's protocols: ``gallery``, the test images query the training images; ``loo`` (small
    sets), each test image queries the other test images. Relevance is the same class of ``model``'s
    taxonomy (a joint model: of the first class space, ``dataset`` being a member labelled in it)."""
    if protocol not in RETRIEVAL_PROTOCOLS:
        raise ValueError(f"unknown retrieval protocol {protocol!r}; use {' or '.join(RETRIEVAL_PROTOCOLS)}")
    labels = dataset.labels if model.task == "joint" else task_targets_arrays(dataset, model.task)["label"]
    if protocol == "loo":
        ((query_rows, queries),) = embed(model, dataset, [fold.test], config, cache_dir, progress, cache)
        figures = evaluate_retrieval(queries, labels[query_rows], None, None, model.taxonomy.polarity)
        figures.pop("queries")
        return figures
    (gallery_rows, gallery), (query_rows, queries) = embed(model, dataset, [fold.train, fold.test], config, cache_dir,
                                                           progress, cache)
    figures = evaluate_retrieval(queries, labels[query_rows], gallery, labels[gallery_rows], model.taxonomy.polarity)
    figures.pop("queries")
    return figures


def retrieval_member(dataset: JointDataset, fold: Fold, taxonomy) -> tuple[EmotionDataset, Fold]:
    """The first member labelled in ``taxonomy`` (a joint model's own class space) and ``fold`` in its rows."""
    parts = (dataset.member_rows(getattr(fold, p)) for p in ("train", "val", "test"))
    for member, *rows in zip(dataset.members, *parts):
        if member.taxonomy is taxonomy:
            return member, Fold(*rows)
    raise ValueError(f"no dataset of this joint run is labelled in {taxonomy.name}")


def run_benchmark(dataset: EmotionDataset, specs: list[str], task: str, out_dir: str | Path, folds: int = 5,
                  seed: int = 0, config: TrainConfig | None = None, backbone: str | None = None,
                  backbone_weights: str | None = "imagenet",
                  only_folds: list[int] | None = None, timing_images: int = 64, progress: bool = True,
                  log=print, retrieval: bool = False, protocol: str = "kfold",
                  retrieval_protocol: str = "gallery", recipe: dict | None = None,
                  cache_dir: str | Path | None = None) -> dict:
    """Cross-validate every model spec on the same saved folds (``protocol="split"``: the papers' one
    80/5/15 split instead); returns (and writes) the results. With ``retrieval``, each fold's test images
    also query by ``embedding`` (see :func:`retrieval_figures`) and the retrieval metrics join the figures.
    ``recipe`` (what :meth:`Recipe.about` gives) is recorded with the results; frozen features are cached in
    ``cache_dir`` (default: ``out_dir/cache``)."""
    if protocol not in ("kfold", "split"):
        raise ValueError(f"a benchmark runs protocol kfold or split, not {protocol!r}")
    config = config or TrainConfig(seed=seed)
    out_dir = Path(out_dir)
    init_distributed(config.placement().distributed_backend())  # under torchrun: ranks agree from the start
    kind = protocol
    proto_path = out_dir / "protocol.json"
    if broadcast(proto_path.is_file()):  # under torchrun rank 0 may be writing it while another rank looks
        protocol = Protocol.load(proto_path, dataset)
        if protocol.params.get("task") != task or protocol.kind != kind or (kind == "kfold" and len(protocol.folds) != folds):
            raise ValueError(f"{proto_path} was made for another task, protocol or fold count; use another --out folder")
    else:
        protocol = protocol_for(dataset, kind, seed=seed, k=folds, task=task)
        if is_main():
            protocol.save(proto_path)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    results = {"dataset": dataset.spec, "task": task, "folds": len(protocol.folds), "seed": seed,
               "protocol": str(proto_path), "retrieval_protocol": retrieval_protocol if retrieval else None,
               "train_config": asdict(config), "versions": library_versions(), "recipe": recipe, "notes": [],
               "models": {}}
    for spec in specs:
        per_fold = []
        for k, fold in enumerate(protocol.folds):
            if only_folds is not None and k not in only_folds:
                continue
            run_dir = out_dir / slug(spec) / f"fold{k}"
            kwargs = {"backbone": backbone} if backbone else {}
            torch.manual_seed(config.seed)  # the same initial head weights for every fold, run after run
            model = create_model(spec, taxonomy=dataset.taxonomy, task=task, backbone_weights=backbone_weights, **kwargs)
            fold_config = replace(config, init=config.init.format(fold=k)) if config.init else config
            for note in training_notes(model, dataset):
                if note not in results["notes"]:
                    results["notes"].append(note)
                    if is_main():
                        log(f"note: {note}")
            result = fit(model, dataset, fold, run_dir, fold_config, resume=True, cache_dir=cache_dir,
                         progress=progress)
            best = load_model(run_dir)
            test = evaluate(best, dataset, fold.test, config, cache_dir=cache_dir, progress=progress)
            if isinstance(dataset, JointDataset):  # each dataset's figures, on its own scale
                caches = member_caches(best, dataset, config, cache_dir, progress)
                for member, figures in evaluate_members(best, dataset, fold.test, config, caches, progress):
                    test.update({f"{member.kind}.{k}": v for k, v in figures.items()})
            test_paths = [dataset.samples[i].path for i in fold.test[:timing_images]]
            if retrieval and isinstance(dataset, JointDataset):
                member, member_fold = retrieval_member(dataset, fold, best.taxonomy)
                cache = next(c for m, c in zip(dataset.members, caches) if m is member)
                test.update({f"{member.kind}.{k}": v for k, v in retrieval_figures(
                    best, member, member_fold, config, None, progress, retrieval_protocol, cache).items()})
            elif retrieval:
                test.update(retrieval_figures(best, dataset, fold, config, cache_dir, progress, retrieval_protocol))
            if is_main():  # timed alone: the other ranks wait rather than share the machine
                test["infer_ms_per_image"] = inference_ms_per_image(best, test_paths, config.batch_size, config.workers)
            test["infer_ms_per_image"] = broadcast(test.get("infer_ms_per_image"))
            test["train_seconds"] = result.train_seconds
            test["best_epoch"] = float(result.best_epoch)
            per_fold.append(test)
            if is_main():
                log(f"{spec} fold {k}: " + ", ".join(f"{m} {test[m]:.4f}" for m in headline_columns(test)))
        mean, std = summarise(per_fold)
        results["models"][spec] = {"backbone": model.spec["backbone"], "folds": per_fold, "mean": mean, "std": std}
        if is_main():
            atomic_write_json(out_dir / "results.json", results)
    return results

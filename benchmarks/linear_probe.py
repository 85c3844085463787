"""A linear probe on a trained run's own features: how much of its task the features it gives its classifier
hold (a logistic regression on them), against what its classifier makes of them, on its fold's parts.

    python benchmarks/linear_probe.py [--views 4] "results/emotionroi/emotionroi_001_mlrcnn/imagenet/mlrcnn_features=regions_fpn=64_representation=256/fold0"

The features are the model's ``embedding`` output (the classifier's input) of each image's evaluation view,
standardised on the training part; the probe's regularisation C is chosen on the validation part, then the
probe is scored once on the test part. A classifier far below its probe on its own training part has not fitted
what its features hold.

``--views K`` also draws K random training views of each training image (the random crops and flips that
training and the feature cache use) and reports, in the standardised features, how far a random view lies from
its image's evaluation view as a share of how far two training images lie apart (the view shift: near 0, the
features hardly move with the crop; near 1, a crop moves them as far as another image would), and a second
probe fitted on those views (C chosen on the validation part's evaluation views), scored as the first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from emolens.data import load_dataset
from emolens.data.transforms import eval_transform, train_transform
from emolens.engine.data import task_targets_arrays
from emolens.weights import load_model

C_GRID = (0.001, 0.01, 0.1, 1.0)


def features(model, dataset, rows: list[int], view=None, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's input (``embedding``) and the model's top class for ``rows`` of ``dataset``, each
    image seen through ``view`` (a transform; the evaluation view by default)."""
    view = view or eval_transform(model.preprocessing)
    embeddings, top = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = torch.stack([view(Image.open(dataset.samples[i].path).convert("RGB"))
                                 for i in rows[start:start + batch_size]])
            outputs = model(batch)
            embeddings.append(outputs["embedding"].flatten(1).numpy())
            top.append(outputs["logits"].argmax(1).numpy())
    return np.concatenate(embeddings), np.concatenate(top)


def fitted_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
                 ) -> tuple[float, LogisticRegression]:
    """The logistic regression on ``x_train`` whose C (of :data:`C_GRID`) scores best on the validation part."""
    fits = {c: LogisticRegression(C=c, max_iter=5000).fit(x_train, y_train) for c in C_GRID}
    chosen = max(C_GRID, key=lambda c: fits[c].score(x_val, y_val))
    return chosen, fits[chosen]


def probe(run: Path, views: int = 0) -> dict:
    """The run's classifier and a validation-chosen logistic regression on its features, on each part; with
    ``views``, the view shift and a probe fitted on that many random views of each training image."""
    card = json.loads((run / "best.json").read_text())
    dataset = load_dataset(card["dataset"])
    labels = task_targets_arrays(dataset, card["task"])["label"]
    model = load_model(run).eval()
    parts = {name: features(model, dataset, card["split"][name]) for name in ("train", "val", "test")}
    truth = {name: labels[card["split"][name]] for name in parts}
    scale = StandardScaler().fit(parts["train"][0])
    x = {name: scale.transform(embedding) for name, (embedding, _) in parts.items()}
    chosen, fit = fitted_probe(x["train"], truth["train"], x["val"], truth["val"])
    report = {"run": str(run), "dimensions": int(x["train"].shape[1]), "C": chosen,
              "classifier": {name: float((top == truth[name]).mean()) for name, (_, top) in parts.items()},
              "probe": {name: float(fit.score(x[name], truth[name])) for name in parts},
              "majority": float(np.bincount(truth["test"]).max() / len(truth["test"]))}
    if views:
        crop = train_transform(model.preprocessing)
        drawn = [scale.transform(features(model, dataset, card["split"]["train"], crop)[0]) for _ in range(views)]
        between_images = np.linalg.norm(x["train"] - x["train"][np.random.default_rng(0).permutation(len(x["train"]))],
                                        axis=1).mean()
        report["view_shift"] = float(np.mean([np.linalg.norm(d - x["train"], axis=1).mean() for d in drawn])
                                     / between_images)
        c, fit = fitted_probe(np.concatenate(drawn), np.tile(truth["train"], views), x["val"], truth["val"])
        report["views"], report["views_C"] = views, c
        report["probe_on_views"] = {name: float(fit.score(x[name], truth[name])) for name in parts}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="fold folders of emolens train or benchmark runs")
    parser.add_argument("--views", type=int, default=0, help="random training views of each training image for "
                        "the view shift and a probe fitted on them (0: neither)")
    args = parser.parse_args()
    if args.views < 0:
        parser.error(f"--views must be 0 or more, got {args.views}")
    for run in args.runs:
        if not (run / "best.json").is_file():
            parser.error(f"{run} holds no best.json: give a fold folder of a finished run")
    torch.manual_seed(0)
    for run in args.runs:
        r = probe(run, args.views)
        print(f"{run} ({r['dimensions']} features; test majority class {r['majority']:.3f})")
        labels = {"classifier": "its classifier", "probe": f"linear probe (C={r['C']:g}, chosen on val)"}
        if args.views:
            labels["probe_on_views"] = f"probe on {r['views']} random views (C={r['views_C']:g})"
        for who, label in labels.items():
            print(f"  {label:40} " + ", ".join(f"{part} {acc:.3f}" for part, acc in r[who].items()))
        if args.views:
            print(f"  view shift {r['view_shift']:.2f} (a random view's distance from its evaluation view, "
                  "as a share of the distance between two images)")


if __name__ == "__main__":
    main()

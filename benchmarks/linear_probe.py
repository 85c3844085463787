"""A linear probe on a trained run's own features: how much of its task the features it gives its classifier
hold (a logistic regression on them), against what its classifier makes of them, on its fold's parts.

    python benchmarks/linear_probe.py "results/emotionroi/emotionroi_001_mlrcnn/imagenet/mlrcnn_features=regions_fpn=64_representation=256/fold0"

The features are the model's ``embedding`` output (the classifier's input) of each image's evaluation view,
standardised on the training part; the probe's regularisation C is chosen on the validation part, then the
probe is scored once on the test part. A classifier far below its probe on its own training part has not fitted
what its features hold.
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
from emolens.data.transforms import eval_transform
from emolens.engine.data import task_targets_arrays
from emolens.weights import load_model

C_GRID = (0.001, 0.01, 0.1, 1.0)


def features(model, dataset, rows: list[int], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's input (``embedding``) and the model's top class for ``rows`` of ``dataset``."""
    view = eval_transform(model.preprocessing)
    embeddings, top = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = torch.stack([view(Image.open(dataset.samples[i].path).convert("RGB"))
                                 for i in rows[start:start + batch_size]])
            outputs = model(batch)
            embeddings.append(outputs["embedding"].flatten(1).numpy())
            top.append(outputs["logits"].argmax(1).numpy())
    return np.concatenate(embeddings), np.concatenate(top)


def probe(run: Path) -> dict:
    """The run's classifier and a validation-chosen logistic regression on its features, on each part."""
    card = json.loads((run / "best.json").read_text())
    dataset = load_dataset(card["dataset"])
    labels = task_targets_arrays(dataset, card["task"])["label"]
    model = load_model(run).eval()
    parts = {name: features(model, dataset, card["split"][name]) for name in ("train", "val", "test")}
    truth = {name: labels[card["split"][name]] for name in parts}
    scale = StandardScaler().fit(parts["train"][0])
    x = {name: scale.transform(embedding) for name, (embedding, _) in parts.items()}
    fits = {c: LogisticRegression(C=c, max_iter=5000).fit(x["train"], truth["train"]) for c in C_GRID}
    chosen = max(C_GRID, key=lambda c: fits[c].score(x["val"], truth["val"]))
    return {"run": str(run), "dimensions": int(x["train"].shape[1]), "C": chosen,
            "classifier": {name: float((top == truth[name]).mean()) for name, (_, top) in parts.items()},
            "probe": {name: float(fits[chosen].score(x[name], truth[name])) for name in parts},
            "majority": float(np.bincount(truth["test"]).max() / len(truth["test"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="fold folders of emolens train or benchmark runs")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "best.json").is_file():
            parser.error(f"{run} holds no best.json: give a fold folder of a finished run")
    torch.manual_seed(0)
    for run in args.runs:
        r = probe(run)
        print(f"{run} ({r['dimensions']} features; test majority class {r['majority']:.3f})")
        for who in ("classifier", "probe"):
            label = "its classifier" if who == "classifier" else f"linear probe (C={r['C']:g}, chosen on val)"
            print(f"  {label:36} " + ", ".join(f"{part} {acc:.3f}" for part, acc in r[who].items()))


if __name__ == "__main__":
    main()

"""Polarity on images from no training set: the default recipe trained without Emotion6 ranks Emotion6's
images by predicted valence, by positive share, and by the calibrated positive probability that
``predict`` reports (the two combined, fitted on the training sets' validation images) against their
polarity; ROC AUC, and the balanced accuracy of the sign (valence >= 0, positive share >= 0.5,
calibrated probability >= 0.5: ``predict``'s polarity).

An image's polarity is its dominant emotion's (joy positive; anger, disgust, fear and sadness negative;
surprise and neutral images are left out). Beside it, in the same run: a ridge regression of OASIS valence
on the frozen Lite0 pooled feature (the baseline the issue names), and any saved model given (e.g. the
previous default) by its positive share and, where it rates them, its valence.

    python benchmarks/heldout_polarity.py --out results/heldout --compare results/old_default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from affect import pooled_features
from train_default_model import BACKBONE, TRAINING, calibrate_polarity, positive_shares, train_final
from emolens.data import load_dataset
from emolens.data.joint import open_datasets
from emolens.predict import Predictor


def scores(predictor: Predictor, paths: list[str]) -> dict[str, np.ndarray]:
    """Predicted valence (where the model rates it), positive share and, where the model's card calibrates
    it, the calibrated positive probability per image, in order."""
    preds, errors = predictor.predict(paths)
    if errors:
        raise RuntimeError(f"{len(errors)} held-out image(s) could not be read, e.g. {errors[0]}")
    out = {"positive share": positive_shares(predictor, preds)}
    if predictor.calibration is not None:  # what `predict` reports for a model whose card calibrates it
        out["calibrated"] = np.array([p.positive_probability for p in preds], dtype=np.float64)
    if preds[0].valence is not None:
        out["valence"] = np.array([p.valence for p in preds], dtype=np.float64)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="append",
                    help="training datasets (default: flickr_ldl and oasis under ../shared/data)")
    ap.add_argument("--heldout", default="emotion6=../shared/data/emotion6")
    ap.add_argument("--out", type=Path, default=Path("results/heldout"))
    ap.add_argument("--compare", nargs="*", default=[], help="saved models to score the same way")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-views", type=int, default=TRAINING["cache_views"],
                    help="cached random views per image (default: the default recipe's, %(default)s)")
    ap.add_argument("--backbone", default=BACKBONE, help="bundled EfficientNet-Lite trunk (default: %(default)s)")
    args = ap.parse_args()

    train = open_datasets(args.train or ["flickr_ldl=../shared/data/flickr_ldl", "oasis=../shared/data/oasis"])
    heldout = load_dataset(args.heldout)
    polar = np.flatnonzero(heldout.polarities >= 0)
    paths = [str(heldout.samples[i].path) for i in polar]
    y = heldout.polarities[polar]
    print(f"held out: {heldout.spec}, {len(polar)} images with a polar dominant emotion "
          f"({int(y.sum())} positive, {int((1 - y).sum())} negative)")

    rows = {}
    # valence on the common scale: 0 is neutral; a calibrated probability: 0.5 is the balanced point
    thresholds = {"positive share": 0.5, "valence": 0.0, "ridge": 0.0, "calibrated": 0.5}

    def score(name: str, kind: str, values: np.ndarray) -> None:
        rows[name] = (roc_auc_score(y, values), balanced_accuracy_score(y, values >= thresholds[kind]))

    model, fold, _ = train_final(train, args.out / "model", args.seed, cache_dir=args.out / "cache",
                                 backbone=args.backbone, cache_views=args.cache_views)
    predictor = Predictor(model, backend="torch")
    found = scores(predictor, paths)
    for name, s in found.items():
        score(f"default recipe without {heldout.kind}, {name}", name, s)
    calibration = calibrate_polarity(predictor, train, fold.val)  # on the training sets' validation images
    print(f"polarity calibration: {calibration}")
    score(f"default recipe without {heldout.kind}, calibrated positive probability", "calibrated",
          calibration(found["positive share"], found["valence"]))

    oasis = next(m for m in train.members if m.kind == "oasis")
    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    ridge.fit(pooled_features(oasis, "efficientnet_lite0"), oasis.affect[:, 0])
    held_features = pooled_features(heldout, "efficientnet_lite0")[polar]
    score("ridge of OASIS valence on frozen Lite0 pooled", "ridge", ridge.predict(held_features))  # common scale

    for source in args.compare:
        for name, s in scores(Predictor(source), paths).items():
            score(f"{source}, {name}", name, s)
    width = max(map(len, rows))
    for name, (auc, balanced) in rows.items():
        print(f"{name:{width}}  ROC AUC {auc:.3f}  balanced accuracy {balanced:.3f}")
    (args.out / "results.json").write_text(json.dumps({
        "heldout": heldout.spec, "images": len(polar), "positive": int(y.sum()),
        "auc": {k: v[0] for k, v in rows.items()}, "balanced_accuracy": {k: v[1] for k, v in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()

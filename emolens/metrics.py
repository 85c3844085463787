"""Evaluation metrics as pure functions on arrays.

Classification (accuracy, balanced accuracy, macro-F1, per-class scores, confusion matrix),
polarity (accuracy and recall of the positive class, paper 003), label-distribution measures
(Geng's six), and Mikels-wheel-aware errors that weigh a mistake by how far apart the two
emotions lie on the wheel.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = samples of true class i predicted as j."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(y_true, y_pred, num_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    predicted, support = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def accuracy(y_true, y_pred) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if len(t) else float("nan")


def balanced_accuracy(y_true, y_pred, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    s = per_class_scores(y_true, y_pred, num_classes)
    present = s["support"] > 0
    return float(s["recall"][present].mean())


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or predicted."""
    s = per_class_scores(y_true, y_pred, num_classes)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    used = (cm.sum(0) + cm.sum(1)) > 0
    return float(s["f1"][used].mean())


def classification_report(y_true, y_pred, num_classes: int) -> dict[str, float]:
    return {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
    }


def polarity_report(y_true, y_pred) -> dict[str, float]:
    """Paper 003's two figures on 0 = negative / 1 = positive labels: accuracy and positive-class recall."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    pos = t == 1
    return {"accuracy": accuracy(t, p), "positive_recall": float((p[pos] == 1).mean()) if pos.any() else float("nan")}


# --- label distributions (means over samples; target first, prediction second) ------------


def _pair(target, predicted) -> tuple[np.ndarray, np.ndarray]:
    t = np.atleast_2d(np.asarray(target, dtype=np.float64))
    p = np.atleast_2d(np.asarray(predicted, dtype=np.float64))
    if t.shape != p.shape:
        raise ValueError(f"distribution shapes differ: {t.shape} vs {p.shape}")
    return t, p


def kl_divergence(target, predicted) -> float:
    """Mean KL(target || predicted); lower is better."""
    t, p = _pair(target, predicted)
    return float(np.sum(np.where(t > 0, t * np.log((t + EPS) / (p + EPS)), 0.0), -1).mean())


def chebyshev(target, predicted) -> float:
    t, p = _pair(target, predicted)
    return float(np.abs(t - p).max(-1).mean())


def clark(target, predicted) -> float:
    t, p = _pair(target, predicted)
    s = t + p
    r = np.divide((t - p) ** 2, s ** 2, out=np.zeros_like(t), where=s > 0)
    return float(np.sqrt(r.sum(-1)).mean())


def canberra(target, predicted) -> float:
    t, p = _pair(target, predicted)
    s = t + p
    return float(np.divide(np.abs(t - p), s, out=np.zeros_like(t), where=s > 0).sum(-1).mean())


def cosine(target, predicted) -> float:
    """Mean cosine similarity; higher is better."""
    t, p = _pair(target, predicted)
    denom = np.linalg.norm(t, axis=-1) * np.linalg.norm(p, axis=-1)
    return float(((t * p).sum(-1) / np.maximum(denom, EPS)).mean())


def intersection(target, predicted) -> float:
    """Mean histogram intersection; higher is better."""
    t, p = _pair(target, predicted)
    return float(np.minimum(t, p).sum(-1).mean())


DISTRIBUTION_METRICS = {
    "kl": kl_divergence, "chebyshev": chebyshev, "clark": clark, "canberra": canberra,
    "cosine": cosine, "intersection": intersection,
}


def distribution_report(target, predicted) -> dict[str, float]:
    return {name: fn(target, predicted) for name, fn in DISTRIBUTION_METRICS.items()}


# --- Mikels-wheel-aware errors ----------------------------------------------------------------


def wheel_errors(y_true, y_pred, steps: np.ndarray) -> dict[str, float]:
    """Mistakes weighed by wheel distance (``steps`` from :func:`emolens.taxonomy.wheel_steps`).

    In the spirit of the ECC/EMC measures of "To Err Like Human" (NeurIPS 2024), not a copy of
    their formulas: ``wheel_distance`` is the mean normalised wheel distance between truth and
    prediction over all samples (0 = all right, 1 = all opposite), ``wheel_score`` is
    ``1 - wheel_distance``, and ``misclassification_distance`` the same mean over the wrong
    predictions only (how far the mistakes go; NaN when there are none).
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    d = steps[t, p] / steps.max()
    wrong = t != p
    return {
        "wheel_distance": float(d.mean()),
        "wheel_score": float(1.0 - d.mean()),
        "misclassification_distance": float(d[wrong].mean()) if wrong.any() else float("nan"),
    }


def concordance_correlation(target, predicted) -> float:
    """Lin's concordance correlation coefficient: agreement in correlation, mean and scale (population moments)."""
    t, p = np.asarray(target, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    covariance = np.mean((t - t.mean()) * (p - p.mean()))
    return float(2 * covariance / (t.var() + p.var() + (t.mean() - p.mean()) ** 2 + EPS))


def regression_report(target, predicted) -> dict[str, float]:
    """MAE, RMSE, Pearson r, Spearman rho and CCC of one rated dimension (NaN targets left out)."""
    from scipy.stats import pearsonr, spearmanr

    t, p = np.asarray(target, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    rated = ~np.isnan(t)
    t, p = t[rated], p[rated]
    if len(t) == 0:
        return {}
    error = p - t
    constant = len(t) < 2 or np.ptp(t) == 0 or np.ptp(p) == 0  # correlations are undefined there
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "pearson": float("nan") if constant else float(pearsonr(t, p)[0]),
            "spearman": float("nan") if constant else float(spearmanr(t, p)[0]),
            "ccc": float("nan") if len(t) < 2 else concordance_correlation(t, p)}


def affect_report(target, predicted, scale=None) -> dict[str, float]:
    """:func:`regression_report` of valence and arousal ((N, 2), common scale [-1, 1]) as ``valence_mae``,
    ``arousal_ccc``, ...; with a dataset's :class:`~emolens.taxonomy.AffectScale`, errors are on its own
    scale (correlations do not change with a linear scale)."""
    from .taxonomy import AFFECT_DIMENSIONS

    t, p = np.asarray(target, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if scale is not None:
        t, p = scale.from_common(t), scale.from_common(p)
    return {f"{dimension}_{name}": value for d, dimension in enumerate(AFFECT_DIMENSIONS)
            for name, value in regression_report(t[:, d], p[:, d]).items()}

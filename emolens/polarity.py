"""Polarity as a calibrated probability: the model's two polarity signals, the positive share of its emotion
distribution and its valence, combined by a logistic regression fitted on validation images.

The positive share alone inherits its training data's prior (Flickr_LDL's images are 83% positive), so
its 0.5 is not the balanced threshold; valence reads the image more directly. The fit weighs the two
classes equally, so a ``positive_probability`` of 0.5 is the balanced operating point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Shares are clipped away from 0 and 1 before their logit: a share of exactly 1 is common on clear images.
EPS = 1e-6


@dataclass(frozen=True)
class PolarityCalibration:
    """``P(positive) = sigmoid(share_weight * logit(share) + valence_weight * valence + bias)``, valence on the
    common scale [-1, 1]; ``fitted_on`` says which images (for the model card)."""

    share_weight: float
    valence_weight: float
    bias: float
    fitted_on: str = ""

    def __call__(self, share: np.ndarray, valence: np.ndarray) -> np.ndarray:
        share = np.clip(np.asarray(share, dtype=np.float64), EPS, 1 - EPS)
        z = self.share_weight * np.log(share / (1 - share)) + self.valence_weight * np.asarray(valence, np.float64)
        return 1.0 / (1.0 + np.exp(-(z + self.bias)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PolarityCalibration":
        return cls(float(d["share_weight"]), float(d["valence_weight"]), float(d["bias"]), str(d.get("fitted_on", "")))


def fit_polarity_calibration(share: np.ndarray, valence: np.ndarray, positive: np.ndarray,
                             fitted_on: str = "") -> PolarityCalibration:
    """The logistic regression of ``positive`` (bool per image) on the logit of the positive share and the
    valence, the two classes weighted equally."""
    from sklearn.linear_model import LogisticRegression

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError("a polarity calibration needs positive and negative images")
    share = np.clip(np.asarray(share, dtype=np.float64), EPS, 1 - EPS)
    features = np.stack([np.log(share / (1 - share)), np.asarray(valence, np.float64)], 1)
    fit = LogisticRegression(class_weight="balanced", C=1.0).fit(features, positive)
    (share_weight, valence_weight), = fit.coef_
    return PolarityCalibration(float(share_weight), float(valence_weight), float(fit.intercept_[0]), fitted_on)

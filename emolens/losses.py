"""Losses, picked by name: ``build_loss("multitask", taxonomy, lambda_=0.4)``.

Each loss is a small module called as ``loss(outputs, targets)`` with the model's output
dict and a batch of targets: ``label`` (B,), ``distribution`` (B, C) where the dataset has
one, and ``label_prob`` (B,) - the share of votes of the dominant emotion.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .taxonomy import MIKELS_WHEEL_ORDER, Taxonomy, emotion_distance

Batch = dict[str, torch.Tensor]
LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str):
    def deco(cls):
        LOSSES[name] = cls
        return cls

    return deco


@register_loss("ce")
class CrossEntropy(nn.Module):
    """Softmax cross-entropy on the hard label (paper 001 Eq. 7)."""

    def __init__(self, taxonomy: Taxonomy, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        return F.cross_entropy(outputs["logits"], targets["label"], label_smoothing=self.label_smoothing)


@register_loss("multitask")
class MultiTaskLoss(nn.Module):
    """Paper 001 Eq. 6-8: ``(1 - λ) CE(y, p) + λ (-Σ f(i) log p_i)``.

    ``f`` is the Mikels-wheel distribution of Eq. 4 built from the dominant emotion and its
    vote share ``p*``; where a dataset has no votes, ``p*`` is ``default_label_prob``.
    """

    def __init__(self, taxonomy: Taxonomy, lambda_: float = 0.4, default_label_prob: float = 0.6,
                 wheel_order: tuple[str, ...] = MIKELS_WHEEL_ORDER):
        super().__init__()
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError("lambda must lie in [0, 1]")
        try:
            distance = emotion_distance(taxonomy, wheel_order)
        except ValueError as e:
            raise ValueError(f"the multi-task loss needs Mikels' wheel; taxonomy {taxonomy.name!r} is not on it") from e
        self.lambda_ = lambda_
        self.default_label_prob = default_label_prob
        inverse = 1.0 / torch.as_tensor(distance, dtype=torch.float32)
        inverse.fill_diagonal_(0.0)
        self.register_buffer("share", inverse / inverse.sum(1, keepdim=True), persistent=False)

    def wheel_targets(self, label: torch.Tensor, label_prob: torch.Tensor) -> torch.Tensor:
        """Eq. 4 for a batch: the dominant class keeps ``p*``, the rest is shared by inverse wheel distance."""
        p = label_prob.to(self.share.dtype).unsqueeze(1)
        f = self.share[label] * (1.0 - p)
        return f.scatter(1, label.unsqueeze(1), p)

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        logits, label = outputs["logits"], targets["label"]
        label_prob = targets.get("label_prob")
        if label_prob is None:
            label_prob = torch.full(label.shape, self.default_label_prob, device=logits.device)
        log_p = logits.log_softmax(-1)
        ce = F.nll_loss(log_p, label)
        ed = -(self.wheel_targets(label, label_prob) * log_p).sum(-1).mean()
        return (1.0 - self.lambda_) * ce + self.lambda_ * ed


@register_loss("label_prob")
class LabelProbabilityLoss(nn.Module):
    """Paper 001 Eq. 10: cross-entropy of ``softmax(p*² · a)``, the class activations ``a`` scaled by
    the squared vote share of the dominant emotion - uncertain labels give flatter targets' gradients."""

    def __init__(self, taxonomy: Taxonomy, default_label_prob: float = 0.6):
        super().__init__()
        self.default_label_prob = default_label_prob

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        logits, label = outputs["logits"], targets["label"]
        label_prob = targets.get("label_prob")
        if label_prob is None:
            label_prob = torch.full(label.shape, self.default_label_prob, device=logits.device)
        scale = label_prob.to(logits.dtype).pow(2).unsqueeze(1)
        return F.cross_entropy(scale * logits, label)


@register_loss("kl")
class DistributionKL(nn.Module):
    """Label-distribution learning: KL(dataset's vote distribution || predicted distribution)."""

    def __init__(self, taxonomy: Taxonomy):
        super().__init__()

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        if "distribution" not in targets:
            raise ValueError("the kl loss needs a dataset with emotion distributions")
        return F.kl_div(outputs["logits"].log_softmax(-1), targets["distribution"], reduction="batchmean")


#: The loss a task trains with unless one is named.
DEFAULT_LOSS = {"emotion": "ce", "polarity": "ce", "distribution": "kl"}

#: Spec keys that configure the loss rather than the model (``lambda`` is a Python keyword).
LOSS_ARGUMENTS = {"lambda": "lambda_", "label_smoothing": "label_smoothing", "default_label_prob": "default_label_prob"}


class PerMember(nn.Module):
    """A loss that also trains late-fusion ensembles: where the outputs carry ``member_logits`` (one
    classifier per stream), it is the mean of ``loss`` over the members, so each member learns on its
    own as in separate training; the fused ``logits`` are only for prediction."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        members = outputs.get("member_logits")
        if members is None:
            return self.loss(outputs, targets)
        return torch.stack([self.loss({**outputs, "logits": m}, targets) for m in members]).mean()


def build_loss(name: str, taxonomy: Taxonomy, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    try:
        return PerMember(LOSSES[name](taxonomy, **kwargs))
    except TypeError as e:
        raise ValueError(f"loss {name!r} does not take {', '.join(kwargs)}") from e


def split_loss_arguments(args: dict) -> tuple[str | None, dict, dict]:
    """Separate ``loss=...`` and its options from a model spec's arguments: (loss name, loss kwargs, model kwargs)."""
    args = dict(args)
    name = args.pop("loss", None)
    loss_kwargs = {LOSS_ARGUMENTS[k]: args.pop(k) for k in list(args) if k in LOSS_ARGUMENTS}
    return name, loss_kwargs, args

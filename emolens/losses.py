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

from .data.joint import is_affect, rating_output
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
    """Softmax cross-entropy on the hard label (paper 001 Eq. 7). ``balanced``: train on class-balanced
    batches (every class equally often, rare ones drawn with replacement), for heavily imbalanced tasks
    such as Flickr_LDL polarity (83% positive)."""

    def __init__(self, taxonomy: Taxonomy, label_smoothing: float = 0.0, balanced: bool = False):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.needs_class_balanced_batches = balanced

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


# --- metric learning (paper 002) ----------------------------------------------------------------


class DotSimilarity(nn.Module):
    """``scale · a·b``: with unit embeddings, a cosine whose range the scale widens for the softmax-like losses."""

    def __init__(self, scale: float = 10.0):
        super().__init__()
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scale * a @ b.T


def log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log(1 + Σ_j exp(x_ij))`` over the masked j of each row, without overflow (a logsumexp with 0)."""
    masked = x.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(torch.cat([torch.zeros_like(x[:, :1]), masked], 1), 1)


def anchor_positive_tuples(labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N-pair tuples from a class-balanced batch: for each class, items 0-1, 2-3, ... are (anchor,
    positive) pairs; tuple t holds the t-th pair of every class that has one."""
    groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    tuples = []
    for t in range(max((len(g) // 2 for g in groups), default=0)):
        pairs = [(g[2 * t], g[2 * t + 1]) for g in groups if len(g) > 2 * t + 1]
        if len(pairs) >= 2:
            tuples.append((torch.stack([a for a, _ in pairs]), torch.stack([p for _, p in pairs])))
    return tuples


class MetricLoss(nn.Module):
    """Base of the embedding losses: ``loss(outputs, targets)`` on ``outputs["embedding"]``.

    Where the model has attention confidences, the total is ``λ L + (1 - λ) L_att`` (paper 002
    Eq. 10, L_att of Eq. 2 at both levels); a linear probe (``probe_logits``, on the detached
    embedding) adds its cross-entropy without touching the embedding.
    """

    needs_class_balanced_batches = True

    def __init__(self, taxonomy: Taxonomy, lambda_: float = 0.5, scale: float = 10.0):
        super().__init__()
        self.lambda_ = lambda_
        self.similarity = DotSimilarity(scale)
        polarity = [-1 if p is None else int(p) for p in taxonomy.polarity]
        self.register_buffer("class_polarity", torch.tensor(polarity), persistent=False)

    def metric(self, outputs: Batch, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        labels = targets["label"]
        loss = self.metric(outputs, labels)
        if "emotion_confidence" in outputs:
            att = F.nll_loss(outputs["emotion_confidence"].clamp_min(1e-12).log(), labels)
            if "polarity_confidence" in outputs:
                pol = self.class_polarity[labels]
                if (pol >= 0).any():
                    att = att + F.nll_loss(outputs["polarity_confidence"].clamp_min(1e-12).log(), pol, ignore_index=-1)
            loss = self.lambda_ * loss + (1 - self.lambda_) * att
        if "probe_logits" in outputs:
            loss = loss + F.cross_entropy(outputs["probe_logits"], labels)
        return loss


@register_loss("npair")
class NPairLoss(MetricLoss):
    """Paper 002 Eq. 3: ``log(1 + Σ_{j≠i} exp(s(f_i, f_j+) - s(f_i, f_i+)))`` over N-pair tuples."""

    def metric(self, outputs: Batch, labels: torch.Tensor) -> torch.Tensor:
        emb, terms = outputs["embedding"], []
        for a, p in anchor_positive_tuples(labels):
            sim = self.similarity(emb[a], emb[p])
            off = ~torch.eye(len(a), dtype=torch.bool, device=sim.device)
            terms.append(log1p_sum_exp(sim - sim.diagonal()[:, None], off).mean())
        return torch.stack(terms).mean() if terms else emb.sum() * 0


@register_loss("ep")
class EmotionPairLoss(MetricLoss):
    """Paper 002 Eq. 4-6: inter-polarity + intra-polarity terms. Pair weights ṽ (Eq. 9) are 1 here and
    from the attention confidences in ``wep``. A class with no same-polarity partner in the tuple
    compares the opposite polarity with its own positive instead."""

    def pair_weights(self, outputs: Batch, a: torch.Tensor, p: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(a), len(a), device=classes.device)

    def metric(self, outputs: Batch, labels: torch.Tensor) -> torch.Tensor:
        emb, terms = outputs["embedding"], []
        for a, p in anchor_positive_tuples(labels):
            classes = labels[a]
            pol = self.class_polarity[classes]
            sim = self.similarity(emb[a], emb[p])
            weighted = self.pair_weights(outputs, a, p, classes) * sim
            n = len(a)
            off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
            polar = (pol[:, None] >= 0) & (pol[None, :] >= 0)
            same = (pol[:, None] == pol[None, :]) & off & polar
            opposite = (pol[:, None] != pol[None, :]) & polar
            positive = sim.diagonal()
            mean_same = torch.where(same.any(1), (weighted * same).sum(1) / same.sum(1).clamp_min(1), positive)
            mean_opposite = (weighted * opposite).sum(1) / opposite.sum(1).clamp_min(1)
            inter = torch.where(opposite.any(1), F.softplus(mean_opposite - mean_same), torch.zeros_like(positive))
            intra = log1p_sum_exp(weighted - positive[:, None], same)
            terms.append((inter + intra).mean())
        return torch.stack(terms).mean() if terms else emb.sum() * 0


@register_loss("wep")
class WeightedEmotionPairLoss(EmotionPairLoss):
    """Paper 002 Eq. 7-9: EP with each anchor-negative pair weighted by how confusable the attention
    confidences find it, ``ṽ_ij = v^p_ij v^e_ij`` with ``v_ij = exp(c_i[j]) exp(c+_j[i])`` (v^p = 1 within a
    polarity, ṽ_ii = 1); the weights are constants to the gradient."""

    def pair_weights(self, outputs: Batch, a: torch.Tensor, p: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        n = len(a)
        weights = torch.ones(n, n, device=classes.device)
        if "emotion_confidence" in outputs:
            ce = outputs["emotion_confidence"].detach()
            anchor_to_j = ce[a][:, classes]  # c^e_ij: anchor i's confidence in class j
            positive_to_i = ce[p][:, classes].T  # c^{+e}_ji: class j's example's confidence in class i
            weights = weights * (anchor_to_j.exp() * positive_to_i.exp())
        if "polarity_confidence" in outputs:
            pol = self.class_polarity[classes].clamp_min(0)
            cp = outputs["polarity_confidence"].detach()
            vp = cp[a][:, pol].exp() * cp[p][:, pol].T.exp()
            differ = self.class_polarity[classes][:, None] != self.class_polarity[classes][None, :]
            weights = weights * torch.where(differ, vp, torch.ones_like(vp))
        return weights.fill_diagonal_(1.0)


@register_loss("contrastive")
class ContrastiveLoss(MetricLoss):
    """Hadsell et al.: same class pulls (d²), different classes push to the margin (max(0, m - d)²)."""

    def __init__(self, taxonomy: Taxonomy, margin: float = 0.4, **kwargs):
        super().__init__(taxonomy, **kwargs)
        self.margin = margin

    def metric(self, outputs: Batch, labels: torch.Tensor) -> torch.Tensor:
        emb = outputs["embedding"]
        d = torch.cdist(emb, emb)
        same = labels[:, None] == labels[None, :]
        off = ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)
        pos = (d.square() * (same & off)).sum() / (same & off).sum().clamp_min(1)
        neg = (F.relu(self.margin - d).square() * ~same).sum() / (~same).sum().clamp_min(1)
        return pos + neg


@register_loss("triplet")
class SemiHardTripletLoss(MetricLoss):
    """Schroff et al. with semi-hard negatives: for each anchor-positive pair, the closest negative
    farther than the positive (the hardest negative where none is), ``max(0, d²_ap - d²_an + m)``."""

    def __init__(self, taxonomy: Taxonomy, margin: float = 0.2, **kwargs):
        super().__init__(taxonomy, **kwargs)
        self.margin = margin

    def metric(self, outputs: Batch, labels: torch.Tensor) -> torch.Tensor:
        emb = outputs["embedding"]
        d2 = torch.cdist(emb, emb).square()
        same = labels[:, None] == labels[None, :]
        off = ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)
        anchors, positives = torch.nonzero(same & off, as_tuple=True)
        if not len(anchors):
            return emb.sum() * 0
        d_ap = d2[anchors, positives]
        d_an = d2[anchors].masked_fill(same[anchors], float("inf"))
        semi = d_an.masked_fill(d_an <= d_ap[:, None], float("inf")).amin(1)
        chosen = torch.where(torch.isfinite(semi), semi, d_an.amin(1))
        valid = torch.isfinite(chosen)
        return F.relu(d_ap - chosen + self.margin)[valid].mean() if valid.any() else emb.sum() * 0


#: The loss a task trains with unless one is named.
DEFAULT_LOSS = {"emotion": "ce", "polarity": "ce", "distribution": "kl", "va": "mse", "joint": "joint"}

#: Spec keys that configure the loss rather than the model (``lambda`` is a Python keyword).
LOSS_ARGUMENTS = {"lambda": "lambda_", "label_smoothing": "label_smoothing", "default_label_prob": "default_label_prob",
                  "margin": "margin", "scale": "scale", "balanced": "balanced", "affect_loss": "affect",
                  "affect_weight": "affect_weight"}


class PerMember(nn.Module):
    """A loss that also trains late-fusion ensembles: where the outputs carry ``member_logits`` (one
    classifier per stream), it is the mean of ``loss`` over the members, so each member learns on its
    own as in separate training; the fused ``logits`` are only for prediction."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        self.needs_class_balanced_batches = getattr(loss, "needs_class_balanced_batches", False)

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


def _rated(outputs: Batch, targets: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and rated valence/arousal where a rating exists (unrated images carry NaN)."""
    predicted, rated = outputs["affect"].float(), targets["affect"].float()
    known = ~torch.isnan(rated)
    return predicted[known], rated[known]


class AffectLoss(nn.Module):
    """A loss on the predicted valence and arousal (``outputs["affect"]``) against ``targets["affect"]``:
    ``criterion`` over the rated values (images without ratings add nothing)."""

    criterion = staticmethod(F.mse_loss)

    def __init__(self, taxonomy: Taxonomy | None = None):
        super().__init__()

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        predicted, rated = _rated(outputs, targets)
        return self.criterion(predicted, rated) if len(rated) else outputs["affect"].sum() * 0


@register_loss("mse")
class AffectMSE(AffectLoss):
    """Mean squared error of valence and arousal (common scale)."""


@register_loss("l1")
class AffectL1(AffectLoss):
    """Mean absolute error of valence and arousal (common scale)."""

    criterion = staticmethod(F.l1_loss)


@register_loss("ccc")
class ConcordanceLoss(AffectLoss):
    """``1 - CCC`` per dimension over the batch, averaged over valence and arousal: it rewards matching the
    ratings' spread and mean, not only their order (a per-image loss can shrink to the mean). A dimension
    with fewer than two ratings in the batch adds nothing."""

    def __init__(self, taxonomy: Taxonomy | None = None, eps: float = 1e-8):
        super().__init__(taxonomy)
        self.eps = eps

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        predicted, rated = outputs["affect"].float(), targets["affect"].float()
        losses = []
        for d in range(predicted.shape[1]):
            known = ~torch.isnan(rated[:, d])
            if known.sum() < 2:
                continue
            p, t = predicted[known, d], rated[known, d]
            covariance = ((p - p.mean()) * (t - t.mean())).mean()
            ccc = 2 * covariance / (p.var(unbiased=False) + t.var(unbiased=False) + (p.mean() - t.mean()) ** 2 + self.eps)
            losses.append(1 - ccc)
        return torch.stack(losses).mean() if losses else predicted.sum() * 0


@register_loss("joint")
class JointLoss(nn.Module):
    """The sum, over the label spaces a batch carries, of each space's loss on the images labelled in it:
    KL divergence on a space's vote distributions, cross-entropy on its labels where an image has no
    distribution, and ``affect`` (mse, l1 or ccc) on each rating set's valence and arousal, through its own
    head where the model has one, times ``affect_weight`` (an MSE on the [-1, 1] scale is a tenth of a KL
    divergence's size). A space no image of the batch is labelled in adds nothing."""

    def __init__(self, taxonomy: Taxonomy | None = None, affect: str = "mse", affect_weight: float = 1.0):
        super().__init__()
        if affect not in ("mse", "l1", "ccc"):
            raise ValueError(f"affect loss must be mse, l1 or ccc, got {affect!r}")
        if not float(affect_weight) >= 0:
            raise ValueError(f"affect_weight must be 0 or more, got {affect_weight!r}")
        self.affect = LOSSES[affect](taxonomy)
        self.affect_weight = float(affect_weight)

    def forward(self, outputs: Batch, targets: Batch) -> torch.Tensor:
        total = outputs["logits"].sum() * 0
        for key, target in targets.items():
            space, _, kind = key.rpartition(".")
            if kind == "distribution":
                rows = ~torch.isnan(target).any(1)
                if rows.any():
                    log_p = F.log_softmax(outputs[f"{space}.logits"][rows].float(), -1)
                    total = total + F.kl_div(log_p, target[rows].float(), reduction="batchmean")
            elif kind == "label":
                rows = target >= 0
                if f"{space}.distribution" in targets:
                    rows &= torch.isnan(targets[f"{space}.distribution"]).any(1)
                if rows.any():
                    total = total + F.cross_entropy(outputs[f"{space}.logits"][rows].float(), target[rows])
            elif is_affect(key) and (~torch.isnan(target)).any():
                total = total + self.affect_weight * self.affect({"affect": rating_output(outputs, key)},
                                                                 {"affect": target})
        return total

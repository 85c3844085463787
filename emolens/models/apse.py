"""``apse``: attention-aware polarity sensitive embedding (paper 002, section 3.1).

A polarity-specific attention module (K = 2) on a mid-level map and an emotion-specific one
(K = the taxonomy's size) on the last level; each: channel sum A -> spatial softmax Z ->
F^ = F ⊙ Z -> 1x1 conv to K maps S -> GAP + softmax confidences C -> U = norm(Σ_j c_j S_j) ->
F_w = F^ ⊙ U. Cross-level bilinear pooling (the low level pooled to the high level's size; signed
square root, L2 normalisation) and a linear layer give the 512-d L2-normalised embedding.

Choices where the text is open: Z is scaled by h·w so F^ keeps F's scale (a softmax mask alone
divides every feature by about h·w); ``norm`` is min-max to [0, 1] per image. ``attention=none``
gives the paper's baselines (last level, GAP, linear, L2 norm; "SO" in its Table 2),
``attention=single`` the emotion-specific module only ("SA"), ``bilinear=0`` concatenation instead
of CLB. The emotion confidences C serve as the model's class scores (``logits = log C``); without
attention, a linear probe on the detached embedding gives them, so it never shapes the embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from .base import EmotionModel
from .registry import register_model

ATTENTION = ("hierarchical", "single", "none")


class AttentionModule(nn.Module):
    """Attention head + output head of Fig. 3 for one level; returns F_w, C and U."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.class_maps = nn.Conv2d(channels, classes, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = features.shape
        z = features.sum(1).flatten(1).softmax(-1).view(b, 1, h, w) * (h * w)
        attended = features * z
        maps = self.class_maps(attended)
        confidence = maps.mean((2, 3)).softmax(-1)
        u = (confidence[:, :, None, None] * maps).sum(1, keepdim=True)
        low, high = u.amin((2, 3), keepdim=True), u.amax((2, 3), keepdim=True)
        u = (u - low) / (high - low).clamp_min(1e-6)
        return attended * u, confidence, u[:, 0]


def cross_level_bilinear(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Channel-pair correlations of two maps (low pooled to high's size), signed sqrt, L2 normalised."""
    low = F.adaptive_avg_pool2d(low, high.shape[-2:])
    b, c1, h, w = low.shape
    pooled = torch.bmm(low.flatten(2), high.flatten(2).transpose(1, 2)).flatten(1) / (h * w)
    return F.normalize(torch.sign(pooled) * torch.sqrt(pooled.abs() + 1e-10), dim=1)


@register_model("apse", "Attention-aware polarity sensitive embedding for affective image retrieval.", paper="002")
class Apse(EmotionModel):
    """Arguments: ``attention`` (hierarchical / single / none), ``bilinear``, ``dim`` (embedding size)."""

    feature_keys = ("levels",)
    default_loss = "wep"

    def __init__(self, *args, attention: str = "hierarchical", bilinear: bool = True, dim: int = 512, **kwargs):
        super().__init__(*args, **kwargs)
        attention = "none" if attention is None else attention  # the spec parser reads "none" as None
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}")
        self.attention = attention
        self.bilinear = bool(bilinear) and attention == "hierarchical"
        low_c, high_c = self.backbone.channels
        self.emotion_attention = AttentionModule(high_c, self.num_classes) if attention != "none" else None
        self.polarity_attention = AttentionModule(low_c, 2) if attention == "hierarchical" else None
        if self.bilinear:
            width = low_c * high_c
        elif attention == "hierarchical":
            width = low_c + high_c
        else:
            width = high_c
        self.embed = nn.Linear(width, dim)
        self.probe = nn.Linear(dim, self.num_classes) if attention == "none" else None

    def make_backbone(self, name: str, weights: str | None) -> Backbone:
        # "conv3" and "conv5" of the paper's ResNet-50: the stride-8 and stride-32 levels
        return Backbone(name, weights, out_strides=(8, 32))

    def head(self, features: dict) -> dict[str, torch.Tensor]:
        low, high = features["levels"]
        out: dict[str, torch.Tensor] = {}
        if self.emotion_attention is not None:
            high, out["emotion_confidence"], out["emotion_attention"] = self.emotion_attention(high)
        if self.polarity_attention is not None:
            low, out["polarity_confidence"], out["polarity_attention"] = self.polarity_attention(low)
        if self.bilinear:
            pooled = cross_level_bilinear(low, high)
        elif self.polarity_attention is not None:
            pooled = torch.cat([low.mean((2, 3)), high.mean((2, 3))], 1)
        else:
            pooled = high.mean((2, 3))
        embedding = F.normalize(self.embed(pooled), dim=1)
        if self.probe is not None:
            logits = self.probe(embedding.detach())
            out["probe_logits"] = logits
        else:
            logits = out["emotion_confidence"].clamp_min(1e-12).log()
        return {**out, "embedding": embedding, "logits": logits, "distribution": logits.softmax(-1)}

    def explanation_maps(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = {"polarity_attention": "polarity attention", "emotion_attention": "emotion attention"}
        return {label: outputs[key] for key, label in names.items() if key in outputs}

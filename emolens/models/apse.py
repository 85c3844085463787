"""``apse``: attention-aware polarity sensitive embedding (paper 002, section 3.1).

A polarity-specific attention module (K = 2) on a mid-level map and an emotion-specific one
(K = the taxonomy's size) on the last level; each: channel aggregation A -> spatial softmax Z ->
F^ = F ⊙ Z -> 1x1 conv to K maps S -> GAP + softmax confidences C -> U = norm(Σ_j c_j S_j) ->
F_w = F^ ⊙ U. Cross-level bilinear pooling (the low level pooled to the high level's size; signed
square root, L2 normalisation), "compacted" to the 512-d L2-normalised embedding.

Choices where the text is open:
- A is the channel *mean* times a learned temperature (starting at 1), not the plain sum: the sum of
  hundreds of pretrained ReLU maps spans hundreds of units, so its softmax is one-hot (1 of 784 positions
  at conv3) and the attended features of many images vanish; the mean's softmax spreads over the image
  and the temperature lets training sharpen it, end to end as in the paper.
- Z is scaled by h·w so F^ keeps F's scale (a softmax mask alone divides every feature by about h·w);
  ``norm`` is min-max to [0, 1] per image.
- "Compacted" bilinear (the paper's 512-d after [26]) is a low-rank factorisation of the projection of
  the c1·c2 bilinear vector: both levels are projected to ``rank`` channels (1x1 convolutions), multiplied
  position by position and averaged, i.e. Σ_p xᵀ(Σ_j u_j v_jᵀ)y per output. The full projection would
  hold c1·c2·512 = 537 M weights for ResNet-50 (2 GB checkpoints); this one 6.3 M at rank 2,048.
- The evaluation view is the paper's: shorter side 256 (bilinear), centre 224 crop.

``attention=none`` gives the paper's baselines (last level, GAP, linear, L2 norm; "SO" in its Table 2),
``attention=single`` the emotion-specific module only ("SA"), ``bilinear=0`` concatenation instead
of CLB. The emotion confidences C serve as the model's class scores (``logits = log C``); without
attention, a linear layer on the embedding gives them: ``loss=ce`` trains the embedding through it (the
paper's softmax feature), while a metric loss trains it as a probe on the detached embedding.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..preprocessing import Preprocessing
from .base import EmotionModel
from .registry import register_model

ATTENTION = ("hierarchical", "single", "none")


class AttentionModule(nn.Module):
    """Attention head + output head of Fig. 3 for one level; returns F_w, C and U."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.class_maps = nn.Conv2d(channels, classes, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))  # of the aggregation map's softmax (see above)

    def spatial_mask(self, features: torch.Tensor) -> torch.Tensor:
        """Z: the spatial softmax of the aggregation map, (batch, h·w), summing to 1 per image."""
        return (features.mean(1).flatten(1).float() * self.log_temperature.exp()).softmax(-1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = features.shape
        z = self.spatial_mask(features).view(b, 1, h, w).to(features.dtype) * (h * w)
        attended = features * z
        maps = self.class_maps(attended)
        confidence = maps.float().mean((2, 3)).softmax(-1)
        u = (confidence[:, :, None, None] * maps.float()).sum(1, keepdim=True)
        low, high = u.amin((2, 3), keepdim=True), u.amax((2, 3), keepdim=True)
        u = (u - low) / (high - low).clamp_min(1e-6)
        return attended * u.to(attended.dtype), confidence, u[:, 0]


class CrossLevelBilinear(nn.Module):
    """Cross-level bilinear pooling, compacted by a rank-``rank`` factorisation: the low map pooled to the
    high one's size, both projected to ``rank`` channels, their product averaged over positions, signed
    square root and L2 normalisation (in float32: fp16 has no room for the root's epsilon)."""

    def __init__(self, low_channels: int, high_channels: int, rank: int):
        super().__init__()
        self.low = nn.Conv2d(low_channels, rank, 1, bias=False)
        self.high = nn.Conv2d(high_channels, rank, 1, bias=False)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = F.adaptive_avg_pool2d(low, high.shape[-2:])
        pooled = (self.low(low) * self.high(high)).float().mean((2, 3))
        return F.normalize(torch.sign(pooled) * torch.sqrt(pooled.abs() + 1e-10), dim=1)


@register_model("apse", "Attention-aware polarity sensitive embedding for affective image retrieval.", paper="002")
class Apse(EmotionModel):
    """Arguments: ``attention`` (hierarchical / single / none), ``bilinear``, ``rank`` (of the compacted
    bilinear pooling), ``dim`` (embedding size)."""

    feature_keys = ("levels",)
    default_loss = "wep"

    def __init__(self, *args, attention: str = "hierarchical", bilinear: bool = True, rank: int = 2048, dim: int = 512,
                 **kwargs):
        super().__init__(*args, **kwargs)
        attention = "none" if attention is None else attention  # the spec parser reads "none" as None
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}")
        self.attention = attention
        self.bilinear = bool(bilinear) and attention == "hierarchical"
        low_c, high_c = self.backbone.channels
        self.emotion_attention = AttentionModule(high_c, self.num_classes) if attention != "none" else None
        self.polarity_attention = AttentionModule(low_c, 2) if attention == "hierarchical" else None
        self.cross_level = CrossLevelBilinear(low_c, high_c, rank) if self.bilinear else None
        if self.bilinear:
            width = rank
        elif attention == "hierarchical":
            width = low_c + high_c
        else:
            width = high_c
        self.embed = nn.Linear(width, dim)
        self.probe = nn.Linear(dim, self.num_classes) if attention == "none" else None

    def make_backbone(self, name: str, weights: str | None) -> Backbone:
        # "conv3" and "conv5" of the paper's ResNet-50: the stride-8 and stride-32 levels
        return Backbone(name, weights, out_strides=(8, 32))

    @property
    def preprocessing(self) -> Preprocessing:
        """The backbone's size and normalisation, seen as the paper sees its images: shorter side resized
        (bilinear) to size / 0.875 (256 for 224), centre crop."""
        return replace(self.backbone.preprocessing, crop_pct=0.875, interpolation="bilinear")

    def head(self, features: dict) -> dict[str, torch.Tensor]:
        low, high = features["levels"]
        out: dict[str, torch.Tensor] = {}
        if self.emotion_attention is not None:
            high, out["emotion_confidence"], out["emotion_attention"] = self.emotion_attention(high)
        if self.polarity_attention is not None:
            low, out["polarity_confidence"], out["polarity_attention"] = self.polarity_attention(low)
        if self.cross_level is not None:
            pooled = self.cross_level(low, high)
        elif self.polarity_attention is not None:
            pooled = torch.cat([low.mean((2, 3)), high.mean((2, 3))], 1)
        else:
            pooled = high.mean((2, 3))
        embedding = F.normalize(self.embed(pooled), dim=1)
        if self.probe is not None:
            # a softmax loss (loss=ce) trains the embedding through these logits; a metric loss adds the probe's
            # cross-entropy on the detached embedding, so the probe never shapes the embedding it measures
            logits = self.probe(embedding)
            out["probe_logits"] = self.probe(embedding.detach())
        else:
            logits = out["emotion_confidence"].clamp_min(1e-12).log()
        return {**out, "embedding": embedding, "logits": logits, "distribution": logits.softmax(-1)}

    def explanation_maps(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = {"polarity_attention": "polarity attention", "emotion_attention": "emotion attention"}
        return {label: outputs[key] for key, label in names.items() if key in outputs}

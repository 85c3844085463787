"""``maiafa``: multilayer attentional interaction + adaptive feature aggregation (paper 003).

Four backbone levels, C1 (coarsest) ... C4 (finest), each projected by a 1x1 conv to ``width``
channels. The interaction module (Eq. 1-5) lets each level's spatial attention gate the next finer
level and ends in the emotional region map D at the finest scale; the aggregation module (Eq. 6-8)
weights the levels by learned ψ and concatenates them into F; the classifier sees GAP(D ⊗ F + F)
(Eq. 9) through three FC layers.

Reading of the text where it is loose: shuffle attention (SA) refines C1 and every gated fusion
O_m before its spatial attention A_m is taken (Fig. 2: "computed by SA"); A_m then gates the level's
own projected features (Eq. 4: ``up(A_m ⊗ C_m) ⊗ C_{m+1}``). Without the aggregation module, F is
the unweighted concatenation and E = D ⊗ F (region features alone); without the interaction module,
E = F. Polarity uses 2-way softmax cross-entropy, which equals the paper's binary cross-entropy on
``sigmoid(l_pos - l_neg)``; the L2 term is the optimiser's weight decay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import EmotionModel
from .registry import register_model


class ShuffleAttention(nn.Module):
    """SA-Net (Zhang & Yang, ICASSP 2021): per group, half the channels get channel attention (GAP,
    scale and shift, sigmoid), half spatial attention (GroupNorm, scale and shift, sigmoid); then a
    channel shuffle mixes the groups."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        if channels % (2 * groups):
            raise ValueError(f"shuffle attention needs channels ({channels}) divisible by 2 x groups ({groups})")
        self.groups = groups
        half = channels // (2 * groups)
        self.channel_weight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.channel_bias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.spatial_weight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.spatial_bias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.norm = nn.GroupNorm(half, half)

    @staticmethod
    def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, c // self.groups, h, w)
        xc, xs = x.chunk(2, dim=1)
        xc = xc * torch.sigmoid(self.channel_weight * xc.mean((2, 3), keepdim=True) + self.channel_bias)
        xs = xs * torch.sigmoid(self.spatial_weight * self.norm(xs) + self.spatial_bias)
        return self.shuffle(torch.cat([xc, xs], 1).reshape(b, c, h, w), 2)


class ECA(nn.Module):
    """Efficient channel attention (Wang et al., CVPR 2020): GAP, a 1-D conv across channels with the
    adaptive odd kernel size, sigmoid; no dimension reduction."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1):
        super().__init__()
        k = int(abs((math.log2(channels) + b) / gamma))
        self.kernel_size = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=self.kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.conv(x.mean((2, 3))[:, None, :])  # (B, 1, C)
        return x * torch.sigmoid(weights)[:, 0, :, None, None]


class SpatialAttention(nn.Module):
    """Eq. 1/3: ``sigmoid(conv7x7([mean over channels; max over channels]))``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class InteractionModule(nn.Module):
    """Section 3.2: coarse-to-fine attentional gating ending in the region map D (B, 1, H4, W4)."""

    def __init__(self, width: int, levels: int = 4, groups: int = 8):
        super().__init__()
        self.shuffle = nn.ModuleList(ShuffleAttention(width, groups) for _ in range(levels - 1))
        self.spatial = nn.ModuleList(SpatialAttention() for _ in range(levels - 1))
        self.eca = ECA(width)
        self.region = nn.Conv2d(width, 1, 1)

    def forward(self, coarse_to_fine: list[torch.Tensor]) -> torch.Tensor:
        fused = coarse_to_fine[0]  # C1 drives A1; later, the gated fusion O_m drives A_m
        for m, (finer, shuffle, spatial) in enumerate(zip(coarse_to_fine[1:], self.shuffle, self.spatial)):
            attention = spatial(shuffle(fused))
            fused = _up(attention * coarse_to_fine[m], finer) * finer
        return torch.sigmoid(self.region(self.eca(fused)))


class AggregationModule(nn.Module):
    """Section 3.3: ψ = W2(ReLU(W1 Z)) over the levels' pooled features; F = concat of ψ_i · C_i at the
    finest resolution."""

    def __init__(self, width: int, levels: int = 4, reduction: int = 4):
        super().__init__()
        self.weights = nn.Sequential(nn.Linear(width * levels, width * levels // reduction), nn.ReLU(inplace=True),
                                     nn.Linear(width * levels // reduction, levels))

    def forward(self, coarse_to_fine: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        psi = self.weights(torch.cat([c.mean((2, 3)) for c in coarse_to_fine], 1))  # (B, levels)
        finest = coarse_to_fine[-1]
        scaled = [_up(c * psi[:, i, None, None, None], finest) for i, c in enumerate(coarse_to_fine)]
        return torch.cat(scaled, 1), psi


@register_model("maiafa", "Multilayer attentional interaction (region map D) + adaptive feature aggregation.",
                paper="003")
class MaiAfa(EmotionModel):
    """Arguments: ``width`` (channels per level after the 1x1 convs), ``interaction`` and ``aggregation``
    (the ablations of Table 7), ``groups`` (shuffle attention), ``hidden`` (the two FC widths)."""

    feature_keys = ("levels",)

    def __init__(self, *args, width: int = 128, interaction: bool = True, aggregation: bool = True, groups: int = 8,
                 hidden: str = "512+256", dropout: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        if not (interaction or aggregation):
            raise ValueError("maiafa needs the interaction or the aggregation module (or both)")
        channels = self.backbone.channels[::-1]  # coarse to fine
        self.project = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width),
                                                   nn.ReLU(inplace=True)) for c in channels)
        self.interaction = InteractionModule(width, len(channels), groups) if interaction else None
        self.aggregation = AggregationModule(width, len(channels)) if aggregation else None
        sizes = [width * len(channels), *(int(h) for h in str(hidden).split("+"))]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.classifier = nn.Sequential(*layers, nn.Linear(sizes[-1], self.num_classes))

    def head(self, features: dict) -> dict[str, torch.Tensor]:
        levels = [p(c) for p, c in zip(self.project, features["levels"][::-1])]
        out: dict[str, torch.Tensor] = {}
        if self.aggregation is not None:
            global_features, out["level_weights"] = self.aggregation(levels)
        else:
            global_features = torch.cat([_up(c, levels[-1]) for c in levels], 1)
        if self.interaction is not None:
            region = self.interaction(levels)
            out["region_map"] = region[:, 0]
            fused = region * global_features + global_features if self.aggregation is not None else region * global_features
        else:
            fused = global_features
        embedding = fused.mean((2, 3))
        logits = self.classifier(embedding)
        return {**out, "logits": logits, "distribution": logits.softmax(-1), "embedding": embedding}

    def explanation_maps(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"region map D": outputs["region_map"]} if "region_map" in outputs else {}

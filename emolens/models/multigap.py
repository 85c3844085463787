"""``multigap``: the Multi-GAP network of paper 004 (Lim et al.).

Each stream (a backbone) gives one feature per block: ``MG_i = GAP(conv1x1_64(C_i))`` (Eq. 1). A
stream's MG sequence is used as it is, or as T = N time steps through a Bi-GRU whose outputs are
weighted by ``Att_t = tanh(W_t x_t + b_t)^2`` (Eq. 2). Streams (object: the model's backbone;
places: ``streams=...``) and optional ANP side features are fused early (concatenated bottleneck
features, one classifier) or late (each member has its own classifier; their softmax outputs are
averaged). ``depth=k`` keeps the first k blocks of every stream (the truncation study, section 4.2).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import BUNDLED, Backbone
from .base import EmotionModel
from .registry import register_model

FUSIONS = ("early", "late")
STREAM_INPUTS = ("rgb", "bgr255")


def caffe_preprocessing(preprocessing, mean: str):
    """``preprocessing`` whose normalisation gives 0-255 values minus Caffe's ``B+G+R`` mean (in R, G, B order:
    the stream flips the channels after it): (x - m / 255) / (1 / 255) = 255 x - m."""
    try:
        blue, green, red = (float(v) for v in str(mean).split("+"))
    except ValueError:
        raise ValueError(f"stream_mean must be the Caffe mean as B+G+R in 0-255 (e.g. from the weight file's mean "
                         f"file), not {mean!r}") from None
    return replace(preprocessing, mean=(red / 255, green / 255, blue / 255), std=(1 / 255,) * 3)


class StreamSet(nn.Module):
    """Backbones that look at the same image; each gets it at its own size and normalisation.

    ``forward`` returns ``blocks`` (every stream's block maps, stream after stream; a stream's last
    block is the map its network pools) and ``block_means`` (their spatial means).
    """

    def __init__(self, backbones: list[Backbone], bgr: list[bool] | None = None):
        super().__init__()
        self.streams = nn.ModuleList(backbones)
        self.bgr = bgr or [False] * len(backbones)  # streams whose network reads channels in B, G, R order
        first = backbones[0].preprocessing
        # The largest input any stream wants, so no stream sees an upsampled image.
        self.preprocessing = replace(first, size=max(b.preprocessing.size for b in backbones))
        self.block_channels = [[*b.channels[:-1], b.num_features] for b in backbones]
        self.name = "+".join(b.name for b in backbones)
        self.weights = "+".join(str(b.weights) for b in backbones)

    def _adapt(self, images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        target = backbone.preprocessing
        if target.size != images.shape[-1] or target.size != images.shape[-2]:
            images = F.interpolate(images, size=(target.size, target.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        if (target.mean, target.std) != (self.preprocessing.mean, self.preprocessing.std):
            mean_in, std_in = (images.new_tensor(v).view(1, 3, 1, 1) for v in (self.preprocessing.mean, self.preprocessing.std))
            mean, std = (images.new_tensor(v).view(1, 3, 1, 1) for v in (target.mean, target.std))
            images = (images * std_in + mean_in - mean) / std
        return images

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        blocks = []
        for backbone, bgr in zip(self.streams, self.bgr):
            adapted = self._adapt(images, backbone)
            out = backbone(adapted.flip(1) if bgr else adapted)
            blocks += [*out["levels"][:-1], out["final"]]
        return {"blocks": blocks, "block_means": [b.mean((2, 3)) for b in blocks]}


class TimestepAttention(nn.Module):
    """Eq. 2: ``Att_t = tanh(W_t x_t + b_t)^2`` with weights of its own for every time step; in [0, 1)."""

    def __init__(self, steps: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(steps, dim, dim))
        self.bias = nn.Parameter(torch.zeros(steps, dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.einsum("btd,ted->bte", x, self.weight) + self.bias).square()


class MGStream(nn.Module):
    """One stream's Multi-GAP features, optionally through Bi-GRU + attention, then a bottleneck."""

    def __init__(self, channels: list[int], width: int, gru_units: int, attention: bool, bottleneck: int,
                 dropout: float):
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        steps = len(channels)
        self.gru = nn.GRU(width, gru_units, batch_first=True, bidirectional=True) if gru_units else None
        self.attention = TimestepAttention(steps, 2 * gru_units) if gru_units and attention else None
        flat = steps * (2 * gru_units if gru_units else width)
        self.bottleneck = nn.Sequential(nn.Linear(flat, bottleneck), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, means: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # GAP and a 1x1 conv are both linear, so pooling first gives the same MG_i; it lets a frozen
        # backbone's cache keep one vector per block instead of whole maps.
        mg = torch.stack([F.linear(m, conv.weight.flatten(1), conv.bias) for conv, m in zip(self.reduce, means)], 1)
        attention = None
        if self.gru is not None:
            mg, _ = self.gru(mg)
            if self.attention is not None:
                attention = self.attention(mg)
                mg = mg * attention
        return self.bottleneck(mg.flatten(1)), attention


@register_model("multigap", "Multi-GAP: a GAP per backbone block, optional Bi-GRU + attention, early or late "
                "fusion of several streams and ANP features.", paper="004")
class MultiGap(EmotionModel):
    """Arguments: ``streams`` (backbones of the streams after the first, ``+``-separated, e.g.
    ``efficientnet_lite2``), ``stream_weights`` (their weight files, ``+``-separated; bundled backbones
    default to ImageNet), ``stream_input`` (how the extra streams' files expect images: ``rgb``, normalised as
    the network's timm configuration says, or ``bgr255``, Caffe's convention: B, G, R in 0-255 minus
    ``stream_mean``, the training set's ``B+G+R`` means, as VGG16-Places365's Caffe files do), ``depth``
    (blocks kept per stream), ``gru`` (Bi-GRU units M, 0 = none),
    ``attention``, ``fusion`` (``early``/``late``), ``anp`` (ANP vector size, 0 = none)."""

    feature_keys = ("block_means",)
    named_backbone = "backbone.streams.0"  # the first stream is the spec's backbone

    def __init__(self, *args, streams: str = "", stream_weights: str = "", stream_input: str = "rgb",
                 stream_mean: str = "", depth: int = 0, width: int = 64,
                 gru: int = 0, attention: bool = True, fusion: str = "early", anp: int = 0, bottleneck: int = 512,
                 dropout: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}")
        extra = self._extra_streams(streams, stream_weights, kwargs)
        if stream_input not in STREAM_INPUTS:
            raise ValueError(f"stream_input must be one of {', '.join(STREAM_INPUTS)}")
        if stream_input == "bgr255":
            for stream in extra:
                stream.preprocessing = caffe_preprocessing(stream.preprocessing, stream_mean)
        elif stream_mean:
            raise ValueError("stream_mean is the Caffe mean of stream_input=bgr255 streams; rgb streams have none")
        self.backbone = StreamSet([self.backbone, *extra], [False] + [stream_input == "bgr255"] * len(extra))
        blocks = self.backbone.block_channels
        self.depth = depth or min(len(c) for c in blocks)
        if not 1 <= self.depth <= min(len(c) for c in blocks):
            raise ValueError(f"depth must lie in 1..{min(len(c) for c in blocks)} (blocks per stream)")
        self.block_slices, start = [], 0
        for channels in blocks:
            self.block_slices.append(slice(start, start + self.depth))
            start += len(channels)
        self.mg = nn.ModuleList(MGStream(c[:self.depth], width, gru, attention, bottleneck, dropout) for c in blocks)
        self.fusion = fusion
        self.anp = anp
        self.extra_keys = ("anp",) if anp else ()
        if fusion == "early":
            self.classifier = nn.Linear(bottleneck * len(blocks) + anp, self.num_classes)
        else:
            self.classifiers = nn.ModuleList(nn.Linear(bottleneck, self.num_classes) for _ in blocks)
            if anp:  # the paper's ANP classifier: an MLP with hidden layers of 1024 and 512
                self.anp_mlp = nn.Sequential(nn.Linear(anp, 1024), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                             nn.Linear(1024, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                             nn.Linear(512, self.num_classes))

    @staticmethod
    def _extra_streams(streams: str, stream_weights: str, kwargs: dict) -> list[Backbone]:
        names = [s for s in str(streams).split("+") if s]
        files = [s for s in str(stream_weights).split("+") if s]
        if files and len(files) != len(names):
            raise ValueError(f"{len(files)} stream weight file(s) for {len(names)} extra stream(s)")
        out = []
        for i, name in enumerate(names):
            if files:
                weights = files[i]
            elif kwargs.get("backbone_weights", "imagenet") is None:
                weights = None
            elif name in BUNDLED:
                weights = "imagenet"
            else:
                raise ValueError(f"stream {name!r} has no bundled weights: give stream_weights=FILE")
            out.append(Backbone(name, weights, out_strides=None))
        return out

    def make_backbone(self, name: str, weights: str | None) -> Backbone:
        return Backbone(name, weights, out_strides=None)

    def cam_layers(self) -> dict[str, nn.Module]:
        """Per stream, the last block the model uses (a truncated stream never reaches its pooled map)."""
        layers = {}
        for b, channels in zip(self.backbone.streams, self.backbone.block_channels):
            last = self.depth - 1
            layers[b.name] = b.final_map if last == len(channels) - 1 else b.level_module(last)
        return layers

    def head(self, features: dict) -> dict[str, torch.Tensor]:
        means = features["block_means"]
        parts, attentions = zip(*(stream(means[s]) for stream, s in zip(self.mg, self.block_slices)))
        out: dict[str, torch.Tensor] = {}
        if any(a is not None for a in attentions):
            out["block_attention"] = torch.stack([a.mean(-1) for a in attentions], 1)  # (B, streams, T)
        if self.fusion == "early":
            fused = torch.cat([*parts, features["anp"]] if self.anp else list(parts), 1)
            logits = self.classifier(fused)
            return {**out, "logits": logits, "distribution": logits.softmax(-1), "embedding": fused}
        members = [c(p) for c, p in zip(self.classifiers, parts)]
        if self.anp:
            members.append(self.anp_mlp(features["anp"]))
        distribution = torch.stack([m.softmax(-1) for m in members]).mean(0)
        # log of the averaged softmax, so softmax(logits) is the late-fused distribution
        logits = distribution.clamp_min(1e-12).log()
        return {**out, "logits": logits, "distribution": distribution, "embedding": torch.cat(parts, 1),
                "member_logits": members}

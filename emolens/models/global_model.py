"""``global``: backbone + global average pooling + a linear head (the papers' "ResNet101" baseline row)."""

from __future__ import annotations

import torch
from torch import nn

from .base import EmotionModel
from .registry import register_model


@register_model("global", "Backbone, global average pooling and a linear classifier (the papers' baseline).")
class GlobalModel(EmotionModel):
    feature_keys = ("pooled",)

    def __init__(self, *args, dropout: float = 0.2, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.num_features, self.num_classes)

    def head(self, features: dict) -> dict[str, torch.Tensor]:
        pooled = features["pooled"]
        logits = self.classifier(self.dropout(pooled))
        return {"logits": logits, "distribution": logits.softmax(-1), "embedding": pooled}

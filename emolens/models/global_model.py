"""``global``: backbone + global average pooling + a linear head (the papers' "ResNet101" baseline row);
with ``level_means``, each level's spatial mean joins the pooled feature (a cheap fusion across levels)."""

from __future__ import annotations

import torch
from torch import nn

from .base import EmotionModel
from .registry import register_model


@register_model("global", "Backbone, global average pooling and a linear classifier (the papers' baseline).")
class GlobalModel(EmotionModel):
    """Arguments: ``dropout`` before the classifier; ``level_means`` (bool) to concatenate every level's
    spatial mean to the pooled feature."""

    def __init__(self, *args, dropout: float = 0.2, level_means: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.level_means = bool(level_means)
        self.feature_keys = ("pooled", "level_means") if self.level_means else ("pooled",)
        width = self.backbone.num_features + (sum(self.backbone.channels) if self.level_means else 0)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, self.num_classes)

    def head(self, features: dict) -> dict[str, torch.Tensor]:
        pooled = features["pooled"]
        if self.level_means:
            pooled = torch.cat([pooled, *features["level_means"]], 1)
        logits = self.classifier(self.dropout(pooled))
        return {"logits": logits, "distribution": logits.softmax(-1), "embedding": pooled}

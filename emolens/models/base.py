"""What every emolens model shares: a backbone, an output taxonomy, a task, and dict outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbones import DEFAULT_BACKBONE, Backbone, Preprocessing, create_backbone
from ..taxonomy import POLARITY, Taxonomy, get_taxonomy

TASKS = ("emotion", "polarity", "distribution")


def output_taxonomy(taxonomy: Taxonomy, task: str) -> Taxonomy:
    """The classes a model predicts: the dataset's emotions, or polarity for the polarity task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return POLARITY if task == "polarity" else taxonomy


class EmotionModel(nn.Module):
    """Base class: ``forward(images)`` = ``head(backbone(images))``, a dict of named outputs.

    ``head`` sees only the backbone's output dict, so a frozen backbone's features can be
    computed once and fed to ``head`` directly. ``feature_keys`` names what ``head`` reads
    (``"levels"``, ``"pooled"``), which is all a feature cache has to keep.
    """

    feature_keys: tuple[str, ...] = ("levels", "pooled")

    def __init__(
        self,
        taxonomy: Taxonomy | str = "mikels",
        task: str = "emotion",
        backbone: str | Backbone = DEFAULT_BACKBONE,
        backbone_weights: str | None = "imagenet",
    ):
        super().__init__()
        self.source_taxonomy = get_taxonomy(taxonomy)
        self.task = task
        self.taxonomy = output_taxonomy(self.source_taxonomy, task)
        self.backbone = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, backbone_weights)
        self.spec: dict[str, Any] = {}  # filled by create_model: how to build this model again

    @property
    def num_classes(self) -> int:
        return self.taxonomy.num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def head(self, features: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(images))

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (what trains when the backbone is frozen)."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

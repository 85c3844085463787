"""What every emolens model shares: a backbone, an output taxonomy, a task, and dict outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbones import DEFAULT_BACKBONE, Backbone, Preprocessing, create_backbone
from ..taxonomy import AFFECT, POLARITY, TASKS, Taxonomy, get_taxonomy


#: The value of a weight-file argument when a saved model is rebuilt: the tensors come from its checkpoint.
WEIGHTS_IN_CHECKPOINT = "in-checkpoint"


def output_taxonomy(taxonomy: Taxonomy, task: str) -> Taxonomy:
    """What a model predicts: the dataset's emotions, polarity for the polarity task, valence and arousal for va."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return {"polarity": POLARITY, "va": AFFECT}.get(task, taxonomy)


class EmotionModel(nn.Module):
    """Base class: ``forward(images)`` = ``head(backbone(images))``, a dict of named outputs.

    ``head`` sees only the backbone's output dict, so a frozen backbone's features can be
    computed once and fed to ``head`` directly. ``feature_keys`` names what ``head`` reads
    (``"levels"``, ``"pooled"``), which is all a feature cache has to keep.
    """

    feature_keys: tuple[str, ...] = ("levels", "pooled")
    #: Per-image side features the head needs beside the image (``EmotionDataset.extras`` keys).
    extra_keys: tuple[str, ...] = ()
    #: Training targets beyond the task's (e.g. ``"region_boxes"``), read from ``features["targets"]``.
    target_keys: tuple[str, ...] = ()
    #: The loss ``create_model`` picks when the spec names none (``None``: the task's default).
    default_loss: str | None = None
    #: Whether training may randomly crop and flip images (not when targets are boxes in the eval crop's frame).
    random_crops: bool = True
    #: Why a traced ONNX graph cannot reproduce this model (``None``: it can).
    onnx_unsupported: str | None = None
    #: What a user of this model's weights must know (written into every saved checkpoint's card).
    limitations: str | None = None
    #: Arguments naming a weights file read when the model is first built; a saved model holds those tensors,
    #: so it is rebuilt with :data:`WEIGHTS_IN_CHECKPOINT` there instead of reading the file again.
    weight_file_args: tuple[str, ...] = ()
    #: Where this model keeps the network its ``backbone`` spec names (a model of several streams: the first),
    #: so that ``--init-parts backbone`` from a one-network checkpoint lands there.
    named_backbone: str = "backbone"

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
        self.backbone = backbone if isinstance(backbone, nn.Module) else self.make_backbone(backbone, backbone_weights)
        self.spec: dict[str, Any] = {}  # filled by create_model: how to build this model again

    def make_backbone(self, name: str, weights: str | None) -> Backbone:
        """The backbone this model builds from a name (levels at strides 4-32 unless a model needs others)."""
        return create_backbone(name, weights)

    @property
    def num_classes(self) -> int:
        return self.taxonomy.num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def head(self, features: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, extras: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        missing = [k for k in self.extra_keys if k not in (extras or {})]
        if missing:
            raise ValueError(f"this model needs per-image side features ({', '.join(missing)}) beside the image")
        return self.head_outputs({**features, **(extras or {})})

    def head_outputs(self, features: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``head``'s outputs in the task's terms: for ``va`` the head's two outputs are ``affect`` (valence,
        arousal on the common scale), with no class distribution."""
        outputs = self.head(features)
        if self.task == "va":
            outputs = {k: v for k, v in outputs.items() if k != "distribution"}
            outputs["affect"] = outputs["logits"]
        return outputs

    def start_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch (0-based), also on resume; for staged training."""

    def cam_layers(self) -> dict[str, nn.Module]:
        """Layers a class-activation method explains, by label: the map the backbone pools, or for a model
        that reads only the levels, the coarsest level (one per stream, labelled by it, where there are several)."""
        if "pooled" in self.feature_keys:
            return {"": self.backbone.final_map}
        return {"": self.backbone.level_module(-1)}

    def explanation_maps(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's own spatial maps (attention, region maps) as (B, h, w) tensors, by name; none here."""
        return {}

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (what trains when the backbone is frozen)."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

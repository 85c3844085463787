"""``joint``: one trunk (any registered model), one head per label space, trained on several datasets.

The trunk's ``embedding`` (or, with ``embed=N``, a learned N-wide layer on it that every space trains: an
embedding that knows feelings, not only objects) feeds a linear head per space: ``<space>.logits`` for a taxonomy's classes
(``mikels``, ``emotion6``, ``polarity``) and ``affect`` (valence and arousal, common scale). The first class
space is the model's own: its outputs are also ``logits`` and ``distribution``, so predict, index and the
server read a joint model as any other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import blank_image, eval_mode
from ..data.joint import AFFECT_SPACE, is_affect, space_sizes
from ..taxonomy import get_taxonomy
from .base import EmotionModel
from .registry import get_entry, parse_model_spec, register_model


@register_model("joint", "A trunk (any registered model) with one head per label space, for several datasets.")
class JointModel(EmotionModel):
    """Arguments: ``trunk`` (a registered model's name; its arguments after ``/``, e.g. ``maiafa/width=32``)
    and ``spaces`` (``+``-separated, e.g. ``mikels+emotion6+affect``, or ``affect@oasis+affect@emotion6`` for a
    valence/arousal head per rating set, the first of them giving ``affect``; the first class space is the
    model's own); ``embed`` (0: none), the width of a shared layer between the trunk and the heads, whose
    output is the model's ``embedding``."""

    default_loss = "joint"

    def __init__(self, *args, trunk: str = "global", spaces: str = "mikels+affect", embed: int = 0, **kwargs):
        kwargs.pop("taxonomy", None)  # the spaces name the model's classes
        kwargs.pop("task", None)  # always every space's task
        names = [s for s in str(spaces).split("+") if s]
        classes = [s for s in names if not is_affect(s)]
        if not classes:
            raise ValueError("a joint model needs a class space (e.g. mikels) beside affect")
        trunk_name, trunk_args = parse_model_spec(str(trunk).replace("/", ":", 1).replace("/", ","))
        if trunk_name == "joint":
            raise ValueError("a joint model's trunk is another model")
        built = get_entry(trunk_name).builder(taxonomy=classes[0], task="emotion", **kwargs, **trunk_args)
        super().__init__(get_taxonomy(classes[0]), "joint", backbone=built.backbone)
        # The trunk uses the shared backbone without owning it, so its tensors are saved once (as backbone.*).
        built._modules.pop("backbone")
        object.__setattr__(built, "backbone", self.backbone)
        self.trunk = built
        self.feature_keys, self.extra_keys = built.feature_keys, built.extra_keys
        self.random_crops, self.onnx_unsupported = built.random_crops, built.onnx_unsupported
        self.named_backbone = built.named_backbone
        with eval_mode(self), torch.no_grad():
            width = self.trunk.head(self.backbone(blank_image(self.backbone)))["embedding"].shape[1]
        self.spaces = names
        embed = int(embed)
        if embed < 0:
            raise ValueError(f"embed must be 0 (none) or a width, got {embed}")
        self.shared = nn.Sequential(nn.Linear(width, embed), nn.GELU(), nn.Dropout(0.2)) if embed else nn.Identity()
        width = embed or width
        self.heads = nn.ModuleDict({s: nn.Linear(width, n) for s, n in space_sizes(names).items()})

    def head(self, features: dict) -> dict[str, torch.Tensor]:
        trunk = self.trunk.head(features)
        embedding = self.shared(trunk["embedding"])
        out = {k: v for k, v in trunk.items() if k not in ("logits", "distribution")}
        for space, layer in self.heads.items():
            out[space if is_affect(space) else f"{space}.logits"] = layer(embedding)
        rated = [s for s in self.spaces if is_affect(s)]
        if rated and AFFECT_SPACE not in out:
            out[AFFECT_SPACE] = out[rated[0]]
        first = next(s for s in self.spaces if not is_affect(s))
        out["logits"] = out[f"{first}.logits"]
        out["distribution"] = out["logits"].softmax(-1)
        out["embedding"] = embedding
        return out

    def start_epoch(self, epoch: int) -> None:
        self.trunk.start_epoch(epoch)

    def cam_layers(self) -> dict[str, nn.Module]:
        return self.trunk.cam_layers()

    def explanation_maps(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.trunk.explanation_maps(outputs)

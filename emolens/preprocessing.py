"""How an image becomes a model's input; plain PIL + NumPy so inference can run without PyTorch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, load_image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone; travels with every checkpoint."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["size"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bicubic"),
                   float(d.get("crop_pct", 0.875)))

    @property
    def resize(self) -> int:
        """The shorter side before the centre crop."""
        return int(math.floor(self.size / self.crop_pct))

    def load(self, source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """``source`` (a path, bytes or PIL image) as RGB, a large JPEG decoded at a reduced scale that still
        covers :attr:`resize`: how every inference and training path opens an image for this model."""
        return load_image(source, max_pixels, min_side=self.resize)

    def crop(self, image: Image.Image) -> Image.Image:
        """The RGB ``size`` x ``size`` view the model sees: shorter side to ``size / crop_pct``, centre crop."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)  # torchvision's Resize rule
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        left, top = round((new_w - self.size) / 2), round((new_h - self.size) / 2)
        # Resampling only the source box that lands in the crop gives the same pixels as resizing the
        # whole image and cropping, without building a 256000-pixel-wide row for a 1:1000 panorama.
        sx, sy = new_w / w, new_h / h
        box = (left / sx, top / sy, (left + self.size) / sx, (top + self.size) / sy)
        return image.resize((self.size, self.size), _RESAMPLE[self.interpolation], box=box)

    def normalise(self, view: Image.Image) -> np.ndarray:
        """A view made by :meth:`crop` as the model's normalised (3, size, size) float32 input."""
        array = np.asarray(view, dtype=np.float32) * (1 / 255)
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """The model's input for any image: :meth:`normalise` of :meth:`crop`."""
        return self.normalise(self.crop(image))

"""Batched inference: images in, typed results out; a bad file is reported and the batch goes on."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from .data.transforms import eval_transform
from .engine.data import image_loader
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from .models import EmotionModel
from .weights import DEFAULT_MODEL, load_model


@dataclass
class Prediction:
    """What one image evokes: the top class, its polarity, and the full distribution."""

    source: str
    emotion: str
    probability: float
    polarity: str | None  # "positive" / "negative"; None when the taxonomy gives the top class none
    positive_probability: float | None  # the positive share of the distribution over polar classes
    distribution: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PredictionError:
    source: str
    reason: str


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


class Predictor:
    """``Predictor(model=None).predict(paths_or_images)``; ``model`` is a model, a run folder, a
    ``.safetensors`` file, or ``None`` for the embedded default model."""

    def __init__(self, model: EmotionModel | str | Path | None = None, batch_size: int = 32,
                 workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, channels_last: bool = True):
        self.model = model if isinstance(model, EmotionModel) else load_model(model or DEFAULT_MODEL)
        self.model.eval()
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        self.max_pixels = max_pixels
        self.transform = eval_transform(self.model.preprocessing)

    @property
    def taxonomy(self):
        return self.model.taxonomy

    @torch.inference_mode()
    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def _results(self, sources: Sequence[str], probs: torch.Tensor) -> list[Prediction]:
        tax = self.taxonomy
        polar = tax.polarity_distribution(probs.double().numpy())[:, 1]
        out = []
        for src, p, pos in zip(sources, probs.tolist(), polar.tolist()):
            top = max(range(len(p)), key=p.__getitem__)
            pol = tax.polarity[top]
            out.append(Prediction(
                source=src, emotion=tax.classes[top], probability=p[top],
                polarity=None if pol is None else ("positive" if pol == 1 else "negative"),
                positive_probability=None if pos != pos else pos,  # NaN: no polar mass at all
                distribution=dict(zip(tax.classes, p)),
            ))
        return out

    def predict_iter(self, inputs: Iterable[str | os.PathLike | Image.Image]) -> Iterator[list[Prediction | PredictionError]]:
        """Results batch by batch, in input order within each batch; files decode in worker processes."""
        items = list(inputs)
        images = [(i, x) for i, x in enumerate(items) if isinstance(x, Image.Image)]
        paths = [(i, x) for i, x in enumerate(items) if not isinstance(x, Image.Image)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            tensors, names, errors = [], [], []
            for i, img in chunk:
                name = getattr(img, "filename", "") or f"<image {i}>"
                try:
                    tensors.append(self.transform(load_image(img, self.max_pixels)))
                    names.append(name)
                except ImageLoadError as e:
                    errors.append(PredictionError(name, e.reason))
            results: list[Prediction | PredictionError] = list(errors)
            if tensors:
                probs = self.run(torch.stack(tensors))["logits"].float().softmax(-1)
                results = self._results(names, probs) + results
            yield results
        if not paths:
            return
        loader = image_loader([p for _, p in paths], self.transform, self.batch_size,
                              self.workers if len(paths) > self.batch_size else 0, max_pixels=self.max_pixels)
        for batch in loader:
            results = [PredictionError(str(paths[i][1]), reason) for i, reason in batch["errors"]]
            if len(batch["index"]):
                probs = self.run(batch["image"])["logits"].float().softmax(-1)
                results = self._results([str(paths[i][1]) for i in batch["index"].tolist()], probs) + results
            yield results

    def predict(self, inputs: Iterable[str | os.PathLike | Image.Image] | str | os.PathLike | Image.Image,
                on_batch: Callable[[int], None] | None = None) -> tuple[list[Prediction], list[PredictionError]]:
        """(predictions, errors) for files or PIL images; nothing raises for a bad image."""
        if isinstance(inputs, (str, os.PathLike, Image.Image)):
            inputs = [inputs]
        good, bad = [], []
        for results in self.predict_iter(inputs):
            for r in results:
                (good if isinstance(r, Prediction) else bad).append(r)
            if on_batch:
                on_batch(len(results))
        return good, bad

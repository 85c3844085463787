"""Batched inference: images in, typed results out; a bad file is reported and the batch goes on.

Two backends run the same preprocessing: ONNX Runtime (``"onnx"``: a saved model is exported once
and cached; no PyTorch in the process when the export is cached) and eager PyTorch (``"torch"``).
``"auto"`` takes ONNX Runtime for a saved model and falls back to PyTorch, with a warning, where a
model does not export; a live ``nn.Module`` runs in PyTorch unless ``backend="onnx"``.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .identity import ModelIdentity, model_identity
from .images import DEFAULT_MAX_PIXELS, ImageLoadError
from .polarity import PolarityCalibration
from .preprocessing import Preprocessing
from .storage import DEFAULT_MODEL
from .taxonomy import AFFECT, Taxonomy

if TYPE_CHECKING:
    from .models import EmotionModel

BACKENDS = ("auto", "onnx", "torch")


def polarity_of(positive_probability: float | None) -> str | None:
    """The one definition of an image's polarity: "positive" when ``positive_probability`` is at least 0.5,
    else "negative"; None when the model has no polarity to give."""
    if positive_probability is None:
        return None
    return "positive" if positive_probability >= 0.5 else "negative"


@dataclass
class Prediction:
    """What one image evokes: the top class, its polarity, the full distribution, and where the model
    rates them, valence and arousal on the common scale [-1, 1] (see :class:`~emolens.taxonomy.AffectScale`)."""

    source: str
    emotion: str
    probability: float
    polarity: str | None  # polarity_of(positive_probability): the two never disagree
    # The model's calibrated probability that the image is positive (its card's polarity calibration of the
    # positive share and valence); without one, the positive share of the distribution over polar classes.
    positive_probability: float | None
    distribution: dict[str, float]
    valence: float | None = None  # None: the model has no valence/arousal head
    arousal: float | None = None
    #: Other per-image model outputs the predictor was asked to keep (``keep=("embedding",)``).
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The fields but ``outputs``, as plain values (no deep copy of the kept arrays)."""
        return {f.name: dict(self.distribution) if f.name == "distribution" else getattr(self, f.name)
                for f in fields(self) if f.name != "outputs"}


@dataclass
class PredictionError:
    source: str
    reason: str


def default_workers() -> int:
    """Decoding threads: PIL decodes and resizes outside the GIL, so threads overlap with inference."""
    return min(4, os.cpu_count() or 1)


def polarity_calibration(card: dict, outputs: list[str]) -> PolarityCalibration | None:
    """The model card's polarity calibration, where the model rates valence (the calibration reads it)."""
    if "polarity_calibration" not in card or "affect" not in outputs:
        return None
    return PolarityCalibration.from_dict(card["polarity_calibration"])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Each row of ``logits`` as probabilities (float64), as every prediction reports them."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def positive_probabilities(taxonomy: Taxonomy, probs: np.ndarray, affect: np.ndarray | None,
                           calibration: PolarityCalibration | None) -> np.ndarray:
    """Each image's probability of being positive, as every path reports it: the calibration of the positive
    share and the valence (``affect[:, 0]``, clipped to the common scale) where the model has one, else the
    positive share of ``probs`` over the classes that have a polarity (NaN where none has mass)."""
    share = taxonomy.polarity_distribution(probs)[:, 1]
    if calibration is None:
        return share
    return calibration(share, np.asarray(affect, np.float64)[:, 0].clip(-1, 1))


def predictions(taxonomy: Taxonomy, calibration: PolarityCalibration | None, sources: Sequence[str],
                outputs: dict[str, np.ndarray]) -> list[Prediction]:
    """What a model's ``logits`` (and ``affect``, where it rates it) mean, row by row: the one place every
    path (``predict``, ``explain``, the index, the server) turns outputs into what a user reads."""
    logits = outputs["logits"]
    # A head is free to step outside the common scale; what a user reads stays on it.
    affect = np.clip(outputs["affect"], -1.0, 1.0).tolist() if "affect" in outputs else [(None, None)] * len(logits)
    probs = softmax(logits)
    polar = positive_probabilities(taxonomy, probs, outputs.get("affect"), calibration)
    out = []
    for src, p, pos, (valence, arousal) in zip(sources, probs.tolist(), polar.tolist(), affect):
        top = max(range(len(p)), key=p.__getitem__)
        positive = None if pos != pos else pos  # NaN: no polar mass at all
        out.append(Prediction(source=src, emotion=taxonomy.classes[top], probability=p[top],
                              polarity=polarity_of(positive), positive_probability=positive,
                              distribution=dict(zip(taxonomy.classes, p)), valence=valence, arousal=arousal))
    return out


class TorchRunner:
    """Eager PyTorch behind the same array-in, arrays-out call as :class:`~emolens.runtime.OnnxModel`."""

    def __init__(self, model: "EmotionModel", channels_last: bool = True, device: str = "cpu"):
        from .engine.placement import Placement

        self.placement = Placement.resolve(device, "fp32", channels_last)
        self.model = self.placement.model(model.eval())
        self.taxonomy: Taxonomy = model.taxonomy
        self.preprocessing: Preprocessing = model.preprocessing
        self.identity = model_identity(model)
        self.card = getattr(model, "meta", {}).get("card", {})
        size = self.preprocessing.size
        self.outputs = list(self(np.zeros((1, 3, size, size), np.float32)))  # named as an ONNX export names them

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(self.placement.tensor(torch.from_numpy(images)))
        return {k: v.float().cpu().numpy() for k, v in out.items()
                if isinstance(v, torch.Tensor) and v.shape[:1] == (len(images),)}


def make_runner(model, backend: str = "auto", threads: int | None = None, device: str = "cpu",
                precision: str = "fp32"):
    """``(backend_used, runner)`` for a live model, a saved model (run folder, ``.safetensors``,
    ``"default"``) or an exported ``.onnx`` file. On a GPU, ONNX Runtime runs where it has the CUDA
    provider (onnxruntime-gpu), PyTorch otherwise. ``precision="int8"`` runs the model's int8 version
    where it has one that passed its gate, else fp32 with a warning that says why."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    from .runtime import PRECISIONS, ExportError, OnnxModel, int8_model_for, onnx_model_for, onnx_providers

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        if backend == "torch" or device != "cpu":
            raise ValueError("int8 runs on ONNX Runtime on the CPU: use --backend auto or onnx and --device cpu")
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise ValueError("a live model has no int8 version; export one with `emolens export --precision int8`")
        quantised, why = int8_model_for(model, threads)
        if quantised is not None:
            return "onnx", quantised
        warnings.warn(f"running fp32, not int8: {why}", stacklevel=3)

    providers = None
    if device != "cpu":
        from .engine.placement import resolve_device

        where = resolve_device(device)
        if where.type != "cpu":
            providers = onnx_providers(str(where)) if backend != "torch" else None
            if providers is None:
                if backend == "onnx" or str(model).endswith(".onnx"):
                    raise ValueError(f"this ONNX Runtime has no provider for {where}; install onnxruntime-gpu "
                                     "or use the torch backend")
                backend = "torch"

    live = model is not None and not isinstance(model, (str, os.PathLike))
    if live:
        if backend != "onnx":
            return "torch", TorchRunner(model, device=device)
        from .runtime import export_onnx

        data, meta = export_onnx(model)
        return "onnx", OnnxModel(data, meta, threads=threads, providers=providers)
    source = model or DEFAULT_MODEL
    if str(source).endswith(".onnx"):
        if backend == "torch":
            raise ValueError(f"{source} is an ONNX model; it runs only with the onnx backend")
        return "onnx", OnnxModel(source, threads=threads, providers=providers)
    if backend != "torch":
        try:
            return "onnx", onnx_model_for(source, threads=threads, providers=providers)
        except (ImportError, ExportError) as e:
            if backend == "onnx":
                raise
            warnings.warn(f"ONNX Runtime unavailable for {source} ({e}); running in PyTorch", stacklevel=3)
    from .weights import load_model

    return "torch", TorchRunner(load_model(source), device=device)


class Predictor:
    """``Predictor(model=None).predict(paths_or_images)``; ``model`` is a model, a run folder, a
    ``.safetensors`` or ``.onnx`` file, or ``None`` for the embedded default model; ``precision="int8"``
    runs its int8 version where that passed its gate (see :mod:`emolens.quantize`)."""

    def __init__(self, model: "EmotionModel | str | os.PathLike | None" = None, batch_size: int = 32,
                 workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, backend: str = "auto",
                 threads: int | None = None, keep: Sequence[str] = (), device: str = "cpu", precision: str = "fp32"):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.backend, self.runner = make_runner(model, backend, threads, device, precision)
        #: What runs: "fp32", or "int8" where it was asked for and the model's int8 version passed its gate.
        self.precision: str = getattr(self.runner, "precision", "fp32")
        self.taxonomy: Taxonomy = self.runner.taxonomy
        if self.taxonomy.name == AFFECT.name:
            raise ValueError("this model predicts valence and arousal alone, not emotions; score it with "
                             "`emolens evaluate`")
        self.preprocessing: Preprocessing = self.runner.preprocessing
        self.identity: ModelIdentity = self.runner.identity
        #: How the positive share and valence combine into ``positive_probability`` (None: the share alone).
        self.calibration = polarity_calibration(self.runner.card, self.runner.outputs)
        #: Whether the model rates valence and arousal (predictions then carry them).
        self.rates_affect = "affect" in self.runner.outputs
        self.batch_size = batch_size
        #: Images the model takes per call at its best speed (ONNX Runtime's chunk; PyTorch: the batch size).
        self.images_per_call: int = getattr(self.runner, "images_per_call", batch_size)
        self.workers = default_workers() if workers is None else workers
        self.max_pixels = max_pixels
        self.keep = tuple(keep)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The model's named outputs for a preprocessed (B, 3, H, W) float32 batch."""
        return self.runner(images)

    def prepare(self, item: str | os.PathLike | Image.Image) -> np.ndarray:
        """One input as a model-ready array; raises :class:`ImageLoadError` for an unusable image."""
        return self.preprocessing(self.preprocessing.load(item, self.max_pixels))

    def _decode(self, item) -> np.ndarray | ImageLoadError:
        try:
            return self.prepare(item)
        except ImageLoadError as e:
            return e

    def _batch_results(self, names: list[str], decoded: list) -> list[Prediction | PredictionError]:
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        results: list[Prediction | PredictionError | None] = [
            None if isinstance(d, np.ndarray) else PredictionError(names[i], d.reason) for i, d in enumerate(decoded)]
        if good:
            outputs = self.run(np.stack([decoded[i] for i in good]))
            missing = [k for k in self.keep if k not in outputs]
            if missing:
                raise KeyError(f"the model has no output {', '.join(missing)}")
            for row, (i, pred) in enumerate(zip(good, predictions(self.taxonomy, self.calibration, [names[i] for i in good], outputs))):
                pred.outputs = {k: outputs[k][row] for k in self.keep}
                results[i] = pred
        return results

    def predict_prepared(self, names: Sequence[str], arrays: Sequence[np.ndarray | ImageLoadError]
                         ) -> list[Prediction | PredictionError]:
        """Predictions for inputs already made by :meth:`prepare` (e.g. decoded elsewhere), in batches; an
        input that could not be made (its :class:`ImageLoadError`) gets its :class:`PredictionError`."""
        results = []
        for s in range(0, len(arrays), self.batch_size):
            results += self._batch_results(list(names[s:s + self.batch_size]), list(arrays[s:s + self.batch_size]))
        return results

    def predict_iter(self, inputs: Iterable[str | os.PathLike | Image.Image]) -> Iterator[list[Prediction | PredictionError]]:
        """Results batch by batch, in input order; the next batch decodes while this one runs."""
        items = list(inputs)
        names = [str(x) if not isinstance(x, Image.Image) else (getattr(x, "filename", "") or f"<image {i}>")
                 for i, x in enumerate(items)]
        starts = range(0, len(items), self.batch_size)
        if self.workers == 0:
            for s in starts:
                chunk = items[s:s + self.batch_size]
                yield self._batch_results(names[s:s + self.batch_size], [self._decode(x) for x in chunk])
            return
        with ThreadPoolExecutor(self.workers) as pool:
            def submit(s: int) -> list[Future]:
                return [pool.submit(self._decode, x) for x in items[s:s + self.batch_size]]

            pending = submit(0) if items else []
            for s in starts:
                decoded = [f.result() for f in pending]
                if s + self.batch_size < len(items):
                    pending = submit(s + self.batch_size)
                yield self._batch_results(names[s:s + self.batch_size], decoded)

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

"""Where an emotion comes from: Grad-CAM (pytorch-grad-cam) per explained layer, plus each model's own
maps (attention, region maps), drawn over the view the model saw, beside the predicted distribution."""

from __future__ import annotations

import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageLoadError
from .models import EmotionModel
from .predict import polarity_calibration, predictions
from .storage import OutputError, atomic_write, atomic_write_json

METHODS = ("gradcam", "gradcam++", "scorecam")
#: How each method is named on the panels it draws.
METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}
POSITIVE, NEGATIVE, NEUTRAL = "#e8a33d", "#4a78c2", "#9a9a9a"
#: Regions drawn strongly and numbered; the others faintly.
LABELLED_BOXES = 3


@dataclass
class Explanation:
    source: str
    emotion: str  # the class the maps explain
    distribution: dict[str, float]
    maps: dict[str, np.ndarray]  # name -> (size, size) in [0, 1]
    image: Image.Image  # the model's view (resized, centre-cropped)
    boxes: list[tuple[float, float, float, float, float]] | None = None  # x1, y1, x2, y2, score in view pixels
    affect: tuple[float, float] | None = None  # valence, arousal (common scale) where the model rates them
    polarity: str | None = None  # as `predict` reports it (polarity_of the positive probability)


def overlay(view: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """A [0, 1] map coloured with matplotlib's "jet" and blended over the model's view."""
    from matplotlib import colormaps

    base = np.asarray(view, dtype=np.float32) / 255
    colour = colormaps["jet"](heat)[..., :3]
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * base + alpha * colour)))


class _Logits(torch.nn.Module):
    """pytorch-grad-cam wants a tensor out; emolens models give a dict."""

    def __init__(self, model: EmotionModel):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images)["logits"]


def _cam_class(method: str):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}
    if method not in classes:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return classes[method]


def _normalise(m: np.ndarray) -> np.ndarray:
    m = m - m.min()
    return m / m.max() if m.max() > 0 else m


#: One lock per model: class-activation methods hook the model's layers, so two explanations running on
#: one model at once read each other's activations (wrong maps) or corrupt memory.
_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _model_lock(model: torch.nn.Module) -> threading.Lock:
    with _LOCKS_LOCK:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())


class Explainer:
    """``Explainer(model).explain(image)``: the maps of one image for the predicted class or ``target``.
    Safe to call from several threads: explanations of one model run one at a time."""

    def __init__(self, model: EmotionModel, method: str = "gradcam", max_pixels: int = DEFAULT_MAX_PIXELS,
                 device: str = "cpu", numbers=None):
        """``numbers``: a :class:`~emolens.predict.Predictor` of the same model (e.g. its int8 version) whose
        distribution, polarity and valence/arousal are reported, as ``predict`` reports them; the maps come
        from ``model``'s gradients."""
        from .engine.placement import Placement

        self.placement = Placement.resolve(device)
        self.model = self.placement.model(model.eval())
        self.cam_class = _cam_class(method)
        self.method = method
        self.title = METHOD_TITLES[method]
        self.max_pixels = max_pixels
        self.preprocessing = model.preprocessing
        self.card = getattr(model, "meta", {}).get("card", {})  # its polarity calibration, as Predictor reads it
        self.numbers = numbers

    def explain(self, source: str | os.PathLike | Image.Image, target: str | None = None) -> Explanation:
        """Raises :class:`ImageLoadError` for an unusable image, ``ValueError`` for an unknown target."""
        view = self.preprocessing.crop(self.preprocessing.load(source, self.max_pixels))
        name = getattr(source, "filename", "") if isinstance(source, Image.Image) else str(source)
        return self.explain_view(view, target, name or "<image>")

    def explain_view(self, view: Image.Image, target: str | None = None, name: str = "<image>") -> Explanation:
        """The maps of a view already made by the model's ``Preprocessing.crop`` (it is not cropped again)."""
        with _model_lock(self.model):
            return self._explain(view, target, name)

    def _explain(self, view: Image.Image, target: str | None, name: str) -> Explanation:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        # The very input Predictor builds (Preprocessing.__call__ = normalise(crop)), so maps, boxes and
        # the distribution belong to the view drawn and agree with `predict`.
        batch = self.placement.tensor(torch.from_numpy(self.preprocessing.normalise(view))[None])
        tax = self.model.taxonomy
        with torch.no_grad():
            outputs = self.model(batch)
        if self.numbers is not None:
            reported = self.numbers.predict_prepared([name], [self.preprocessing.normalise(view)])[0]
        else:
            numbers = {k: outputs[k].float().cpu().numpy() for k in ("logits", "affect") if k in outputs}
            reported = predictions(tax, polarity_calibration(self.card, list(numbers)), [name], numbers)[0]
        index = tax.index(reported.emotion if target is None else target)
        size = self.preprocessing.size
        maps = {}
        for label, layer in self.model.cam_layers().items():
            title = f"{self.title} ({label})" if label else self.title
            with self.cam_class(model=_Logits(self.model), target_layers=[layer]) as cam:
                maps[title] = _normalise(cam(input_tensor=batch, targets=[ClassifierOutputTarget(index)])[0])
        for title, m in self.model.explanation_maps(outputs).items():
            up = F.interpolate(m[:1, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            maps[title] = _normalise(up.detach().cpu().numpy())
        boxes = None
        if "boxes" in outputs:
            scores = outputs.get("box_scores")
            boxes = [(*map(float, b), float(scores[0][i]) if scores is not None else 1.0)
                     for i, b in enumerate(outputs["boxes"][0])]
        affect = None if reported.valence is None else (reported.valence, reported.arousal)
        return Explanation(name, tax.classes[index], reported.distribution, maps, view, boxes, affect,
                           reported.polarity)


def render(explanation: Explanation, taxonomy, path: str | os.PathLike) -> Path:
    """One PNG: the model's view, an overlay per map, the boxes, the distribution as bars by polarity, and
    where the model rates valence and arousal, the image as a point on the valence-arousal plane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Patch

    panels = 1 + len(explanation.maps)
    extra = 1 if explanation.affect is not None else 0
    fig = plt.figure(figsize=(3.0 * panels + 3.4 + 3.0 * extra, 3.3), dpi=100)
    grid = fig.add_gridspec(1, panels + 1 + extra, width_ratios=[1] * panels + [1.15] + [1] * extra)
    view = np.asarray(explanation.image)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(view)
    ranked = sorted(explanation.boxes or [], key=lambda b: -b[4])
    for rank, (x1, y1, x2, y2, score) in reversed(list(enumerate(ranked, 1))):  # the best drawn last, on top
        top = rank <= LABELLED_BOXES  # the rest stay faint so that a crowd of regions stays readable
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2.0 if top else 0.8,
                                   color="#ffd400", alpha=1.0 if top else 0.5))
        if top:
            ax.text(x1 + 2, y1 + 2, f"{rank}: {score:.2f}", color="black", fontsize=6, va="top",
                    bbox={"facecolor": "#ffd400", "edgecolor": "none", "pad": 1})
    ax.set_title("image" + (f" + {len(ranked)} regions, by score" if ranked else ""), fontsize=9)
    ax.axis("off")
    image_axes = []
    for i, (name, m) in enumerate(explanation.maps.items(), 1):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(overlay(explanation.image, m))
        ax.set_title(f"{name}: {explanation.emotion}", fontsize=9)
        ax.axis("off")
        image_axes.append(ax)
    ax = fig.add_subplot(grid[0, panels])
    classes = list(explanation.distribution)
    values = [explanation.distribution[c] for c in classes]
    colours = [NEUTRAL if p is None else (POSITIVE if p == 1 else NEGATIVE) for p in taxonomy.polarity]
    ax.barh(range(len(classes)), values, color=colours)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("predicted distribution", fontsize=9)
    shown = [(POSITIVE, "positive"), (NEGATIVE, "negative"), (NEUTRAL, "no polarity")]
    ax.legend(handles=[Patch(color=c, label=label) for c, label in shown if c in colours], fontsize=7,
              loc="lower right", frameon=False)
    if explanation.affect is not None:
        draw_affect_plane(fig.add_subplot(grid[0, panels + 1]), *explanation.affect, explanation.polarity)
    fig.tight_layout(w_pad=2.5)  # room for the colour bar between the overlays and the labels of the bars
    if image_axes:  # after tight_layout, which does not place colour bars
        scale = fig.colorbar(ScalarMappable(cmap="jet"), ax=image_axes, fraction=0.025, pad=0.01)
        scale.set_ticks([0, 1], labels=["low", "high"], fontsize=7)
    path = Path(path)

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)
    return path


def draw_affect_plane(ax, valence: float, arousal: float, polarity: str | None) -> None:
    """The valence-arousal plane (common scale) with the image as a point in its polarity's colour (the
    polarity `predict` reports, as the bars' legend has it)."""
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.axvline(0, color="#cccccc", lw=0.8)
    colour = {"positive": POSITIVE, "negative": NEGATIVE}.get(polarity, NEUTRAL)
    ax.plot([valence], [arousal], "o", color=colour, ms=9, mec="black", label=polarity or "no polarity")
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("valence: unpleasant - pleasant", fontsize=8)
    ax.set_ylabel("arousal: calm - excited", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"valence {valence:+.2f}, arousal {arousal:+.2f}", fontsize=9)


def output_names(sources: Sequence[str]) -> list[str]:
    """A distinct, file-system-safe PNG name per source (``a.jpg`` -> ``a.png``; repeats get a number)."""
    names, seen = [], set()
    for source in sources:
        stem = re.sub(r"[^\w.-]+", "_", Path(source).stem)[:100] or "image"
        name, k = f"{stem}.png", 1
        while name in seen:
            k += 1
            name = f"{stem}-{k}.png"
        seen.add(name)
        names.append(name)
    return names


def explain_files(model: EmotionModel, sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  method: str = "gradcam", target: str | None = None, on_image: Callable[[], None] | None = None,
                  device: str = "cpu", numbers=None) -> tuple[list[Path], list[ImageLoadError]]:
    """Write one PNG per usable image into ``out_dir``, and ``explanations.json`` there: which image each PNG
    explains (same-named images get numbered names) and its emotion. Unusable images come back as errors;
    ``on_image`` is called after each image, done or failed; ``numbers`` as for :class:`Explainer`."""
    explainer = Explainer(model, method, device=device, numbers=numbers)
    if target is not None:
        model.taxonomy.index(target)  # an unknown emotion stops the run before any work
    out_dir = Path(out_dir)
    written, errors, manifest = [], [], []
    for source, name in zip(sources, output_names([str(s) for s in sources])):
        try:
            explanation = explainer.explain(source, target)
        except ImageLoadError as e:
            errors.append(e)
        else:
            try:
                written.append(render(explanation, model.taxonomy, out_dir / name))
            except OSError as e:  # a full or read-only disk: no later image would fare better
                raise OutputError(f"cannot write the explanation of {source} to {out_dir / name} "
                                  f"({len(written)} written before): {e}") from e
            manifest.append({"source": str(source), "png": name, "emotion": explanation.emotion})
        if on_image:
            on_image()
    atomic_write_json(out_dir / MANIFEST, {"method": method, "target": target, "explanations": manifest})
    return written, errors


#: The file beside the PNGs that says which image each explains.
MANIFEST = "explanations.json"

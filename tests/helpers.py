"""Tiny synthetic datasets and models for fast tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from emolens.taxonomy import MIKELS


def write_image(path: Path, color=(200, 30, 30), size=(16, 12), seed: int | None = None) -> Path:
    """A small synthetic image; with ``seed``, random noise instead of a flat colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        img = Image.new("RGB", size, color)
    else:
        rng = np.random.default_rng(seed)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img.save(path)
    return path


def load_benchmark(name: str):
    """The script ``benchmarks/NAME.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_BACKBONE = "test_efficientnet"
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40)]


def make_ldl_dataset(root: Path, per_class: int = 8, classes=(0, 2, 5, 7), size=(40, 32), missing: int = 0) -> str:
    """A Flickr_LDL-style folder whose classes differ by colour; returns its spec."""
    rng = np.random.default_rng(0)
    lines = ["images-name " + " ".join(c.capitalize() for c in MIKELS.classes)]
    n = 0
    for k, c in enumerate(classes):
        for i in range(per_class):
            votes = rng.integers(0, 2, 8)
            votes[c] += 6
            name = f"{n}.jpg"
            lines.append(name + " " + " ".join(map(str, votes)))
            colour = np.clip(np.array(COLOURS[k % len(COLOURS)]) + rng.integers(-30, 30, 3), 0, 255)
            img = np.clip(colour + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            (root / "images").mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(img).save(root / "images" / name)
            n += 1
    for j in range(missing):
        lines.append(f"missing{j}.jpg 1 0 0 0 0 0 0 0")
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    return f"flickr_ldl={root}"


def make_oasis(root, n: int = 30) -> str:
    """OASIS-style set whose valence is the image's brightness and arousal its redness (1-7 scale)."""
    rng = np.random.default_rng(0)
    lines = [",Theme,Category,Source,Valence_mean,Valence_SD,Valence_N,Arousal_mean,Arousal_SD,Arousal_N"]
    (root / "images").mkdir(parents=True)
    for i in range(n):
        bright, red = rng.uniform(0, 1, 2)
        pixel = np.array([60 + 180 * red, 40 + 200 * bright, 40 + 200 * bright])
        image = np.clip(pixel + rng.normal(0, 10, (32, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"Theme {i}.jpg")
        lines.append(f"I{i + 1},Theme {i},Object,Pixabay,{1 + 6 * bright:.3f},1,100,{1 + 6 * red:.3f},1,100")
    (root / "OASIS.csv").write_bytes("\r".join(lines).encode())
    return f"oasis={root}"


def png(seed: int = 0, size=(60, 40)) -> bytes:
    """A random-noise PNG file's bytes (an upload)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tiny_model(spec: str = "global", task: str = "emotion", taxonomy="mikels"):
    import emolens

    return emolens.create_model(spec, taxonomy=taxonomy, task=task, backbone=TINY_BACKBONE, backbone_weights=None)


def rated_model(seed: int = 0):
    """A tiny joint model whose valence and arousal vary from image to image."""
    import torch

    torch.manual_seed(seed)
    model = tiny_model("joint:trunk=global,spaces=mikels+affect").eval()
    with torch.no_grad():
        model.heads["affect"].weight.normal_(0, 20.0)  # spread over about -0.5 to 0.6 on noise photos
        model.heads["affect"].bias.zero_()
    return model


def assert_feeds_agree(model, dataset, cache, image_feed: str, cache_feed: str, rows=(0, 3, 5)) -> None:
    """``model``'s logits for some images equal fed as images (``image_feed``) and from ``cache`` (``cache_feed``)."""
    import torch

    from emolens.data.transforms import eval_transform
    from emolens.engine.trainer import run_model
    from emolens.images import load_image

    index = torch.tensor(rows)
    images = torch.stack([eval_transform(model.preprocessing)(load_image(dataset.samples[r].path)) for r in rows])
    with torch.no_grad():
        from_images = run_model(model, {"images": images}, image_feed)["logits"]
        from_cache = run_model(model, cache.batch(index), cache_feed)["logits"]
    torch.testing.assert_close(from_cache, from_images, atol=2e-2, rtol=2e-2)


__all__ = ["TINY_BACKBONE", "assert_feeds_agree", "make_ldl_dataset", "png", "rated_model", "tiny_model", "write_image"]

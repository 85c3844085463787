"""The one place that opens image files: safe decoding to RGB, with one error type."""

from __future__ import annotations

import io
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

register_heif_opener()  # HEIC/HEIF, the iPhone's default, through libheif; AVIF is Pillow's own

#: The file names a folder scan takes (.jfif and .jpe are JPEG, .heic and .hif HEIF); named files are
#: taken whatever their name.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".heic", ".heif", ".hif", ".avif"})

#: The only formats decoded (Pillow's names). Others are refused unread: EPS/PS/PDF hand the file to
#: Ghostscript, which can hang or run the file's code.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
#: What Pillow calls the JPEG files it opens: MPO is a JPEG followed by more JPEGs (a phone's depth map, a
#: camera's preview), opened by the JPEG reader.
JPEG_FORMATS = ("JPEG", "MPO")
ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF"

#: Largest image (in pixels) we decode; a header that declares more is a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageLoadError(Exception):
    """An image could not be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = str(path) if path is not None else "<memory>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, high bit depths rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        lo, hi = arr.min(), arr.max()
        if mode != "F" and lo >= 0 and (mode.startswith("I;16") or 255 < hi <= 65535):
            # 16-bit to 8: round(v / 257) in integers, so a 40-megapixel scan needs no float copies
            wide = arr.astype(np.uint32)
            wide += 128
            wide //= 257
            gray = wide.astype(np.uint8)
        elif mode == "F" and hi <= 1.0 and lo >= 0.0:
            gray = np.rint(arr.astype(np.float32) * 255.0).astype(np.uint8)
        elif hi > 255 or lo < 0:
            scaled = (arr.astype(np.float32) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(arr.shape, np.float32)
            gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        else:
            gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return img.convert("RGB")


def _check_size(size: tuple[int, int], max_pixels: int, path) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageLoadError(path, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageLoadError(path, f"image is too large: {w}x{h} = {w * h:,} pixels > limit {max_pixels:,} (decompression bomb?)")


@contextmanager
def _accepted_image(fp, path):
    """Pillow's ``Image.open`` limited to the accepted formats; every failure, also while the image is
    used, as :class:`ImageLoadError`."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield Image.open(fp, formats=ACCEPTED_FORMATS)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"image is too large (decompression bomb?): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, f"not an image file in an accepted format ({ACCEPTED_NAMES})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(path, f"cannot decode image: {e}") from e


def _draft_jpeg(img: Image.Image, min_side: int) -> None:
    """Let a large JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), its shorter side still at
    least ``min_side``: a 12-megapixel photo then decodes several times faster."""
    w, h = img.size
    scale = min_side / min(w, h)
    if img.format in JPEG_FORMATS and scale <= 0.5:
        img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))


def normalise_image(img: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, path=None,
                    min_side: int | None = None) -> Image.Image:
    """First frame (of an MPO JPEG, the main image), EXIF orientation applied, RGB; the format and size are
    checked before pixels are decoded.
    With ``min_side``, a JPEG may come back smaller, its shorter side no shorter than ``min_side``."""
    if img.format is not None and img.format not in (*ACCEPTED_FORMATS, *JPEG_FORMATS):
        raise ImageLoadError(path, f"{img.format} images are not accepted (only {ACCEPTED_NAMES})")
    _check_size(img.size, max_pixels, path)
    if getattr(img, "is_animated", False):
        img.seek(0)
    if min_side:
        _draft_jpeg(img, min_side)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(path, f"cannot decode image: {e}") from e


def load_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int | None = None) -> Image.Image:
    """Open a file, bytes or PIL image as an RGB image, or raise :class:`ImageLoadError`; ``min_side``: the
    shorter side the caller needs, which lets a large JPEG file decode at a reduced scale."""
    if isinstance(source, Image.Image):
        return normalise_image(source, max_pixels)
    if isinstance(source, (bytes, bytearray)):
        path, data = None, bytes(source)
        if not data:
            raise ImageLoadError(None, "empty file (0 bytes)")
        fp = io.BytesIO(data)
    else:
        path = Path(source)
        try:
            st = path.stat()
        except OSError as e:
            raise ImageLoadError(path, f"cannot access file: {e.strerror or e}") from e
        if not path.is_file():
            raise ImageLoadError(path, "not a regular file")
        if st.st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        try:
            fp = open(path, "rb")
        except OSError as e:
            raise ImageLoadError(path, f"cannot open file: {e.strerror or e}") from e
    with fp, _accepted_image(fp, path) as img:
        return normalise_image(img, max_pixels, path, min_side)


def declared_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The pixel count an image's header declares, read without decoding; raises :class:`ImageLoadError`
    for data that is not an accepted image or declares more than ``max_pixels``."""
    if not data:
        raise ImageLoadError(None, "empty file (0 bytes)")
    with _accepted_image(io.BytesIO(data), None) as img:
        _check_size(img.size, max_pixels, None)
        return img.size[0] * img.size[1]


@dataclass
class ScanResult:
    """Image files found under some paths, the paths that could not be read, and the files a folder scan
    passed over because their names are not image names (each with its reason)."""

    files: list[Path] = field(default_factory=list)
    errors: list[ImageLoadError] = field(default_factory=list)
    skipped: list[ImageLoadError] = field(default_factory=list)


def _walk_images(root: Path, errors: list[ImageLoadError], skipped: list[ImageLoadError]) -> Iterator[Path]:
    def onerror(e: OSError) -> None:
        errors.append(ImageLoadError(e.filename or root, f"cannot read folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                yield p
            else:
                skipped.append(ImageLoadError(p, f"not an image file name ({p.suffix.lower() or 'no extension'}); "
                                                 "name the file itself to read it anyway"))


def scan_images(paths: Iterable[str | os.PathLike]) -> ScanResult:
    """Expand files and folders (recursively, image extensions only) in a stable order.

    A named file is taken whatever its extension; a missing path is reported, not raised.
    """
    result = ScanResult()
    seen: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found: Iterable[Path] = _walk_images(p, result.errors, result.skipped)
        elif p.exists() or p.is_symlink():
            found = [p]
        else:
            result.errors.append(ImageLoadError(p, "no such file or folder"))
            continue
        for f in found:
            if f not in seen:
                seen.add(f)
                result.files.append(f)
    return result

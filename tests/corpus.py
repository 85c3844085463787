"""A corpus of good and bad images, made on the fly (no binaries are committed)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid 1x1 PNG whose header claims ``width x height`` pixels."""
    data = bytearray(_png_bytes(Image.new("RGB", (1, 1))))
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def make_bad_images(folder: Path) -> dict[str, str]:
    """Unusable files: name -> a word the error reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cases = {
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (_jpeg_bytes(photo)[:300], "decode"),
        "truncated.png": (_png_bytes(photo)[:200], "decode"),
        "random.jpg": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        "text.jpg": (b"this is not a picture\n" * 20, "not an image"),
        "page.png": (b"<!doctype html><html><body>hello</body></html>", "not an image"),
        "bomb.png": (bomb_png(), "too large"),
    }
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in cases.items()}


def make_good_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Usable files in awkward modes: name -> the (width, height) the loader must return."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    sizes = {}

    def save(name, img, size=None, **kw):
        img.save(folder / name, **kw)
        sizes[name] = size or img.size

    save("rgb.jpg", Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)))
    save("tiny.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    save("wide.png", Image.new("L", (20000, 20), 128))
    save("gray16.png", Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)))
    save("cmyk.jpg", Image.new("CMYK", (10, 10), (0, 255, 255, 0)))
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    save("palette_transparent.png", pal, transparency=0)
    save("la.png", Image.new("LA", (10, 10), (50, 0)))
    save("rgba.png", Image.new("RGBA", (10, 10), (0, 0, 255, 128)))
    frames = [Image.new("RGB", (12, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", Image.new("RGB", (40, 20), (0, 128, 0)), size=(20, 40), exif=exif.tobytes())
    # a phone photo with a depth map after it (MPO): read as its first frame
    save("phone_depth.jpg", Image.new("RGB", (32, 24), (200, 90, 10)), format="MPO", save_all=True,
         append_images=[Image.new("L", (16, 12), 77).convert("RGB")])
    return sizes


def make_odd_paths(folder: Path) -> dict[str, str]:
    """Files and links that break naive folder scans: name -> a word the error reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    loop = folder / "loop.jpg"
    os.symlink(loop.name, loop)  # points at itself
    os.symlink("does-not-exist.jpg", folder / "dangling.jpg")
    os.symlink(".", folder / "cycle")  # a directory loop: a scan must not recurse forever
    cases = {"loop.jpg": "access", "dangling.jpg": "access"}
    if os.geteuid() != 0:  # root reads any file, so a permission error cannot be made
        locked = folder / "locked.jpg"
        Image.new("RGB", (8, 8)).save(locked)
        locked.chmod(0)
        cases["locked.jpg"] = "access"
    return cases


def make_awkward_names(folder: Path) -> list[str]:
    """Good images whose names are not UTF-8 or are as long as the file system allows; their names
    as Python sees them (undecodable bytes as surrogate escapes)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(folder) + b"/caf\xe9-latin1.png"
    Image.new("RGB", (9, 7), (200, 100, 0)).save(os.fsdecode(raw))
    long = "x" * 246 + ".png"  # 250 bytes; most file systems stop at 255
    Image.new("RGB", (7, 9), (0, 100, 200)).save(folder / long)
    return [os.fsdecode(b"caf\xe9-latin1.png"), long]

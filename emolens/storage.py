"""Where emolens keeps files and how it writes them: atomically, so a reader never sees a part.

Nothing here imports PyTorch, so inference with an exported ONNX model stays light.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable

DEFAULT_MODEL = "default"


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or does not fit the model it is loaded into."""


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the permissions a plain ``open`` would have, then move it over ``path`` in one step."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` beside ``path``, then move the finished file over ``path`` in one step,
    so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def default_weights_path() -> Path:
    return Path(str(resources.files("emolens") / "weights" / "default.safetensors"))


def resolve_weights(source: str | os.PathLike) -> Path:
    """``"default"``, a run folder (its ``best.safetensors``), or a ``.safetensors`` file."""
    if str(source) == DEFAULT_MODEL:
        return default_weights_path()
    p = Path(source)
    if p.is_dir():
        p = p / "best.safetensors"
    p = p.with_suffix(".safetensors")
    if not p.is_file():
        raise CheckpointError(f"{source}: no model weights found (expected a run folder or a .safetensors file)")
    return p


def cache_dir() -> Path:
    """``$EMOLENS_CACHE``, else ``$XDG_CACHE_HOME/emolens``, else ``~/.cache/emolens``."""
    if os.environ.get("EMOLENS_CACHE"):
        return Path(os.environ["EMOLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "emolens"

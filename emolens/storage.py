"""Where emolens keeps files and how it writes them: atomically, so a reader never sees a part.

Nothing here imports PyTorch, so inference with an exported ONNX model stays light.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable

DEFAULT_MODEL = "default"


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or does not fit the model it is loaded into."""


class OutputError(OSError):
    """A path that results cannot be written to (not a regular file, not a folder); the message says why."""


def writable_target(path: str | os.PathLike) -> Path:
    """Where a write to ``path`` lands: a symbolic link's final target (written through, the link stays), or
    ``path``. Only a regular file is replaced: a FIFO, socket, device or folder raises :class:`OutputError`
    before anything is opened (a FIFO would block, a device would be replaced by a file)."""
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: not a regular file ({_file_kind(mode)}); results are written only to "
                          "regular files")
    return target


def output_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder to write into, made if absent; :class:`OutputError` when it is something else."""
    folder = Path(path)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"{folder}: not a folder ({_file_kind(os.lstat(folder).st_mode)})")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a link"),
             (stat.S_ISREG, "a file"))
    return next(name for test, name in kinds if test(mode))


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path) -> None:
    """Make ``tmp`` durable with the permissions a plain ``open`` would give, then move it over ``path`` in
    one step; a full disk shows here at the latest (fsync), before the old file is replaced."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` beside ``path``, then move the finished file over ``path`` in one step,
    so readers see the old file or the new one, never a part. A link is written through to its target;
    anything but a regular file is refused (:func:`writable_target`)."""
    path = writable_target(path)
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

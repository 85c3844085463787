"""ONNX export and ONNX Runtime inference.

A model exported once (``emolens export --onnx``) runs under ONNX Runtime without PyTorch:
about 5x faster than eager PyTorch on a 2-core CPU and a fraction of its memory. The ``.onnx``
file travels with a ``.json`` beside it holding what the model means (taxonomy, preprocessing,
spec, card), like every emolens checkpoint. Nothing here imports PyTorch until it exports.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .identity import ModelIdentity, model_identity, source_digest, spec_name
from .preprocessing import Preprocessing
from .storage import (DEFAULT_MODEL, CheckpointError, atomic_write_bytes, atomic_write_json, cache_dir,
                      default_weights_path, resolve_weights)
from .taxonomy import Taxonomy

if TYPE_CHECKING:
    from .models import EmotionModel

ONNX_OPSET = 18
FORMAT_VERSION = 1
#: Images per ONNX Runtime call: its memory arena grows with the batch while speed does not. The int8 model
#: runs fastest an image at a time (2.8 ms against 3.1 at 8 and 3.7 at 32 here: its activations stay in cache).
RUNTIME_CHUNK = {"fp32": 8, "int8": 1}


class ExportError(Exception):
    """A model could not be exported to ONNX."""


def onnx_meta(model: "EmotionModel", outputs: list[str]) -> dict:
    return {"format": FORMAT_VERSION, "spec": model.spec, "model_id": model_identity(model).digest,
            "taxonomy": model.taxonomy.to_dict(), "preprocessing": model.preprocessing.to_dict(), "outputs": outputs,
            **{k: v for k, v in getattr(model, "meta", {}).items() if k in ("card", "dataset", "metrics")}}


def export_onnx(model: "EmotionModel", path: str | os.PathLike | None = None) -> tuple[bytes, dict]:
    """The model as ONNX bytes (dynamic batch) and its metadata; also written to ``path`` (+ ``.json``)."""
    import torch

    if model.onnx_unsupported:
        raise ExportError(f"{model.spec.get('name', type(model).__name__)}: cannot export to ONNX: {model.onnx_unsupported}")
    model = model.eval()
    size = model.preprocessing.size
    example = torch.zeros(2, 3, size, size)
    with torch.inference_mode():
        sample = model(example)
    # Only per-image tensors are graph outputs; lists of boxes and the like stay PyTorch-only.
    outputs = [k for k, v in sample.items() if isinstance(v, torch.Tensor) and v.shape[:1] == (2,)]

    class TensorOutputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            result = self.inner(images)
            return tuple(result[k] for k in outputs)

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), native_output_discarded():
            # The TorchScript exporter is deprecated in favour of torch.export, which needs onnxscript and
            # is not reliable on the oldest PyTorch we support; it is the one that works everywhere.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(TensorOutputs(model).eval(), (example,), buffer, input_names=["image"],
                              output_names=outputs, dynamic_axes={n: {0: "batch"} for n in ["image", *outputs]},
                              opset_version=ONNX_OPSET, dynamo=False)
    except Exception as e:  # the exporter raises many types; all mean "this graph does not export"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]  # its message holds the whole graph
        raise ExportError(f"{model.spec.get('name', type(model).__name__)}: cannot export to ONNX: {reason}") from e
    data, meta = buffer.getvalue(), onnx_meta(model, outputs)
    if path is not None:  # through a link, to its target, with the metadata beside the target
        path = Path(os.path.realpath(Path(path).with_suffix(".onnx")))
        atomic_write_bytes(path, data)
        atomic_write_json(path.with_suffix(".json"), meta)
    return data, meta


@contextmanager
def native_output_discarded():
    """Silence file descriptors 1 and 2 while native code runs that prints (the ONNX exporter prints the whole
    graph on failure, FAISS's on-disk lists each resize): stdout carries results (``predict --format json``).
    Process-wide, so it never runs while results are printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, sink):
            os.close(fd)


class OnnxModel:
    """An exported model under ONNX Runtime: ``model(images)`` maps a (B, 3, H, W) float32 array to
    a dict of named output arrays, as the PyTorch model does with tensors."""

    def __init__(self, source: str | os.PathLike | bytes, meta: dict | None = None, threads: int | None = None,
                 providers: list | None = None):
        import onnxruntime as ort

        if meta is None:
            if isinstance(source, bytes):
                raise ValueError("ONNX bytes need their metadata")
            meta = read_onnx_meta(source)
        self.meta = meta
        self.card = meta.get("card", {})
        self.taxonomy = Taxonomy.from_dict(meta["taxonomy"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.outputs = list(meta["outputs"])
        digest = meta.get("model_id")
        if digest is None:  # an export made elsewhere: the graph's own bytes identify it
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            digest = "onnx-" + hashlib.sha256(data).hexdigest()
        #: "fp32", or "int8" for a model made by :func:`emolens.quantize.quantize_onnx`.
        self.precision = meta.get("precision", "fp32")
        self.images_per_call = RUNTIME_CHUNK[self.precision]
        name = spec_name(meta.get("spec"))
        self.identity = ModelIdentity(digest, name if self.precision == "fp32" else f"{name}, {self.precision}")
        options = ort.SessionOptions()
        # Unless told how many threads to use, two calls run at once, each on half the CPUs: on 2 cores two
        # single-threaded calls scored 1.16x (fp32) and 1.38x (int8) one call on both (benchmarks/ray_predict.py).
        cpus = os.cpu_count() or 1
        self.lanes = 1 if threads or cpus < 2 else 2
        self._lanes_pool = None
        options.intra_op_num_threads = threads or cpus // self.lanes
        options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
        try:
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
            raise CheckpointError(f"{source if not isinstance(source, bytes) else 'ONNX model'}: "
                                  f"ONNX Runtime cannot load it: {e}") from e

    def _pool(self):
        if self._lanes_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._lanes_pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="emolens-onnx")
        return self._lanes_pool

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        chunk = self.images_per_call
        run = lambda i: self.session.run(self.outputs, {"image": images[i:i + chunk]})  # noqa: E731
        starts = range(0, len(images), chunk)
        if self.lanes > 1 and len(starts) > 1:  # ONNX Runtime sessions take concurrent calls
            parts = list(self._pool().map(run, starts))
        else:
            parts = [run(i) for i in starts]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.outputs)}


def read_onnx_meta(path: str | os.PathLike) -> dict:
    """The metadata beside an exported model (beside a link's target, where `export` writes it)."""
    meta_path = Path(os.path.realpath(path)).with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: ONNX model metadata missing or unreadable ({e})") from e
    missing = [k for k in ("taxonomy", "preprocessing", "outputs") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: metadata lacks {', '.join(missing)}")
    return meta


def packaged_default_onnx() -> Path:
    """The default model's ONNX export, shipped beside its weights (``benchmarks/train_default_model.py``
    writes both; a test holds them to the same outputs and weights identity)."""
    return default_weights_path().parent / "onnx" / "default.onnx"


def packaged_default_int8() -> Path:
    """The default model quantised to int8 (``benchmarks/quantize_default.py``), its gate in its metadata."""
    return packaged_default_onnx().with_name("default.int8.onnx")


PRECISIONS = ("fp32", "int8")


def int8_model_for(source: str | os.PathLike | None, threads: int | None = None) -> tuple[OnnxModel | None, str | None]:
    """``(model, None)``: the int8 version of the saved model ``source`` where it has one that passed its gate;
    else ``(None, why fp32 runs instead)``. The default model's ships with the package; another model's is
    made by ``emolens export --precision int8`` (an ``.onnx`` file runs at the precision it was made in)."""
    source = source or DEFAULT_MODEL
    if str(source).endswith(".onnx"):
        meta = read_onnx_meta(source)
        if meta.get("precision", "fp32") != "int8":
            return None, f"{source} is an fp32 export (make an int8 one with `emolens export --precision int8`)"
        return OnnxModel(source, meta, threads=threads), None
    if str(source) != DEFAULT_MODEL:
        return None, (f"{source} has no int8 version; make one with `emolens export --model {source} --onnx "
                      "FILE.onnx --precision int8 --data KIND=ROOT` and run FILE.onnx")
    path = packaged_default_int8()
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None, "this install has no int8 version of the default model"
    meta = read_onnx_meta(path)
    gate = meta.get("int8_gate") or {}
    if not gate.get("passed"):
        return None, gate.get("reason") or "its int8 gate was never measured"
    return OnnxModel(path, meta, threads=threads), None


def cached_onnx_path(weights: Path) -> Path:
    """Where the export of ``weights`` is cached: keyed by the weights, their metadata, emolens's source
    and the versions that shape the graph, so a changed model, code or library never reuses a stale export."""
    digest = hashlib.sha256()
    for part in (weights, weights.with_suffix(".json")):
        digest.update(part.read_bytes())
    digest.update(f"source={source_digest()};".encode())
    for package in ("emolens", "torch", "timm"):
        digest.update(f"{package}={metadata.version(package)};".encode())
    return cache_dir() / "onnx" / f"{digest.hexdigest()[:24]}.onnx"


def export_pending(source: str | os.PathLike | None) -> bool:
    """Whether running the saved model ``source`` under ONNX Runtime first needs an export (no cached one)."""
    source = source or DEFAULT_MODEL
    if str(source).endswith(".onnx") or str(source) == DEFAULT_MODEL:
        return False
    try:
        cached = cached_onnx_path(resolve_weights(source))
    except CheckpointError:
        return False
    except (OSError, RuntimeError):  # no usable cache: every run exports
        return True
    return not (cached.is_file() and cached.with_suffix(".json").is_file())


def onnx_providers(device: str = "cpu") -> list | None:
    """ONNX Runtime's execution providers for ``device`` (``cpu``, ``cuda:N``): the CUDA provider on GPU N
    where this ONNX Runtime has one (onnxruntime-gpu), then the CPU's; ``None`` where it cannot run there."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    return None


def onnx_model_for(source: str | os.PathLike, threads: int | None = None, providers: list | None = None) -> OnnxModel:
    """The saved model ``source`` (``"default"``, a run folder, ``.safetensors`` or ``.onnx``) under ONNX
    Runtime: the default model's export ships with the package (no PyTorch needed); another saved PyTorch
    model is exported on first use and the export cached."""
    if str(source).endswith(".onnx"):
        return OnnxModel(source, threads=threads, providers=providers)
    if str(source) == DEFAULT_MODEL:
        return OnnxModel(packaged_default_onnx(), threads=threads, providers=providers)
    weights = resolve_weights(source)
    try:
        cached = cached_onnx_path(weights)
        if not (cached.is_file() and cached.with_suffix(".json").is_file()):
            from .weights import load_model

            export_onnx(load_model(weights), cached)
        return OnnxModel(cached, threads=threads, providers=providers)
    except (OSError, RuntimeError) as e:  # no home, a read-only or full cache: the export still serves this run
        from .weights import load_model

        warnings.warn(f"cannot use the ONNX cache ({e}); exporting in memory for this run", stacklevel=2)
        data, meta = export_onnx(load_model(weights))
        return OnnxModel(data, meta, threads=threads, providers=providers)

"""emolens: visual emotion analysis - which emotions an image evokes, where they come from, and images that feel alike.

Names are imported on first use, so a process that only runs an exported ONNX model never loads PyTorch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "EMOTION6": "taxonomy", "MIKELS": "taxonomy", "POLARITY": "taxonomy", "Taxonomy": "taxonomy",
    "get_taxonomy": "taxonomy", "ImageLoadError": "images", "load_image": "images",
    "create_model": "models", "list_models": "models", "Predictor": "predict", "Prediction": "predict",
    "load_model": "weights", "save_model": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'emolens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

"""emolens: visual emotion analysis - which emotions an image evokes, where they come from, and images that feel alike."""

from .images import ImageLoadError, load_image
from .models import create_model, list_models
from .taxonomy import EMOTION6, MIKELS, POLARITY, Taxonomy, get_taxonomy

__version__ = "0.1.0"

__all__ = ["EMOTION6", "MIKELS", "POLARITY", "ImageLoadError", "Taxonomy", "create_model", "get_taxonomy",
           "list_models", "load_image"]

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import v2 as T
import torch

from emolens.preprocessing import Preprocessing

PRE = Preprocessing(size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.875)


def photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


def torchvision_reference(pre, image):
    return T.Compose([T.ToImage(), T.Resize(pre.resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(pre.size), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)])(image)


@pytest.mark.parametrize("size", [(48, 36), (36, 48), (36, 36), (120, 37), (37, 400)])
def test_matches_torchvision_resize_centre_crop_normalise(size):
    image = photo(*size)
    ours = PRE(image)
    assert ours.shape == (3, 32, 32) and ours.dtype == np.float32
    one_grey_level = 1 / 255 / min(PRE.std)  # PIL and torchvision may round an upscaled pixel differently
    np.testing.assert_allclose(ours, torchvision_reference(PRE, image).numpy(), atol=one_grey_level + 1e-5)


def test_converts_any_mode_to_rgb_and_handles_extreme_aspect():
    gray = Image.new("L", (20000, 20), 128)
    out = PRE(gray)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out[0], (128 / 255 - 0.5) / 0.2, atol=1e-5)

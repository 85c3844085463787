"""benchmarks/map_spread.py's figures by hand: how much a map varies over an image."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "map_spread.py"


def load_script():
    spec = importlib.util.spec_from_file_location("map_spread", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constant_one_hot_and_half_maps():
    spread = load_script().spread
    constant = spread(torch.full((2, 4, 4), 0.47))
    assert constant["spatial_std"] == pytest.approx(0) and constant["effective_share"] == pytest.approx(1)
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 1, 2] = 1
    assert spread(one_hot)["effective_share"] == pytest.approx(1 / 16)
    half = torch.zeros(3, 2, 4)  # each image lit on its top half, at its own level
    half[:, 0] = torch.tensor([0.8, 0.4, 0.2]).view(3, 1)
    figures = spread(half)
    assert figures["effective_share"] == pytest.approx(0.5) and figures["min_effective_share"] == pytest.approx(0.5)
    stds = [float(image.std()) for image in half]  # 0.8, 0.4 and 0.2 times the std of eight 0s and 1s
    assert figures["mean"] == pytest.approx((0.8 + 0.4 + 0.2) / 3 / 2) and figures["spatial_std"] == pytest.approx(sum(stds) / 3)

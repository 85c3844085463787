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
    half = torch.zeros(3, 2, 4)
    half[:, 0] = 0.8
    figures = spread(half)
    assert figures["effective_share"] == pytest.approx(0.5) and figures["min_effective_share"] == pytest.approx(0.5)
    assert figures["mean"] == pytest.approx(0.4) and figures["spatial_std"] == pytest.approx(float(half[0].std()))

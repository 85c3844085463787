"""benchmarks/map_spread.py's figures by hand: how much a map varies over an image."""

from __future__ import annotations

import pytest
import torch

from helpers import load_benchmark


def test_constant_one_hot_and_half_maps():
    spread = load_benchmark("map_spread").spread
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


def test_region_scores_spread_within_and_between_images_by_hand():
    spread = load_benchmark("map_spread").region_score_spread
    figures = spread([torch.tensor([0.2, 0.4]), torch.tensor([0.6, 0.6, 0.9])])
    assert figures["mean"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.6 + 0.9) / 5)
    within = (torch.tensor([0.2, 0.4]).std() + torch.tensor([0.6, 0.6, 0.9]).std()) / 2
    assert figures["std_within_image"] == pytest.approx(float(within))
    assert figures["std_between_images"] == pytest.approx(float(torch.tensor([0.3, 0.7]).std()))


def test_zeroing_the_regions_flips_only_the_images_whose_regions_decide():
    from types import SimpleNamespace

    classifier = torch.nn.Linear(3, 2, bias=False)  # one global feature, then two region features
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    model = SimpleNamespace(backbone=SimpleNamespace(num_features=1), classifier=classifier)
    embedding = torch.tensor([[2.0, 0.5, 0.5],    # class 0 with or without its regions
                              [1.0, 1.0, 1.0],    # class 1 from its regions, class 0 without
                              [0.0, 0.0, 0.0]])   # a tie either way: argmax 0 both times
    outputs = {"embedding": embedding, "logits": classifier(embedding)}
    kept = load_benchmark("map_spread").regions_zeroed_agreement(model, outputs)
    assert kept.tolist() == [True, False, True]

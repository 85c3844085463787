"""Tiny datasets of the kinds the recipes name (FI, EmotionROI, Twitter I, and Flickr_LDL with OASIS for the
affective pre-training) and a detector file of torchvision's COCO layout: what the recipe tests run on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import make_ldl_dataset, make_oasis, write_image
from emolens.taxonomy import EMOTIONROI, MIKELS


def make_fi(root: Path, per_class: int = 5) -> str:
    for k, emotion in enumerate(MIKELS.classes):
        for i in range(per_class):
            write_image(root / emotion / f"{i}.jpg", size=(48, 40), seed=10 * k + i)
    return f"fi={root}"


def make_emotionroi(root: Path, per_class: int = 7) -> str:
    for k, emotion in enumerate(EMOTIONROI.classes):
        for i in range(per_class):
            write_image(root / "images" / emotion / f"{i}.jpg", size=(64, 48), seed=10 * k + i)
            stimuli = np.zeros((48, 64), np.uint8)
            stimuli[8:30, 16:50] = 255
            (root / "ground_truth" / emotion).mkdir(parents=True, exist_ok=True)
            Image.fromarray(stimuli).save(root / "ground_truth" / emotion / f"{i}.jpg")
    return f"emotionroi={root}"


def make_twitter1(root: Path, n: int = 40) -> str:
    lines = []
    for i in range(n):
        write_image(root / "images" / f"{i}.jpg", size=(48, 40), seed=i)
        lines.append(f"{i}.jpg {i % 2}")
    (root / "ground_truth").mkdir(parents=True)
    (root / "ground_truth" / "twitter_three_agrees.txt").write_text("\n".join(lines) + "\n")
    return f"twitter1={root}"


MAKERS = {"fi": make_fi, "emotionroi": make_emotionroi, "twitter1": make_twitter1, "flickr_ldl": make_ldl_dataset,
          "oasis": make_oasis}


def data_args(dataset: str, data: dict[str, str]) -> list[str]:
    """``--data`` for each kind of a recipe's dataset (``a+b``: a joint run)."""
    return [arg for kind in dataset.split("+") for arg in ("--data", data[kind])]


def coco_layout_file(path: Path, in_channels: list[int]) -> Path:
    """A detector file in torchvision's COCO Faster R-CNN/FPN layout for a backbone of ``in_channels``."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import FeaturePyramidNetwork

    parts = {"backbone.fpn.": FeaturePyramidNetwork(in_channels, 256), "rpn.head.": RPNHead(256, 3),
             "roi_heads.box_head.": TwoMLPHead(256 * 49, 1024), "roi_heads.box_predictor.": FastRCNNPredictor(1024, 91)}
    torch.save({prefix + k: v for prefix, module in parts.items() for k, v in module.state_dict().items()}, path)
    return path

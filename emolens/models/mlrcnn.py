"""``mlrcnn``: Multi-level Region-based CNN (paper 001).

An FPN over the backbone's C2-C5 gives P2-P5; an RPN with one square anchor size per level proposes
regions; a RoI head (RoIAlign over P2-P5, two FC layers) scores each proposal as an emotional region
(``p_emo``) and refines its box. The emotion score ``S_emo = sqrt(p_emo² + p_obj²)`` (Eq. 3, in
[0, √2]) ranks the refined boxes; after nms the top K are the emotional regions. The classifier sees
the whole image's pooled feature concatenated with the K regions' RoI features in score order
(Eq. 5), zeros where an image has fewer than K regions.

``p_obj``, as paper 001 has it, is the probability that a RoI holds an object by the fixed object classifier
of a COCO-trained Faster R-CNN: with ``detector_weights=FILE`` (torchvision's ``fasterrcnn_resnet50_fpn``
COCO state dict) the FPN, the RPN (its 1:1 anchors), the RoI head and that 91-way classifier start from the file,
the classifier stays fixed and ``p_obj = 1 - P(background)``. Without a file, ``p_obj`` is the RPN's objectness
of the proposal, learnt on emotional regions like ``p_emo``.

Region supervision (``L_det* = L_emo + L_reg``, plus the RPN's own losses):
- ``regions=ground_truth``: boxes from the dataset's stimuli maps (EmotionROI), side feature
  the training target ``region_boxes`` (see :func:`emolens.regions.dataset_region_boxes`);
- ``regions=cam`` (default; no dataset here has region ground truth): weakly supervised pseudo-boxes,
  the largest connected components of the class activation map of a linear head on the global
  feature for the image's true class, recomputed every batch so they follow the CAM as it learns.

``training=two_stage`` (the paper's order): for ``detector_epochs`` the detector (and the CAM head)
learns while the classifier trains on detached features; then the detector is frozen and only the
classifier learns. ``training=joint``: all losses at once, the classifier's gradient reaching the
RoI features and the FPN.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, batched_nms, clip_boxes_to_image

from ..checkpoints import CheckpointError, load_into, read_state_dict
from ..regions import map_boxes
from .base import WEIGHTS_IN_CHECKPOINT, EmotionModel
from .registry import register_model

FEATURES = ("global", "regions", "both")
#: torchvision's COCO detectors: 90 category ids and background (0).
COCO_CLASSES = 91
#: Anchor sizes of torchvision's COCO Faster R-CNN on P2-P5; its 3 aspect ratios (0.5, 1, 2) per size are
#: stored ratio by ratio, so the 1:1 anchor that paper 001 keeps is the middle one.
COCO_ANCHORS, COCO_SQUARE_ANCHOR = (32, 64, 128, 256), 1


def coco_detector_state(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a torchvision COCO Faster R-CNN/FPN state dict that :class:`EmotionalRegionDetector`
    takes, by part, in today's torchvision key names (files from before torchvision 0.13 name the FPN's and
    the RPN's convolutions without the ``.0``/``.0.0`` of ``Conv2dNormActivation``)."""
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}

    def part(prefix: str) -> dict[str, torch.Tensor]:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not found:
            raise CheckpointError(f"{path}: no {prefix}* tensors; detector_weights takes torchvision's "
                                  "fasterrcnn_resnet50_fpn COCO weights")
        return found

    fpn = {re.sub(r"^(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$", r"\1.\2.0.\3", k): v
           for k, v in part("backbone.fpn.").items()}
    rpn = {re.sub(r"^conv\.(weight|bias)$", r"conv.0.0.\1", k): v for k, v in part("rpn.head.").items()}
    anchors = rpn["cls_logits.weight"].shape[0]
    if anchors != 3:
        raise CheckpointError(f"{path}: the RPN has {anchors} anchors per place, torchvision's COCO detector 3")
    a = COCO_SQUARE_ANCHOR
    rpn.update({"cls_logits.weight": rpn["cls_logits.weight"][a:a + 1], "cls_logits.bias": rpn["cls_logits.bias"][a:a + 1],
                "bbox_pred.weight": rpn["bbox_pred.weight"][4 * a:4 * a + 4],
                "bbox_pred.bias": rpn["bbox_pred.bias"][4 * a:4 * a + 4]})
    predictor = part("roi_heads.box_predictor.")
    return {"fpn": fpn, "rpn.head": rpn, "roi.box_head": part("roi_heads.box_head."),
            "object_classifier": {"weight": predictor["cls_score.weight"], "bias": predictor["cls_score.bias"]}}


def emotion_score(p_emo: torch.Tensor, p_obj: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``S_emo = sqrt(p_emo² + p_obj²)``."""
    return torch.sqrt(p_emo.square() + p_obj.square())


def top_regions(boxes: torch.Tensor, scores: torch.Tensor, k: int, iou: float = 0.5,
                image_ids: torch.Tensor | None = None, images: int = 1) -> list[torch.Tensor]:
    """For each of ``images`` images (``image_ids``: each box's image; default: all in one), the indices of its
    ``k`` best-scoring boxes left after nms, best first. One nms over every image's boxes, and one wait for the
    device per call (the counts), not one per image."""
    if image_ids is None:
        image_ids = torch.zeros(len(boxes), dtype=torch.long, device=boxes.device)
    keep = batched_nms(boxes, scores, image_ids, iou)  # survivors in decreasing score order
    ids = image_ids[keep]
    grouped = torch.sort(ids, stable=True).indices  # by image; each image's boxes still best first
    keep, ids = keep[grouped], ids[grouped]
    counts = torch.bincount(ids, minlength=images)
    rank = torch.arange(len(ids), device=ids.device) - (counts.cumsum(0) - counts)[ids]
    chosen = rank < k
    return list(keep[chosen].split(counts.clamp(max=k).tolist()))


class ScoredRPN(RegionProposalNetwork):
    """torchvision's RPN that also returns each proposal's objectness probability."""

    def forward(self, images: ImageList, features: dict[str, torch.Tensor], targets: list[dict] | None = None):
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        losses = {}
        if targets is not None:
            labels, matched = self.assign_targets_to_anchors(anchors, targets)
            regression = self.box_coder.encode(matched, anchors)
            loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, regression)
            losses = {"rpn_objectness": loss_objectness, "rpn_box": loss_box}
        return boxes, scores, losses


class EmotionalRegionDetector(nn.Module):
    """FPN + RPN + RoI head; returns the top-K emotional regions of each image and their features."""

    def __init__(self, in_channels: list[int], channels: int = 256, anchor_sizes: tuple[int, ...] = (32, 64, 128, 256),
                 representation: int = 1024, k: int = 10, proposals: int = 100, nms_iou: float = 0.5,
                 object_classes: int = 0):
        super().__init__()
        if len(anchor_sizes) != len(in_channels):
            raise ValueError(f"one anchor size per level: {len(in_channels)} levels, {len(anchor_sizes)} sizes")
        self.names = [f"p{i + 2}" for i in range(len(in_channels))]
        self.k, self.nms_iou = k, nms_iou
        self.fpn = FeaturePyramidNetwork(in_channels, channels)
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
        self.rpn = ScoredRPN(anchors, RPNHead(channels, 1), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                             batch_size_per_image=256, positive_fraction=0.5,
                             pre_nms_top_n={"training": 1000, "testing": 500},
                             post_nms_top_n={"training": 2 * proposals, "testing": proposals}, nms_thresh=0.7)
        pool = MultiScaleRoIAlign(self.names, output_size=7, sampling_ratio=2)
        self.roi = RoIHeads(pool, TwoMLPHead(channels * 49, representation), FastRCNNPredictor(representation, 2),
                            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=128, positive_fraction=0.25,
                            bbox_reg_weights=None, score_thresh=0.0, nms_thresh=nms_iou, detections_per_img=k)
        self.representation = representation
        # The object classifier is fixed (paper 001): buffers, so no optimiser ever sees it.
        self.object_classifier = ObjectClassifier(representation, object_classes) if object_classes else None

    def load_coco(self, path: str) -> None:
        """Start the FPN, RPN, RoI head and the fixed object classifier from a COCO Faster R-CNN file."""
        for name, state in coco_detector_state(path).items():
            load_into(self.get_submodule(name), state, source=f"{path} ({name})")

    def forward(self, levels: list[torch.Tensor], image_size: tuple[int, int],
                gt_boxes: list[torch.Tensor] | None = None) -> dict:
        features = self.fpn(OrderedDict(zip(self.names, levels)))
        batch = levels[0].shape[0]
        images = ImageList(levels[0].new_empty(batch, 0, *image_size), [image_size] * batch)
        targets = None
        if gt_boxes is not None:
            targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64, device=b.device)} for b in gt_boxes]
        proposals, p_obj, losses = self.rpn(images, features, targets)
        if targets is not None:
            sampled, _, labels, regression = self.roi.select_training_samples([p.detach() for p in proposals], targets)
            logits, deltas, _ = self._score(features, sampled, images.image_sizes)
            loss_emo, loss_box = fastrcnn_loss(logits, deltas, labels, regression)
            losses.update(roi_emotion=loss_emo, roi_box=loss_box)

        logits, deltas, represented = self._score(features, proposals, images.image_sizes)
        p_emo = logits.softmax(-1)[:, 1]
        p_obj = (self.object_classifier.object_probability(represented) if self.object_classifier is not None
                 else torch.cat(list(p_obj)))  # the RPN's objectness comes image by image
        refined = self.roi.box_coder.decode(deltas[:, 4:], proposals)[:, 0]  # the "emotional region" class
        sizes = [len(p) for p in proposals]
        refined = clip_boxes_to_image(refined, image_size)
        score = emotion_score(p_emo, p_obj)
        image_ids = torch.repeat_interleave(torch.arange(batch, device=refined.device),
                                            torch.as_tensor(sizes, device=refined.device))
        chosen = top_regions(refined.detach(), score.detach(), self.k, self.nms_iou, image_ids, batch)
        boxes = [refined[keep].detach() for keep in chosen]
        scores, p_emos, p_objs = ([values[keep] for keep in chosen] for values in (score, p_emo, p_obj))
        pooled = self.roi.box_head(self.roi.box_roi_pool(features, boxes, images.image_sizes))
        local = pooled.new_zeros(batch, self.k, self.representation)
        for i, part in enumerate(pooled.split([len(b) for b in boxes])):
            local[i, : len(part)] = part
        return {"boxes": boxes, "box_scores": scores, "p_emo": p_emos, "p_obj": p_objs, "local": local,
                "losses": losses}

    def _score(self, features, boxes, image_sizes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Emotional-region logits, box deltas and the RoI head's representation of ``boxes``."""
        represented = self.roi.box_head(self.roi.box_roi_pool(features, boxes, image_sizes))
        return (*self.roi.box_predictor(represented), represented)


class ObjectClassifier(nn.Module):
    """A detector's fixed RoI classifier over object classes, class 0 the background."""

    def __init__(self, representation: int, classes: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(classes, representation))
        self.register_buffer("bias", torch.zeros(classes))

    def object_probability(self, represented: torch.Tensor) -> torch.Tensor:
        """``p_obj``: the probability that the RoI holds any object, ``1 - P(background)``."""
        return 1 - F.linear(represented, self.weight, self.bias).softmax(-1)[:, 0]


def cam_pseudo_boxes(cams: torch.Tensor, labels: torch.Tensor, image_size: tuple[int, int], threshold: float = 0.5,
                     max_boxes: int = 3) -> list[torch.Tensor]:
    """Boxes around the largest regions where the class activation map of each image's true class is at
    least ``threshold`` of its maximum; ``cams`` (B, C, h, w) is upsampled to ``image_size`` first.
    An image whose label is unknown (-1) or whose map has no positive value gets no boxes."""
    out = []
    for cam, label in zip(cams.detach(), labels.tolist()):
        if label < 0:
            out.append(cam.new_zeros(0, 4))
            continue
        up = F.interpolate(cam[label][None, None].float(), size=image_size, mode="bilinear", align_corners=False)
        out.append(torch.from_numpy(map_boxes(up[0, 0].cpu().numpy(), threshold, max_boxes)).to(cam.device))
    return out


@register_model("mlrcnn", "FPN + emotional region proposals (S_emo) + global and top-K regional features.",
                paper="001")
class MLRCNN(EmotionModel):
    """Arguments: ``features`` (``global``, ``regions``, ``both``: Table 1's rows), ``k`` regions,
    ``regions`` (``cam`` pseudo-boxes or ``ground_truth`` stimuli boxes), ``training`` (``two_stage`` or
    ``joint``), ``detector_epochs``, ``fpn`` channels, ``representation`` (RoI feature size),
    ``anchors`` (one size per level, ``32+64+128+256``), ``cam_threshold``, ``cam_boxes``, ``object_classes``
    (of the fixed object classifier behind p_obj: 91 with COCO ``detector_weights``, or to take a trained
    detector with ``--init-parts detector``; 0: the RPN's objectness)."""

    feature_keys = ("levels", "pooled", "final")
    weight_file_args = ("detector_weights",)
    onnx_unsupported = "its region selection (nms, a per-image top K) depends on the data; it runs in PyTorch"
    limitations = ("without detector_weights, p_obj is the RPN's objectness, not a COCO detector's; "
                   "without region ground truth the detector learns from class-activation pseudo-boxes.")

    def __init__(self, *args, features: str = "both", k: int = 10, regions: str = "cam", training: str = "two_stage",
                 detector_epochs: int = 5, fpn: int = 256, representation: int = 1024, anchors: str = "32+64+128+256",
                 proposals: int = 100, cam_threshold: float = 0.5, cam_boxes: int = 3, dropout: float = 0.5,
                 detector_weights: str | None = None, object_classes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
        if regions not in ("cam", "ground_truth"):
            raise ValueError(f"regions must be cam or ground_truth, got {regions!r}")
        if training not in ("two_stage", "joint"):
            raise ValueError(f"training must be two_stage or joint, got {training!r}")
        self.features, self.regions, self.training_mode = features, regions, training
        self.detector_epochs = detector_epochs
        self.cam_threshold, self.cam_boxes = cam_threshold, cam_boxes
        self.detector_frozen = False
        sizes = tuple(int(s) for s in str(anchors).split("+"))
        self.detector = None
        if detector_weights and features == "global":
            raise ValueError("detector_weights needs a detector: features=regions or both")
        if detector_weights and sizes != COCO_ANCHORS:
            raise ValueError(f"a COCO detector's anchors are {'+'.join(map(str, COCO_ANCHORS))}, not {anchors}")
        if features != "global":
            if object_classes is None:
                object_classes = COCO_CLASSES if detector_weights else 0
            self.detector = EmotionalRegionDetector(self.backbone.channels, fpn, sizes, representation, k, proposals,
                                                    object_classes=object_classes)
            if detector_weights and detector_weights != WEIGHTS_IN_CHECKPOINT:
                self.detector.load_coco(detector_weights)
        # The CAM head exists only to draw pseudo-boxes; it is trained by its own cross-entropy.
        self.cam_head = nn.Linear(self.backbone.num_features, self.num_classes) if self.detector and regions == "cam" else None
        width = (self.backbone.num_features if features != "regions" else 0) + (k * representation if self.detector else 0)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, self.num_classes)
        if detector_weights:
            self.limitations = "without region ground truth the detector learns from class-activation pseudo-boxes."
        if self.detector is None:
            self.onnx_unsupported = self.limitations = None  # the global row is a plain classifier
            self.feature_keys = ("pooled",)  # so its feature cache holds no levels (EmotionROI's: 3.8 of 3.9 GiB)
        elif regions == "ground_truth":
            self.target_keys = ("region_boxes",)
            self.random_crops = False  # the boxes are in the evaluation crop's frame

    def start_epoch(self, epoch: int) -> None:
        """Two-stage training: freeze the detector once its epochs are over."""
        self.detector_frozen = (self.training_mode == "two_stage" and self.detector is not None
                                and epoch >= self.detector_epochs)
        for module in (self.detector, self.cam_head):
            if module is not None:
                module.requires_grad_(not self.detector_frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.detector_frozen and self.detector is not None:
            self.detector.eval()  # test-time proposal counts, no detector losses
        return self

    def head(self, features: dict) -> dict:
        pooled = features["pooled"]
        out: dict = {}
        parts = [pooled] if self.features != "regions" else []
        if self.detector is not None:
            levels = features["levels"]
            image_size = (levels[0].shape[-2] * self.backbone.strides[0], levels[0].shape[-1] * self.backbone.strides[0])
            targets = features.get("targets") if self.training and not self.detector_frozen else None
            losses = {}
            cams = None
            if self.cam_head is not None:
                cams = torch.einsum("kc,bchw->bkhw", self.cam_head.weight, features["final"]) \
                    + self.cam_head.bias[None, :, None, None]
                out["cam"] = cams
            gt_boxes = None
            if targets is not None:
                if self.regions == "cam":
                    losses["cam"] = F.cross_entropy(self.cam_head(pooled), targets["label"], ignore_index=-1)
                    gt_boxes = cam_pseudo_boxes(cams, targets["label"], image_size, self.cam_threshold, self.cam_boxes)
                else:
                    gt_boxes = [b[~torch.isnan(b).any(-1)] for b in targets["region_boxes"]]
            regions = self.detector(levels, image_size, gt_boxes)
            local = regions.pop("local")
            if self.training_mode == "two_stage":
                local = local.detach()  # the classifier does not train the detector's features
            parts.append(local.flatten(1))
            out.update(regions)
            out["losses"] = {**losses, **regions["losses"]}
        x = torch.cat(parts, 1)
        logits = self.classifier(self.dropout(x))
        out.update(logits=logits, distribution=logits.softmax(-1), embedding=x)
        return out

    def explanation_maps(self, outputs: dict) -> dict[str, torch.Tensor]:
        """The CAM of the predicted class (the source of the pseudo-boxes), when the model has one."""
        if "cam" not in outputs:
            return {}
        top = outputs["logits"].argmax(-1)
        cam = outputs["cam"][torch.arange(len(top), device=top.device), top]
        return {"class activation": cam.clamp_min(0)}

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_image
from helpers import make_ldl_dataset, tiny_model
from emolens import create_model
from emolens.data import load_dataset, make_protocol
from emolens.engine import TrainConfig, fit
from emolens.engine.trainer import feature_cache
from emolens.models.mlrcnn import MLRCNN, cam_pseudo_boxes, emotion_score, top_regions
from emolens.runtime import ExportError, export_onnx
from emolens.taxonomy import EMOTIONROI

SPEC = "mlrcnn:fpn=16,representation=32,k=4,proposals=20"


def inputs(model, n=2):
    size = model.preprocessing.size
    return torch.randn(n, 3, size, size)


def labels(*values):
    return {"targets": {"label": torch.tensor(values)}}


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_shapes_and_boxes_inside_the_image(backbone):
    model = create_model(SPEC, backbone=backbone, backbone_weights=None).eval()
    assert isinstance(model, MLRCNN)
    x = inputs(model, 3)
    with torch.no_grad():
        out = model(x)
    size = model.preprocessing.size
    assert out["logits"].shape == (3, 8)
    assert out["embedding"].shape == (3, model.backbone.num_features + 4 * 32)  # Eq. 5: [global, 4 regions]
    assert len(out["boxes"]) == len(out["box_scores"]) == 3
    for boxes, scores in zip(out["boxes"], out["box_scores"]):
        assert boxes.shape[1] == 4 and 1 <= len(boxes) <= 4 and len(scores) == len(boxes)
        assert float(boxes.min()) >= 0 and float(boxes.max()) <= size
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def test_emotion_score_is_eq_3_and_regions_come_best_first():
    assert float(emotion_score(torch.tensor(0.6), torch.tensor(0.8))) == pytest.approx(1.0)
    model = tiny_model(SPEC).eval()
    with torch.no_grad():
        out = model(inputs(model))
    for scores, p_emo, p_obj in zip(out["box_scores"], out["p_emo"], out["p_obj"]):
        assert torch.allclose(scores, torch.sqrt(p_emo**2 + p_obj**2))
        assert (scores[:-1] >= scores[1:]).all()


def test_top_regions_suppress_overlaps_and_keep_k():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1])
    assert [t.tolist() for t in top_regions(boxes, scores, k=10)] == [[1, 2, 3]]  # box 0 overlaps the better box 1
    assert [t.tolist() for t in top_regions(boxes, scores, k=2)] == [[1, 2]]


def test_top_regions_of_a_batch_equal_each_images_own():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(60, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + 5 + torch.rand(60, 2, generator=generator) * 20], 1)
    scores = torch.rand(60, generator=generator)
    image_ids = torch.tensor([0] * 25 + [2] * 35)  # image 1 has no box
    together = top_regions(boxes, scores, 4, 0.3, image_ids, images=3)
    assert len(together) == 3 and together[1].numel() == 0
    for image, chosen in enumerate(together):
        own = (image_ids == image).nonzero().flatten()
        alone = [own[i] for i in top_regions(boxes[own], scores[own], 4, 0.3)[0]] if len(own) else []
        assert chosen.tolist() == [int(i) for i in alone]


def test_cam_pseudo_boxes_find_a_known_blob():
    cams = torch.zeros(2, 3, 8, 8)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    cams[0, 2] = torch.exp(-((yy - 2) ** 2 + (xx - 5) ** 2) / 2)  # a blob centred at row 2, column 5
    cams[0, 0] = torch.exp(-((yy - 6) ** 2 + (xx - 1) ** 2) / 2)  # another class's blob elsewhere
    cams[1, 1] = 1.0
    boxes = cam_pseudo_boxes(cams, torch.tensor([2, -1]), (64, 64), threshold=0.5)
    (box,) = boxes[0].tolist()
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    # cell (row 2, column 5) of an 8x8 map over 64 px is centred at (44, 20)
    assert abs(cx - 44) <= 4 and abs(cy - 20) <= 4 and 8 <= box[2] - box[0] <= 32
    assert boxes[1].shape == (0, 4)  # no label (ambiguous polarity): no boxes


@pytest.mark.parametrize("training", ["joint", "two_stage"])
def test_gradients_reach_every_trainable_parameter(training):
    model = tiny_model(SPEC + f",training={training}").train()
    model.start_epoch(0)
    out = model(inputs(model, 3), extras=labels(0, 3, 5))
    assert set(out["losses"]) == {"cam", "rpn_objectness", "rpn_box", "roi_emotion", "roi_box"}
    (out["logits"].logsumexp(-1).sum() + sum(out["losses"].values())).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_two_stage_freezes_the_detector_after_its_epochs():
    model = tiny_model(SPEC + ",detector_epochs=2").train()
    model.start_epoch(2)
    model.train()
    assert not model.detector.training and model.classifier.training
    assert not any(p.requires_grad for p in model.detector.parameters())
    out = model(inputs(model), extras=labels(0, 1))
    assert out["losses"] == {}
    out["logits"].sum().backward()
    assert model.classifier.weight.grad is not None
    model.start_epoch(0)  # a resumed run that starts over in stage one
    assert all(p.requires_grad for p in model.detector.parameters()) and model.detector.training


def test_table_1_rows():
    global_only = tiny_model("mlrcnn:features=global").eval()
    regions_only = tiny_model(SPEC + ",features=regions").eval()
    assert global_only.detector is None and global_only.onnx_unsupported is None
    with torch.no_grad():
        assert "boxes" not in global_only(inputs(global_only))
        assert regions_only(inputs(regions_only))["embedding"].shape == (2, 4 * 32)
    with pytest.raises(ValueError, match="features"):
        tiny_model("mlrcnn:features=local")


def test_the_global_row_shares_global_s_feature_cache_which_holds_no_levels(tmp_path):
    ds = load_dataset(make_ldl_dataset(tmp_path / "data", per_class=2, size=(48, 40)))
    config = TrainConfig(freeze_backbone=True, cache_views=0, workers=0)
    caches = {}
    for spec in ("global", "mlrcnn:features=global", SPEC):
        torch.manual_seed(0)  # one backbone's weights for all three
        caches[spec] = feature_cache(tiny_model(spec), ds, tmp_path / "cache", config, progress=False)
    assert set(caches["mlrcnn:features=global"].features) == {"pooled"}
    assert "levels" in caches[SPEC].features
    assert len(list((tmp_path / "cache").glob("features-*"))) == 2  # global's, shared, and the region row's


def test_export_is_refused_with_the_reason():
    with pytest.raises(ExportError, match="region selection"):
        export_onnx(tiny_model(SPEC))


def test_fit_with_cam_pseudo_boxes_on_frozen_features(tmp_path):
    ds = load_dataset(make_ldl_dataset(tmp_path / "data", per_class=5, size=(48, 40)))
    fold = make_protocol(ds, "split", seed=0, fractions=(0.6, 0.2, 0.2)).folds[0]
    model = tiny_model(SPEC + ",detector_epochs=1")
    config = TrainConfig(epochs=2, batch_size=8, workers=0, optimizer="adamw", lr=1e-3, freeze_backbone=True)
    result = fit(model, ds, fold, tmp_path / "run", config, progress=False)
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    assert not any(p.requires_grad for p in model.detector.parameters())  # stage two ran


def test_fit_with_ground_truth_regions(tmp_path):
    rng = np.random.default_rng(0)
    for emotion in EMOTIONROI.classes:
        for i in range(3):
            write_image(tmp_path / "images" / emotion / f"{i}.jpg", seed=int(rng.integers(1000)), size=(64, 48))
            stimuli = np.zeros((48, 64), np.uint8)
            stimuli[10:30, 20:50] = 255
            (tmp_path / "ground_truth" / emotion).mkdir(parents=True, exist_ok=True)
            Image.fromarray(stimuli).save(tmp_path / "ground_truth" / emotion / f"{i}.jpg")
    ds = load_dataset(f"emotionroi={tmp_path}")
    fold = make_protocol(ds, "split", seed=0, fractions=(0.6, 0.2, 0.2)).folds[0]
    model = tiny_model(SPEC + ",regions=ground_truth,training=joint", taxonomy=EMOTIONROI)
    assert model.target_keys == ("region_boxes",) and model.cam_head is None
    config = TrainConfig(epochs=1, batch_size=6, workers=0, optimizer="adamw", lr=1e-3)
    result = fit(model, ds, fold, tmp_path / "run", config, progress=False)
    assert np.isfinite(result.history[0]["train_loss"])


def test_saved_weights_carry_the_limitations_in_their_card(tmp_path):
    import json

    from emolens.weights import save_model

    save_model(tiny_model(SPEC), tmp_path / "m.safetensors")
    card = json.loads((tmp_path / "m.json").read_text())["card"]
    assert "COCO" in card["limitations"] and "pseudo-boxes" in card["limitations"]


def test_the_detector_alone_moves_to_a_model_with_another_classifier(tmp_path):
    from emolens.checkpoints import CheckpointError
    from emolens.weights import init_from, save_model

    source = tiny_model(SPEC)
    save_model(source, tmp_path / "det.safetensors")
    target = tiny_model(SPEC + ",features=regions,loss=label_prob")
    with pytest.raises(CheckpointError):  # the classifiers differ: a whole-model init is refused
        init_from(target, tmp_path / "det.safetensors")
    before = target.classifier.weight.clone()
    init_from(target, tmp_path / "det.safetensors", parts=["detector", "cam_head"])
    for name, tensor in source.detector.state_dict().items():
        assert torch.equal(tensor, target.detector.state_dict()[name]), name
    assert torch.equal(target.classifier.weight, before)
    with pytest.raises(ValueError, match="no part"):
        init_from(target, tmp_path / "det.safetensors", parts=["decoder"])


def test_benchmark_takes_each_folds_own_source(tmp_path):
    from emolens.engine.benchmark import run_benchmark

    ds = load_dataset(make_ldl_dataset(tmp_path / "ds", per_class=4))
    common = dict(task="emotion", folds=2, backbone="test_efficientnet", backbone_weights=None, progress=False,
                  log=lambda *_: None, timing_images=2)
    config = TrainConfig(epochs=1, batch_size=8, freeze_backbone=True, workers=0)
    run_benchmark(ds, [SPEC], out_dir=tmp_path / "det", config=config, **common)
    source = str(tmp_path / "det" / SPEC.replace(":", "_").replace(",", "_") / "fold{fold}")
    second = TrainConfig(epochs=1, batch_size=8, freeze_backbone=True, workers=0, lr=0.0, init=source,
                         init_parts=("detector",))
    run_benchmark(ds, [SPEC + ",features=regions,detector_epochs=0"], out_dir=tmp_path / "cls", config=second,
                  **common)
    import json

    for k in range(2):
        meta = json.loads((tmp_path / "cls" / (SPEC + ",features=regions,detector_epochs=0").replace(":", "_")
                           .replace(",", "_") / f"fold{k}" / "best.json").read_text())
        assert meta["train_config"]["init"] == source.format(fold=k)
        from safetensors.torch import load_file

        own = load_file(tmp_path / "cls" / (SPEC + ",features=regions,detector_epochs=0").replace(":", "_")
                        .replace(",", "_") / f"fold{k}" / "best.safetensors")
        theirs = load_file(source.format(fold=k) + "/best.safetensors")
        detector = [n for n in own if n.startswith("detector.")]
        assert detector and all(torch.equal(own[n], theirs[n]) for n in detector)  # frozen: unchanged


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """A torchvision COCO Faster R-CNN/FPN state dict (random numbers) with pre-0.13 key names, as in the
    usual ``fasterrcnn_resnet50_fpn_coco-*.pth``, and the detector itself."""
    import re

    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    old = {re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", k)
           .replace("rpn.head.conv.0.0.", "rpn.head.conv."): v for k, v in detector.state_dict().items()
           if not k.endswith("num_batches_tracked")}  # detection files freeze BatchNorm and keep no counts
    path = tmp_path_factory.mktemp("coco") / "fasterrcnn_resnet50_fpn_coco.pth"
    torch.save(old, path)
    return path, detector


def test_coco_detector_weights_give_p_obj_from_the_fixed_object_classifier(coco_file, tmp_path):
    path, coco = coco_file
    model = create_model(f"mlrcnn:k=3,proposals=20,detector_weights={path}", backbone="resnet50",
                         backbone_weights=str(path)).eval()
    detector = model.detector
    torch.testing.assert_close(model.backbone.net.conv1.weight, coco.backbone.body.conv1.weight)
    torch.testing.assert_close(detector.fpn.layer_blocks[2][0].weight, coco.backbone.fpn.layer_blocks[2][0].weight)
    torch.testing.assert_close(detector.rpn.head.cls_logits.weight, coco.rpn.head.cls_logits.weight[1:2])  # 1:1 anchor
    torch.testing.assert_close(detector.rpn.head.bbox_pred.bias, coco.rpn.head.bbox_pred.bias[4:8])
    assert not any("object_classifier" in name for name, _ in model.named_parameters())  # fixed, as in the paper

    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        out = model(x)
        features = coco.backbone(x)
        represented = coco.roi_heads.box_head(coco.roi_heads.box_roi_pool(features, out["boxes"], [(128, 160)]))
        expected = 1 - coco.roi_heads.box_predictor(represented)[0].softmax(-1)[:, 0]
    torch.testing.assert_close(out["p_obj"][0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["box_scores"][0], emotion_score(out["p_emo"][0], expected), rtol=1e-4, atol=1e-5)

    from emolens.weights import load_model, save_model

    save_model(model, tmp_path / "m.safetensors")
    path.rename(path.with_suffix(".moved"))  # a saved model needs the detector file no more
    try:
        with torch.no_grad():
            again = load_model(tmp_path / "m.safetensors")(x)
    finally:
        path.with_suffix(".moved").rename(path)
    torch.testing.assert_close(again["p_obj"][0], out["p_obj"][0])


def test_detector_weights_that_are_no_coco_detector_are_refused(tmp_path):
    from emolens.checkpoints import CheckpointError

    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="fasterrcnn_resnet50_fpn"):
        create_model(f"mlrcnn:detector_weights={tmp_path / 'resnet.pth'}", backbone="test_resnet", backbone_weights=None)
    with pytest.raises(ValueError, match="anchors"):
        create_model(f"mlrcnn:anchors=16+32+64+128,detector_weights={tmp_path / 'resnet.pth'}", backbone="test_resnet",
                     backbone_weights=None)

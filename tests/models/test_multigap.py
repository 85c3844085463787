import numpy as np
import pytest
import torch

from helpers import TINY_BACKBONE, make_ldl_dataset, tiny_model
from emolens import create_model
from emolens.data import load_dataset
from emolens.data.samples import LabelFileError
from emolens.models.multigap import MultiGap, TimestepAttention


def inputs(model, n=2):
    size = model.preprocessing.size
    return torch.randn(n, 3, size, size)


def test_one_mg_feature_of_64_per_block_and_stream():
    model = tiny_model("multigap:streams=test_resnet").eval()
    assert isinstance(model, MultiGap)
    features = model.backbone(inputs(model))
    # test_efficientnet and test_resnet both have 5 blocks (strides 2..32)
    assert [len(c) for c in model.backbone.block_channels] == [5, 5]
    assert [m.shape for m in features["block_means"]] == [(2, c) for cs in model.backbone.block_channels for c in cs]
    mg = torch.stack([torch.nn.functional.linear(m, conv.weight.flatten(1), conv.bias)
                      for conv, m in zip(model.mg[0].reduce, features["block_means"][:5])], 1)
    assert mg.shape == (2, 5, 64)


@pytest.mark.parametrize("spec", ["multigap", "multigap:streams=test_resnet,depth=3"])
def test_the_model_computes_eq1_on_the_block_maps(spec):
    """The model's logits from MG_i = GAP(conv1x1(C_i)) written literally on each block map C_i of each
    stream, then the bottleneck and the early-fusion classifier."""
    model = tiny_model(spec).eval()
    x = inputs(model)
    with torch.no_grad():
        got = model(x)["logits"]
        blocks = model.backbone(x)["blocks"]
        per_stream = [blocks[s] for s in model.block_slices]
        parts = []
        for stream, maps in zip(model.mg, per_stream):
            mg = torch.stack([conv(c).mean((2, 3)) for conv, c in zip(stream.reduce, maps)], 1)  # Eq. 1
            parts.append(stream.bottleneck(mg.flatten(1)))
        want = model.classifier(torch.cat(parts, 1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bigru_attention_shape_and_range():
    att = TimestepAttention(steps=5, dim=6)
    with torch.no_grad():
        att.weight.mul_(3)
        a = att(torch.randn(3, 5, 6))
    assert a.shape == (3, 5, 6) and float(a.min()) >= 0 and float(a.max()) < 1
    model = tiny_model("multigap:gru=8,streams=test_resnet").eval()
    out = model(inputs(model))
    assert out["block_attention"].shape == (2, 2, 5)
    assert model.mg[0].gru.hidden_size == 8 and model.mg[0].gru.bidirectional


def test_early_and_late_fusion_outputs():
    torch.manual_seed(0)
    early = tiny_model("multigap:streams=test_resnet,fusion=early").eval()
    late = tiny_model("multigap:streams=test_resnet,fusion=late").eval()
    x = inputs(early)
    e, l_ = early(x), late(x)
    assert e["logits"].shape == l_["logits"].shape == (2, 8) and "member_logits" not in e
    members = l_["member_logits"]
    assert len(members) == 2
    mean_softmax = torch.stack([m.softmax(-1) for m in members]).mean(0)
    torch.testing.assert_close(l_["distribution"], mean_softmax)
    torch.testing.assert_close(l_["logits"].softmax(-1), mean_softmax, rtol=1e-5, atol=1e-6)
    assert early.classifier.in_features == 2 * 512


def test_depth_truncates_every_stream_and_is_checked():
    model = tiny_model("multigap:depth=3,streams=test_resnet")
    assert [len(s.reduce) for s in model.mg] == [3, 3]
    with pytest.raises(ValueError, match="depth"):
        tiny_model("multigap:depth=9")


def test_gradients_reach_every_trainable_parameter():
    model = tiny_model("multigap:gru=8,streams=test_resnet,fusion=late,anp=4")
    model.train()
    out = model(inputs(model, 4), extras={"anp": torch.randn(4, 4)})
    torch.stack([m.logsumexp(-1) for m in out["member_logits"]]).sum().backward()
    # timm zero-initialises each residual branch's last BN, so some backbone gradients are exactly 0
    # at init; every parameter must still be in the graph, and every own layer must move.
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    own = [n for n, p in model.named_parameters() if not n.startswith("backbone.") and not p.grad.abs().sum()]
    assert not own


def test_anp_model_needs_its_side_features():
    model = tiny_model("multigap:anp=4").eval()
    with pytest.raises(ValueError, match="side features"):
        model(inputs(model))
    assert model(inputs(model), extras={"anp": torch.randn(2, 4)})["embedding"].shape == (2, 512 + 4)


def test_anp_file_readers(tmp_path):
    spec = make_ldl_dataset(tmp_path / "d", per_class=2)
    n = len(load_dataset(spec))
    np.save(tmp_path / "d" / "anp.npy", np.ones((n, 5)))
    ds = load_dataset(spec + ":anp=anp.npy")
    assert ds.extras["anp"].shape == (n, 5)
    np.save(tmp_path / "d" / "short.npy", np.ones((n - 1, 5)))
    with pytest.raises(LabelFileError, match=f"{n - 1} rows for a dataset of {n}"):
        load_dataset(spec + ":anp=short.npy")
    rows = [f"images/{s.path.name}," + ",".join(["0.5"] * 3) for s in reversed(ds.samples)]
    (tmp_path / "d" / "anp.csv").write_text("\n".join(rows) + "\n")
    by_name = load_dataset(spec + f":anp={tmp_path / 'd' / 'anp.csv'}")
    assert by_name.extras["anp"].shape == (n, 3)
    (tmp_path / "d" / "bad.csv").write_text(rows[0] + "\n" + rows[1] + ",1\n")
    with pytest.raises(LabelFileError, match=r"bad.csv:2: 4 values where the first row had 3"):
        load_dataset(spec + ":anp=bad.csv")
    (tmp_path / "d" / "few.csv").write_text(rows[0] + "\n")
    with pytest.raises(LabelFileError, match=f"no row for {n - 1} sample"):
        load_dataset(spec + ":anp=few.csv")


def test_trains_on_a_frozen_cache_with_anp_features(tmp_path):
    from emolens.data import make_protocol
    from emolens.engine import TrainConfig, fit

    spec = make_ldl_dataset(tmp_path / "d", per_class=4)
    n = len(load_dataset(spec))
    np.save(tmp_path / "d" / "anp.npy", np.random.default_rng(0).normal(size=(n, 6)))
    ds = load_dataset(spec + ":anp=anp.npy")
    fold = make_protocol(ds, "split", seed=0).folds[0]
    model = tiny_model("multigap:gru=4,anp=6,fusion=late,streams=test_resnet")
    result = fit(model, ds, fold, tmp_path / "run", TrainConfig(epochs=2, batch_size=8, freeze_backbone=True, workers=0),
                 progress=False)
    assert result.best_epoch >= 1 and np.isfinite(result.best_score)
    assert TINY_BACKBONE in model.backbone.name


def test_a_caffe_stream_sees_bgr_in_0_255_minus_its_mean():
    model = create_model("multigap:streams=test_resnet,stream_input=bgr255,stream_mean=100+110+120",
                         backbone=TINY_BACKBONE, backbone_weights=None).eval()
    places = model.backbone.streams[1]
    seen = []
    places.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    size = model.preprocessing.size
    rgb = torch.rand(1, 3, size, size)  # the image in [0, 1]
    p = model.preprocessing
    normalised = (rgb - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
    with torch.no_grad():
        model(normalised)
    target = places.preprocessing.size
    resized = torch.nn.functional.interpolate(rgb, size=(target, target), mode="bilinear", antialias=True,
                                              align_corners=False) if target != size else rgb
    expected = 255 * resized.flip(1) - torch.tensor([100.0, 110.0, 120.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], expected, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="B\\+G\\+R"):
        create_model("multigap:streams=test_resnet,stream_input=bgr255", backbone=TINY_BACKBONE, backbone_weights=None)

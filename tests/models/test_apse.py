import math

import numpy as np
import pytest
import torch

from helpers import tiny_model
from emolens.engine.data import class_balanced_batches
from emolens.losses import build_loss, anchor_positive_tuples
from emolens.models.apse import AttentionModule, CrossLevelBilinear
from emolens.taxonomy import MIKELS, Taxonomy


def inputs(model, n=8):
    size = model.preprocessing.size
    return torch.randn(n, 3, size, size)


def unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_hierarchical_attention_outputs_and_embedding():
    model = tiny_model("apse").eval()
    with torch.no_grad():
        out = model(inputs(model, 3))
    assert out["polarity_confidence"].shape == (3, 2) and out["emotion_confidence"].shape == (3, 8)
    torch.testing.assert_close(out["emotion_confidence"].sum(1), torch.ones(3))
    assert out["embedding"].shape == (3, 512)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    for key in ("polarity_attention", "emotion_attention"):
        assert float(out[key].min()) >= 0 and float(out[key].max()) <= 1
    torch.testing.assert_close(out["logits"].softmax(-1), out["emotion_confidence"])


def test_attention_module_by_hand():
    module = AttentionModule(channels=2, classes=2)
    with torch.no_grad():
        module.class_maps.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        module.class_maps.bias.zero_()
        module.log_temperature.fill_(math.log(3.0))
    f = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # channel mean A = [1, 0]
    weighted, confidence, u = module(f)
    z = torch.softmax(torch.tensor([3.0, 0.0]), 0) * 2  # spatial softmax of A x temperature, scaled by h·w
    attended = f * z.view(1, 1, 1, 2)
    torch.testing.assert_close(confidence, torch.softmax(attended.mean((2, 3)), 1))
    torch.testing.assert_close(u, torch.tensor([[[1.0, 0.0]]]))  # min-max normalised
    torch.testing.assert_close(weighted, attended * u[:, None])


def test_cross_level_bilinear_by_hand():
    module = CrossLevelBilinear(low_channels=1, high_channels=2, rank=2)
    with torch.no_grad():
        module.low.weight.copy_(torch.ones(2, 1, 1, 1))
        module.high.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    low = torch.tensor([[[[1.0, 3.0], [1.0, 3.0]]]])  # pooled to 1x1: 2
    high = torch.tensor([[[[4.0]], [[-9.0]]]])
    out = module(low, high)
    expected = torch.tensor([math.sqrt(8.0), -math.sqrt(18.0)])  # rank-2 products 2·4 and 2·(-9), signed roots
    torch.testing.assert_close(out[0], expected / expected.norm())


def test_the_compacted_model_is_small_and_fp16_safe():
    model = tiny_model("apse")
    low = torch.zeros(2, 4, 8, 8, dtype=torch.float16, requires_grad=True)
    high = torch.zeros(2, 6, 2, 2, dtype=torch.float16, requires_grad=True)
    out = CrossLevelBilinear(4, 6, 16).half()(low, high)
    out.sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(low.grad).all() and torch.isfinite(high.grad).all()
    rank, dim = 2048, 512
    low_c, high_c = model.backbone.channels
    assert sum(p.numel() for p in model.cross_level.parameters()) == rank * (low_c + high_c)
    assert model.embed.weight.shape == (dim, rank)


def test_variants_and_polarity_from_the_taxonomy():
    assert "polarity_confidence" not in tiny_model("apse:attention=single").eval()(inputs(tiny_model("apse"), 2))
    plain = tiny_model("apse:attention=none").eval()
    out = plain(inputs(plain, 2))
    assert "probe_logits" in out and "emotion_confidence" not in out
    # a taxonomy listing negative classes first: the loss must take polarity from it, not from the order
    flipped = Taxonomy("flipped", ["sad", "angry", "happy", "calm"], [0, 0, 1, 1])
    loss = build_loss("ep", flipped)
    assert loss.loss.class_polarity.tolist() == [0, 0, 1, 1]


def test_npair_loss_by_hand():
    emb = unit([1, 0], [0, 1], [1, 0.2], [0.1, 1])  # labels 0, 1, 0, 1: pairs (0, 2) and (1, 3)
    labels = torch.tensor([0, 1, 0, 1])
    loss = build_loss("npair", MIKELS, scale=1.0).loss
    got = loss.metric({"embedding": emb}, labels)
    s = emb[[0, 1]] @ emb[[2, 3]].T
    expected = np.mean([math.log1p(math.exp(s[0, 1] - s[0, 0])), math.log1p(math.exp(s[1, 0] - s[1, 1]))])
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_ep_and_wep_by_hand():
    # classes 0 (amusement, +), 1 (awe, +), 4 (anger, -): one pair each
    emb = unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0.1, 0], [0.1, 1, 0], [0, 0.1, 1])
    labels = torch.tensor([0, 1, 4, 0, 1, 4])
    s = (emb[:3] @ emb[3:].T).numpy()
    ep = build_loss("ep", MIKELS, scale=1.0).loss
    inter = [math.log1p(math.exp(s[0, 2] - s[0, 1])), math.log1p(math.exp(s[1, 2] - s[1, 0])),
             math.log1p(math.exp(np.mean([s[2, 0], s[2, 1]]) - s[2, 2]))]  # anger has no same-polarity partner
    intra = [math.log1p(math.exp(s[0, 1] - s[0, 0])), math.log1p(math.exp(s[1, 0] - s[1, 1])), 0.0]
    assert float(ep.metric({"embedding": emb}, labels)) == pytest.approx(np.mean(np.add(inter, intra)), rel=1e-5)
    conf = torch.full((6, 8), 1 / 8)
    pconf = torch.tensor([[0.2, 0.8]] * 6)
    wep = build_loss("wep", MIKELS, scale=1.0).loss
    out = {"embedding": emb, "emotion_confidence": conf, "polarity_confidence": pconf}
    v_e = math.exp(1 / 8) ** 2
    v = np.full((3, 3), v_e)
    # polarity weights only across polarities: anchor's confidence in the other's polarity times the reverse
    v[0, 2] = v[1, 2] = v_e * math.exp(0.2) * math.exp(0.8)
    v[2, 0] = v[2, 1] = v_e * math.exp(0.8) * math.exp(0.2)
    np.fill_diagonal(v, 1)
    w = v * s
    inter = [math.log1p(math.exp(w[0, 2] - w[0, 1])), math.log1p(math.exp(w[1, 2] - w[1, 0])),
             math.log1p(math.exp(np.mean([w[2, 0], w[2, 1]]) - s[2, 2]))]
    intra = [math.log1p(math.exp(w[0, 1] - s[0, 0])), math.log1p(math.exp(w[1, 0] - s[1, 1])), 0.0]
    assert float(wep.metric(out, labels)) == pytest.approx(np.mean(np.add(inter, intra)), rel=1e-5)


def test_contrastive_and_triplet_by_hand():
    emb = unit([1, 0], [0.8, 0.6], [0, 1])
    labels = torch.tensor([0, 0, 1])
    d = torch.cdist(emb, emb)
    contrastive = build_loss("contrastive", MIKELS, margin=1.2).loss.metric({"embedding": emb}, labels)
    neg = [max(0, 1.2 - float(d[i, j])) ** 2 for i, j in [(0, 2), (1, 2), (2, 0), (2, 1)]]
    assert float(contrastive) == pytest.approx(float(d[0, 1]) ** 2 + np.mean(neg), rel=1e-5)
    triplet = build_loss("triplet", MIKELS, margin=0.5).loss.metric({"embedding": emb}, labels)
    d2 = d.square()
    # (0, 1): d2_ap 0.4, the only negative (2) at 2.0 is semi-hard-free (> 0.4 + 0.5): loss 0
    # (1, 0): negative 2 at 0.8 lies within (0.4, 0.9): loss 0.4 - 0.8 + 0.5 = 0.1
    expected = np.mean([max(0, float(d2[0, 1] - d2[0, 2]) + 0.5), max(0, float(d2[1, 0] - d2[1, 2]) + 0.5)])
    assert float(triplet) == pytest.approx(expected, rel=1e-5)


def test_gradients_flow_through_wep_and_attention():
    model = tiny_model("apse").train()
    out = model(inputs(model, 8))
    loss = build_loss("wep", MIKELS)(out, {"label": torch.tensor([0, 0, 1, 1, 4, 4, 5, 5])})
    loss.backward()
    own = [n for n, p in model.named_parameters() if not n.startswith("backbone.") and (p.grad is None or not p.grad.abs().sum())]
    assert not own and torch.isfinite(loss)


def test_class_balanced_batches_any_size():
    labels = np.array([0] * 30 + [1] * 3 + [2] * 10 + [3] * 1)
    rows = list(range(len(labels)))
    for batch_size in (4, 6, 12, 33):
        batches = class_balanced_batches(rows, labels, batch_size, seed=0)
        for b in batches:
            counts = np.bincount(labels[b], minlength=4)
            present = counts[counts > 0]
            assert len(b) <= max(batch_size, 4) and len(set(present)) == 1 and present[0] >= 2
        assert sum(len(b) for b in batches) >= len(rows)
    assert class_balanced_batches(rows, labels, 12, seed=1) == class_balanced_batches(rows, labels, 12, seed=1)
    tuples = anchor_positive_tuples(torch.tensor([3, 3, 1, 1, 3, 3]))
    assert [len(a) for a, _ in tuples] == [2]  # the second pair of class 3 has no partner class


@pytest.mark.shared_data
def test_attention_spreads_over_real_photos_and_embeddings_differ(shared_data):
    """On ImageNet features of Emotion6 photos, neither attention map is one-hot: its effective number of
    positions (exp of the entropy of Z) is at least 5% of the map, and no two photos share an embedding."""
    import emolens
    from PIL import Image

    from emolens.data.transforms import eval_transform

    paths = sorted((shared_data / "emotion6" / "images").rglob("*.jpg"))[::60][:24]
    model = emolens.create_model("apse", taxonomy="mikels", task="emotion", backbone="efficientnet_lite0").eval()
    view = eval_transform(model.preprocessing)
    images = torch.stack([view(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        features = model.backbone(images)
        for module, level in zip((model.polarity_attention, model.emotion_attention), features["levels"]):
            b, _, h, w = level.shape
            z = module.spatial_mask(level)
            effective = torch.exp(-(z * z.clamp_min(1e-30).log()).sum(1))
            assert float(effective.min()) >= 0.05 * h * w, (h, w, effective.min())
        embedding = model(images)["embedding"]
    distances = torch.cdist(embedding, embedding) + 10 * torch.eye(len(paths))
    assert float(distances.min()) > 1e-3


def test_the_softmax_feature_is_trained_by_its_loss_and_a_metric_loss_alone_shapes_its_embedding():
    """Paper 002's softmax row: cross-entropy reaches the embedding layer; beside N-pair, EP or WEP the linear
    probe's cross-entropy does not (only the metric does)."""
    x = inputs(tiny_model("apse"), 8)
    labels = torch.tensor([0, 0, 1, 1, 4, 4, 5, 5])
    softmax = tiny_model("apse:attention=none,loss=ce")
    build_loss("ce", MIKELS)(softmax(x), {"label": labels}).backward()
    assert softmax.embed.weight.grad.abs().sum() > 0 and softmax.probe.weight.grad.abs().sum() > 0
    for name in ("npair", "ep"):
        metric = tiny_model(f"apse:attention=none,loss={name}")
        out = metric(x)
        build_loss(name, MIKELS).loss.metric(out, labels).sum().backward(retain_graph=True)
        from_metric = metric.embed.weight.grad.clone()
        metric.zero_grad()
        build_loss(name, MIKELS)(out, {"label": labels}).backward()
        torch.testing.assert_close(metric.embed.weight.grad, from_metric)  # the probe's term adds nothing to it
        assert metric.probe.weight.grad.abs().sum() > 0

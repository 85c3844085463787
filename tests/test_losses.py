import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emolens.losses import LOSSES, AffectLoss, MetricLoss, build_loss, split_loss_arguments
from emolens.taxonomy import EMOTION6, MIKELS, POLARITY, wheel_distribution


def outputs(logits):
    return {"logits": torch.tensor(logits, dtype=torch.float32, requires_grad=True)}


def test_cross_entropy_by_hand():
    loss = build_loss("ce", MIKELS)
    out = {"logits": torch.zeros(1, 8)}
    assert float(loss(out, {"label": torch.tensor([3])})) == pytest.approx(math.log(8))


def test_multitask_is_eq6_with_the_eq4_wheel_distribution():
    lam, p_star = 0.4, 0.7
    loss = build_loss("multitask", MIKELS, lambda_=lam)
    logits = torch.randn(3, 8)
    label = torch.tensor([0, 2, 7])
    prob = torch.tensor([p_star, 0.5, 1.0])
    got = float(loss({"logits": logits}, {"label": label, "label_prob": prob}))
    log_p = logits.log_softmax(-1).numpy()
    f = wheel_distribution(label.numpy(), prob.numpy())
    ce = -log_p[np.arange(3), label.numpy()].mean()
    ed = -(f * log_p).sum(1).mean()
    assert got == pytest.approx((1 - lam) * ce + lam * ed, rel=1e-5)


def test_multitask_limits():
    logits, label = torch.randn(4, 8), torch.tensor([1, 2, 3, 4])
    prob = torch.full((4,), 0.6)
    ce = F.cross_entropy(logits, label)
    assert float(build_loss("multitask", MIKELS, lambda_=0.0)({"logits": logits}, {"label": label, "label_prob": prob})) == pytest.approx(float(ce))
    # p* = 1 makes the wheel distribution one-hot: any lambda gives plain CE
    one = torch.ones(4)
    assert float(build_loss("multitask", MIKELS, lambda_=0.7)({"logits": logits}, {"label": label, "label_prob": one})) == pytest.approx(float(ce), rel=1e-5)


def test_multitask_needs_the_wheel():
    with pytest.raises(ValueError, match="wheel"):
        build_loss("multitask", EMOTION6)
    with pytest.raises(ValueError, match="wheel"):
        build_loss("multitask", POLARITY)


def test_label_probability_loss_eq10():
    """Hand values of Eq. 10, -log softmax(p*^2 a)_y: (ln(e^0.5 + 7) - 0.5) for a = 2 e_0, y = 0, p* = 0.5,
    and (ln(e^3 + 7e) - 3) for a = 1 + 2 e_5, y = 5, p* = 1; the loss is their mean."""
    loss = build_loss("label_prob", MIKELS)
    logits = torch.tensor([[2.0, 0, 0, 0, 0, 0, 0, 0], [1.0, 1, 1, 1, 1, 3, 1, 1]])
    label, prob = torch.tensor([0, 5]), torch.tensor([0.5, 1.0])
    assert float(loss({"logits": logits}, {"label": label, "label_prob": prob})) == pytest.approx(1.1619397022749758)
    # certain labels: plain cross-entropy
    assert float(loss({"logits": logits}, {"label": label, "label_prob": torch.ones(2)})) == pytest.approx(float(F.cross_entropy(logits, label)))


def test_distribution_kl_is_zero_at_the_target_and_positive_elsewhere():
    loss = build_loss("kl", MIKELS)
    target = torch.tensor([[0.5, 0.25, 0.25, 0, 0, 0, 0, 0]])
    exact = torch.log(target.clamp_min(1e-9))
    assert float(loss({"logits": exact}, {"distribution": target, "label": torch.tensor([0])})) == pytest.approx(0.0, abs=1e-5)
    assert float(loss({"logits": torch.zeros(1, 8)}, {"distribution": target, "label": torch.tensor([0])})) > 0.1
    with pytest.raises(ValueError, match="distribution"):
        loss({"logits": torch.zeros(1, 8)}, {"label": torch.tensor([0])})


CLASSIFICATION = sorted(n for n, cls in LOSSES.items()
                        if not issubclass(cls, (MetricLoss, AffectLoss)) and n != "joint")  # joint: test_joint.py
METRIC = sorted(n for n, cls in LOSSES.items() if issubclass(cls, MetricLoss))
AFFECT = sorted(n for n, cls in LOSSES.items() if issubclass(cls, AffectLoss))


@pytest.mark.parametrize("name", AFFECT)
def test_every_affect_loss_gives_gradients_to_valence_and_arousal(name):
    predicted = torch.randn(6, 2, requires_grad=True)
    build_loss(name, MIKELS)({"affect": predicted}, {"affect": torch.randn(6, 2)}).backward()
    assert predicted.grad.abs().sum() > 0


@pytest.mark.parametrize("name", METRIC)
def test_every_metric_loss_gives_gradients_to_the_embedding(name):
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    value = build_loss(name, MIKELS)({"embedding": emb}, {"label": torch.tensor([0, 0, 1, 1, 4, 4, 6, 6])})
    value.backward()
    assert torch.isfinite(value) and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_every_loss_gives_gradients(name):
    loss = build_loss(name, MIKELS)
    out = outputs(np.random.default_rng(0).normal(size=(4, 8)))
    dist = torch.softmax(torch.randn(4, 8), -1)
    value = loss(out, {"label": torch.tensor([0, 1, 2, 3]), "distribution": dist, "label_prob": torch.full((4,), 0.5)})
    value.backward()
    assert out["logits"].grad is not None and out["logits"].grad.abs().sum() > 0


def test_spec_arguments_split_into_loss_and_model():
    name, loss_args, model_args = split_loss_arguments({"loss": "multitask", "lambda": 0.3, "dropout": 0.1})
    assert name == "multitask" and loss_args == {"lambda_": 0.3} and model_args == {"dropout": 0.1}
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("nope", MIKELS)
    with pytest.raises(ValueError, match="does not take"):
        build_loss("ce", MIKELS, lambda_=0.2)


def test_balanced_cross_entropy_asks_for_class_balanced_batches():
    from emolens import create_model

    model = create_model("global:loss=ce,balanced=true", backbone="test_efficientnet", backbone_weights=None)
    assert model.spec["loss"] == {"name": "ce", "args": {"balanced": True}}
    assert build_loss("ce", MIKELS, balanced=True).needs_class_balanced_batches
    assert not build_loss("ce", MIKELS).needs_class_balanced_batches


def test_affect_losses_leave_unrated_images_out():
    predicted = torch.tensor([[0.5, 0.0], [0.0, 0.2], [9.0, 9.0]], requires_grad=True)
    rated = torch.tensor([[0.0, 0.0], [0.0, 0.0], [float("nan"), float("nan")]])
    mse = build_loss("mse", MIKELS)({"affect": predicted}, {"affect": rated})
    l1 = build_loss("l1", MIKELS)({"affect": predicted}, {"affect": rated})
    assert mse.item() == pytest.approx((0.25 + 0.04) / 4) and l1.item() == pytest.approx(0.7 / 4)
    mse.backward()
    assert predicted.grad[2].abs().sum() == 0  # the unrated image gets no gradient


def test_ccc_loss_is_one_minus_the_concordance_per_dimension():
    from emolens.metrics import concordance_correlation

    rng = np.random.default_rng(1)
    t = rng.normal(size=(16, 2))
    p = t * 0.5 + rng.normal(scale=0.2, size=(16, 2))
    loss = build_loss("ccc", MIKELS)({"affect": torch.tensor(p)}, {"affect": torch.tensor(t)})
    expected = np.mean([1 - concordance_correlation(t[:, d], p[:, d]) for d in range(2)])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    only_valence = torch.tensor(t).clone()
    only_valence[:, 1] = float("nan")
    loss = build_loss("ccc", MIKELS)({"affect": torch.tensor(p)}, {"affect": only_valence})
    assert float(loss) == pytest.approx(1 - concordance_correlation(t[:, 0], p[:, 0]), rel=1e-5)

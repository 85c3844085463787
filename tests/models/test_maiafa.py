import math

import pytest
import torch

from helpers import make_ldl_dataset, tiny_model
from emolens import create_model
from emolens.checkpoints import CheckpointError
from emolens.models.maiafa import ECA, MaiAfa, ShuffleAttention
from emolens.weights import init_from, save_model

SPEC = "maiafa:width=32,groups=4"


def inputs(model, n=2):
    size = model.preprocessing.size
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_shapes_region_map_and_level_weights(backbone):
    model = create_model(SPEC, backbone=backbone, backbone_weights=None, task="polarity").eval()
    assert isinstance(model, MaiAfa)
    x = inputs(model)
    with torch.no_grad():
        finest = model.backbone(x)["levels"][0]
        out = model(x)
    assert out["region_map"].shape == (2, *finest.shape[-2:])  # D at the finest level's size
    assert float(out["region_map"].min()) >= 0 and float(out["region_map"].max()) <= 1
    assert out["level_weights"].shape == (2, 4)  # one ψ per level
    assert out["logits"].shape == (2, 2) and out["embedding"].shape == (2, 4 * 32)


def test_ablations_drop_their_module():
    no_interaction = tiny_model(SPEC + ",interaction=0").eval()
    no_aggregation = tiny_model(SPEC + ",aggregation=0").eval()
    assert no_interaction.interaction is None and "region_map" not in no_interaction(inputs(no_interaction))
    assert no_aggregation.aggregation is None and "level_weights" not in no_aggregation(inputs(no_aggregation))
    with pytest.raises(ValueError, match="interaction or the aggregation"):
        tiny_model(SPEC + ",interaction=0,aggregation=0")


def test_gradients_reach_every_parameter_of_the_model():
    model = tiny_model(SPEC).train()
    with torch.no_grad():  # SA-Net starts its spatial scale at 0, which blocks its GroupNorm's gradient at init
        for sa in model.interaction.shuffle:
            sa.spatial_weight.fill_(0.1)
    model(inputs(model, 3))["logits"].logsumexp(-1).sum().backward()
    # maiafa reads the four levels, not the map the backbone pools (EfficientNet's 1x1 head conv)
    unused = ("backbone.net.conv_head.", "backbone.net.bn2.")
    assert not [n for n, p in model.named_parameters() if p.grad is None and not n.startswith(unused)]
    own = [n for n, p in model.named_parameters() if not n.startswith("backbone.") and not p.grad.abs().sum()]
    assert not own


def test_channel_shuffle_by_hand():
    x = torch.arange(4.0).view(1, 4, 1, 1)
    assert ShuffleAttention.shuffle(x, 2).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_shuffle_attention_by_hand():
    sa = ShuffleAttention(2, groups=1)  # one group: channel 0 takes the channel branch, channel 1 the spatial one
    with torch.no_grad():
        sa.channel_weight.fill_(1.0)
        sa.channel_bias.fill_(0.0)
        sa.spatial_weight.fill_(0.0)
        sa.spatial_bias.fill_(0.0)
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, -4.0]]]])  # (1, 2, 1, 2)
    out = sa(x)
    gate = 1 / (1 + math.exp(-2.0))  # sigmoid(1 * mean(1, 3) + 0)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0 * gate, 3.0 * gate]]))
    torch.testing.assert_close(out[0, 1], torch.tensor([[1.0, -2.0]]))  # sigmoid(0) = 0.5
    fresh = ShuffleAttention(8, groups=2)  # at initialisation every gate is sigmoid(1)
    y = torch.randn(1, 8, 3, 3)
    expected = ShuffleAttention.shuffle(y * (1 / (1 + math.exp(-1.0))), 2)
    torch.testing.assert_close(fresh(y), expected)


def test_eca_kernel_size_and_gating_by_hand():
    assert ECA(64).kernel_size == 3 and ECA(256).kernel_size == 5 and ECA(16).kernel_size == 3
    eca = ECA(16)
    with torch.no_grad():
        eca.conv.weight.copy_(torch.tensor([[[0.5, 0.0, 0.5]]]))  # each channel gated by its two neighbours
    means = torch.arange(16.0) - 8
    x = means.view(1, 16, 1, 1).repeat(1, 1, 2, 2)
    padded = torch.cat([torch.zeros(1), means, torch.zeros(1)])
    gates = torch.sigmoid(0.5 * padded[:-2] + 0.5 * padded[2:])
    torch.testing.assert_close(eca(x), x * gates.view(1, 16, 1, 1))


def test_explain_draws_region_map():
    from emolens.explain import Explainer
    from PIL import Image

    result = Explainer(tiny_model(SPEC).eval()).explain(Image.new("RGB", (50, 40), (200, 100, 0)))
    assert set(result.maps) == {"Grad-CAM", "region map D"}


def test_init_from_another_run_and_refusal_of_a_different_model(tmp_path):
    source = tiny_model(SPEC, task="polarity")
    with torch.no_grad():
        source.classifier[-1].bias.fill_(0.25)
    save_model(source, tmp_path / "src.safetensors")
    target = tiny_model(SPEC, task="polarity")
    init_from(target, tmp_path / "src.safetensors")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError):
        init_from(tiny_model(SPEC, task="emotion"), tmp_path / "src.safetensors")  # 8 classes, not 2
    with pytest.raises(CheckpointError):
        init_from(tiny_model("global", task="polarity"), tmp_path / "src.safetensors")


def test_train_with_init_records_and_uses_it(tmp_path):
    from typer.testing import CliRunner
    from emolens.cli import app

    spec = make_ldl_dataset(tmp_path / "d", per_class=4)
    common = ["--model", SPEC, "--data", spec, "--task", "polarity", "--backbone", "test_efficientnet",
              "--backbone-weights", "none", "--epochs", "1", "--freeze-backbone", "--workers", "0"]
    runner = CliRunner()
    first = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"),
                                 "--lr", "0"])
    assert second.exit_code == 0, second.output
    import json

    meta = json.loads((tmp_path / "b" / "best.json").read_text())
    assert meta["train_config"]["init"] == str(tmp_path / "a")
    a = json.loads((tmp_path / "a" / "best.json").read_text())
    assert meta["val_metrics"]["accuracy"] == pytest.approx(a["val_metrics"]["accuracy"])  # lr 0: the source's weights

import pytest
import timm
import torch
from sklearn.datasets import load_sample_image
from PIL import Image
from timm.data import ImageNetInfo

from emolens.backbones import Backbone, bundled_state_dict, create_backbone
from emolens.checkpoints import CheckpointError
from emolens.data.transforms import eval_transform
from safetensors.torch import save_file


def imagenet_top5(name, image_name):
    b = create_backbone(name)
    net = timm.create_model(b.net.pretrained_cfg["architecture"], pretrained=False).eval()
    net.load_state_dict(bundled_state_dict(name))
    x = eval_transform(b.preprocessing)(Image.fromarray(load_sample_image(image_name)))[None]
    with torch.inference_mode():
        top = net(x).softmax(-1)[0].topk(5).indices.tolist()
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in top]


def test_bundled_lite0_recognises_package_sample_images():
    assert "palace" in imagenet_top5("efficientnet_lite0", "china.jpg")
    assert imagenet_top5("efficientnet_lite0", "flower.jpg")[0] == "daisy"


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_the_other_bundled_lites_recognise_a_package_sample_image(name):
    assert imagenet_top5(name, "china.jpg")[0] == "palace"


def test_backbone_levels_channels_strides_and_preprocessing():
    b = create_backbone().eval()
    assert b.preprocessing.mean == (0.5, 0.5, 0.5) and b.preprocessing.size == 224
    out = b(torch.zeros(2, 3, 224, 224))
    assert [t.shape[1] for t in out["levels"]] == b.channels
    assert [224 // t.shape[-1] for t in out["levels"]] == b.strides == [4, 8, 16, 32]
    assert out["pooled"].shape == (2, b.num_features)
    assert create_backbone("efficientnet_lite1").preprocessing.size == 240
    assert create_backbone("efficientnet_lite2").preprocessing.size == 260


def test_other_backbones_need_a_local_file_or_explicit_random_init(tmp_path):
    with pytest.raises(ValueError, match="no bundled weights"):
        create_backbone("resnet18")
    random = create_backbone("resnet18", weights=None)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in random.net.state_dict().items()}, str(path))
    loaded = create_backbone("resnet18", weights=path)
    key = "conv1.weight"
    assert torch.equal(loaded.net.state_dict()[key], random.net.state_dict()[key])
    pth = tmp_path / "r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in random.net.state_dict().items()}}, pth)
    assert torch.equal(create_backbone("resnet18", weights=pth).net.state_dict()[key], random.net.state_dict()[key])


def test_weights_that_do_not_fit_fail_loudly(tmp_path):
    small = create_backbone("resnet18", weights=None)
    path = tmp_path / "r18.safetensors"
    state = {k: v.contiguous() for k, v in small.net.state_dict().items()}
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="does not fit"):
        create_backbone("resnet34", weights=path)
    state.pop("conv1.weight")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="1 missing"):
        create_backbone("resnet18", weights=path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_backbone("resnet18", weights=tmp_path / "junk.pth")


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "the-payload-ran"
    torch.save({"conv1.weight": torch.zeros(1), "w": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        Backbone("resnet18", weights=tmp_path / "evil.pth")
    assert not marker.exists(), "the pickle's code ran while loading weights"


def test_unknown_stride_is_reported():
    with pytest.raises(ValueError, match="stride"):
        create_backbone("resnet18", weights=None, out_strides=(64,))


def test_a_torchvision_resnet_file_loads_and_gives_torchvisions_features(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    backbone = Backbone("resnet50", weights=tmp_path / "resnet50.pth").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        theirs = torch.flatten(reference.avgpool(reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))), 1)
        torch.testing.assert_close(backbone(x)["pooled"], theirs, rtol=1e-4, atol=1e-4)


def test_a_torchvision_mobilenet_v2_file_loads_and_gives_torchvisions_features(tmp_path):
    """Paper 004's object stream: torchvision's MobileNetV2 layout read into timm's mobilenetv2_100."""
    import torchvision

    reference = torchvision.models.mobilenet_v2(weights=None).eval()
    for module in reference.modules():  # running statistics other than 0 and 1, so a misplaced one shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "mobilenet_v2.pth")
    backbone = Backbone("mobilenetv2_100", weights=tmp_path / "mobilenet_v2.pth").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        theirs = reference.features(x).mean((2, 3))
        torch.testing.assert_close(backbone(x)["pooled"], theirs, rtol=1e-4, atol=1e-4)


def test_torchvision_vgg_fully_connected_layers_become_timms_convolutions():
    """fc6 of torchvision's VGG flattens (C, H, W) maps: the same numbers as a C x H x W convolution kernel."""
    from emolens.backbones import from_torchvision_layout

    linear = torch.nn.Linear(3 * 2 * 2, 5)
    own = {"pre_logits.fc1.weight": torch.zeros(5, 3, 2, 2), "pre_logits.fc1.bias": torch.zeros(5),
           "features.0.weight": torch.zeros(1)}
    state = from_torchvision_layout({"classifier.0.weight": linear.weight.detach(), "classifier.0.bias":
                                     linear.bias.detach(), "features.0.weight": torch.ones(1)}, own)
    assert set(state) == set(own)
    conv = torch.nn.Conv2d(3, 5, 2)
    conv.load_state_dict({"weight": state["pre_logits.fc1.weight"], "bias": state["pre_logits.fc1.bias"]})
    maps = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(conv(maps).flatten(1), linear(maps.flatten(1)))
    with pytest.raises(CheckpointError, match="cannot become"):
        from_torchvision_layout({"classifier.0.weight": torch.zeros(5, 7)}, own)


def test_hrnetv2_levels_are_the_four_branch_outputs_and_official_weights_load(tmp_path):
    """The official HRNet ImageNet file holds the classification head too; HRNetV2 keeps only the trunk and
    gives the branches themselves (not the head's re-projected 128-1024 channel features)."""
    torch.manual_seed(0)
    classifier = timm.create_model("hrnet_w18_small", pretrained=False).eval()
    save_file(classifier.state_dict(), tmp_path / "hrnet_w18_small_imagenet.safetensors")
    b = create_backbone("hrnetv2_w18_small", tmp_path / "hrnet_w18_small_imagenet.safetensors").eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.inference_mode():
        out = b(x)
        stem = classifier.act2(classifier.bn2(classifier.conv2(classifier.act1(classifier.bn1(classifier.conv1(x))))))
        branches = classifier.stages(stem)
    assert b.channels == [16, 32, 64, 128] and b.strides == [4, 8, 16, 32]
    for level, branch in zip(out["levels"], branches):
        torch.testing.assert_close(level, branch)
    assert out["final"].shape == (1, sum(b.channels), 24, 16)  # HRNetV2: all branches at stride 4
    torch.testing.assert_close(out["final"][:, :16], branches[0])
    torch.testing.assert_close(out["pooled"], out["final"].mean((2, 3)))


def test_hrnetv2_pooled_feature_keeps_every_branch_when_a_model_reads_two_levels():
    b = create_backbone("hrnetv2_w18_small", None, out_strides=(8, 32)).eval()
    out = b(torch.randn(1, 3, 64, 64))
    assert [t.shape[1] for t in out["levels"]] == [32, 128]
    assert out["pooled"].shape == (1, 16 + 32 + 64 + 128) == (1, b.num_features)

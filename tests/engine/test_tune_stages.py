"""Tuning a backbone's last stages: the frozen stages run once (cached), the rest trains; a checkpoint over
bundled weights keeps only the tuned stages."""

import pytest
import torch

from helpers import assert_feeds_agree, tiny_model
from emolens import create_model
from emolens.backbones import Backbone
from emolens.engine import TrainConfig, evaluate, fit
from emolens.engine.trainer import feature_cache
from emolens.checkpoints import CheckpointError
from emolens.weights import init_from, load_model, save_model


def config(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=4, workers=0, patience=None, optimizer="adamw", lr=3e-2,
                                 tune_stages=2), **kw})


def test_the_tuned_stages_continue_exactly_where_the_frozen_ones_stop():
    backbone = Backbone("test_efficientnet", weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = backbone(x)
        for count in (1, 3, backbone.stage_count):
            backbone.tune_last_stages(count)
            split = backbone.from_frozen(backbone.frozen_stages()(x)["frozen"])
            torch.testing.assert_close(split["pooled"], whole["pooled"])
    # every level lies in the tuned stages only when all of them train
    for level, reference in zip(split["levels"], whole["levels"]):
        torch.testing.assert_close(level, reference)
    backbone.tune_last_stages(1)
    with torch.no_grad():
        assert "levels" not in backbone.from_frozen(backbone.frozen_stages()(x)["frozen"])
        # the levels within the frozen stages come with them when asked for, and then every level is at hand
        cached = backbone.frozen_stages(levels=True)(x)
        split = backbone.from_frozen(cached["frozen"], cached["frozen_levels"])
    for level, reference in zip(split["levels"], whole["levels"], strict=True):
        torch.testing.assert_close(level, reference)


def test_only_the_last_stages_get_gradients_and_batchnorm_keeps_its_statistics():
    backbone = Backbone("test_efficientnet", weights=None)
    backbone.tune_last_stages(2)
    tuned = {f"net.{name}" for name in ("blocks.3", "blocks.4", "conv_head", "bn2")}
    for name, p in backbone.named_parameters():
        assert p.requires_grad == name.startswith(tuple(tuned)), name
    backbone.train()
    assert not any(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sorted(backbone.tuned_parts(2)) == sorted(tuned)


def test_stage_counts_out_of_range_and_unstaged_backbones_are_refused():
    backbone = Backbone("test_efficientnet", weights=None)
    with pytest.raises(ValueError, match="5 stages: tune 1 to 5"):
        backbone.tune_last_stages(6)
    with pytest.raises(ValueError, match="no stem/stages/head-conv layout"):
        Backbone("test_resnet", weights=None).tune_last_stages(1)


def test_fit_trains_the_tuned_stages_on_the_cached_frozen_output_and_leaves_the_rest(tiny, tmp_path):
    ds, fold = tiny
    model = tiny_model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fit(model, ds, fold, tmp_path / "run", config(), cache_dir=tmp_path / "cache", progress=False)
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("net.blocks.3.", "net.blocks.4.", "net.conv_head.", "net.bn2.")) for k in changed)
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"features-test_efficientnet-stages3-" +
                                                               p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache").iterdir()]


def test_scoring_from_the_cache_equals_scoring_from_images(tiny, tmp_path):
    ds, fold = tiny
    model = tiny_model()
    fit(model, ds, fold, tmp_path / "run", config(epochs=1), cache_dir=tmp_path / "cache", progress=False)
    model.eval()
    cache = feature_cache(model, ds, tmp_path / "cache", config(), progress=False)
    assert_feeds_agree(model, ds, cache, "images", "stages")
    cached = evaluate(model, ds, fold.test, config(), cache_dir=tmp_path / "cache", progress=False)
    uncached = evaluate(model, ds, fold.test, config(), progress=False)
    assert cached["accuracy"] == uncached["accuracy"]
    assert cached["kl"] == pytest.approx(uncached["kl"], abs=1e-2)


@pytest.mark.parametrize("spec", ["maiafa:width=8,groups=2", "mlrcnn:fpn=16,representation=32,k=4,proposals=20"])
def test_models_that_read_every_level_tune_the_last_stages_from_cached_levels(spec, tiny, tmp_path):
    """maiafa and mlrcnn read levels that lie in the frozen stages: the cache keeps them beside the frozen output,
    in the evaluation view and in random views, and the cached feed gives the logits the images give."""
    ds, fold = tiny
    model = tiny_model(spec)
    fit(model, ds, fold, tmp_path / "run", config(epochs=1, tune_stages=1, cache_views=1), cache_dir=tmp_path / "cache",
        progress=False)
    model.eval()
    cache = feature_cache(model, ds, tmp_path / "cache", config(tune_stages=1), progress=False)
    assert len(cache.features["frozen_levels"]) == len(model.backbone.level_indices) - 1  # all but the last stage's
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir()) == [
        "features-test_efficientnet-stages4-levels1+2+3"] * 2  # the evaluation view and one random view
    assert_feeds_agree(model, ds, cache, "images", "stages")


def test_freezing_and_tuning_together_and_a_multi_stream_backbone_are_refused(tiny, tmp_path):
    ds, fold = tiny
    with pytest.raises(ValueError, match="exclude each other"):
        fit(tiny_model(), ds, fold, tmp_path / "a", config(freeze_backbone=True), progress=False)
    with pytest.raises(ValueError, match="not one backbone"):
        fit(tiny_model("multigap"), ds, fold, tmp_path / "c", config(), progress=False)


def test_a_checkpoint_over_bundled_weights_keeps_only_the_tuned_stages(tmp_path):
    model = create_model("global", taxonomy="mikels")
    model.backbone.tune_last_stages(1)
    with torch.no_grad():
        model.backbone.net.blocks[6][0].conv_pwl.weight.mul_(2)
        model.classifier.weight.normal_()
    parts = [f"backbone.{p}" for p in model.backbone.tuned_parts(1)]
    save_model(model, tmp_path / "m.safetensors", include_backbone=parts)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        backbone_keys = [k for k in f.keys() if k.startswith("backbone.")]
    assert backbone_keys and all(k.startswith(tuple(f"{p}." for p in parts)) for k in backbone_keys)
    loaded = load_model(tmp_path / "m.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


def pretrained(path):
    """A model over the bundled Lite0 whose last two stages were tuned (one weight changed), saved as a run over
    bundled weights saves: only the tuned stages of its backbone."""
    source = create_model("global", taxonomy="mikels")
    source.backbone.tune_last_stages(2)
    with torch.no_grad():
        source.backbone.net.blocks[6][0].conv_pwl.weight.mul_(2)
    save_model(source, path, include_backbone=[f"backbone.{p}" for p in source.backbone.tuned_parts(2)])
    return source


def test_another_model_starts_from_the_tuned_stages_of_a_run_over_bundled_weights(tmp_path):
    """An affective pre-training with the last stages tuned saves only those stages; a seed model built on the same
    bundled backbone takes them with --init-parts backbone (the frozen stages are the bundled ones in both)."""
    source = pretrained(tmp_path / "pre.safetensors")
    seed = create_model("maiafa:width=16,groups=2", taxonomy="emotionroi", task="polarity")
    init_from(seed, tmp_path / "pre.safetensors", ["backbone"])
    torch.testing.assert_close(seed.backbone.state_dict(), source.backbone.state_dict())
    other = create_model("maiafa:width=16,groups=2", taxonomy="emotionroi", task="polarity", backbone_weights=None)
    with pytest.raises(CheckpointError, match="part tensors missing"):  # random frozen stages: not the bundled ones
        init_from(other, tmp_path / "pre.safetensors", ["backbone"])


def test_a_pretrained_backbone_starts_the_first_stream_of_a_multi_stream_model(tmp_path):
    """multigap's first stream is the backbone its spec names: a one-backbone checkpoint's tensors land there, and
    the other streams keep their own weights."""
    source = pretrained(tmp_path / "pre.safetensors")
    seed = create_model("multigap:streams=efficientnet_lite0", taxonomy="emotionroi", task="polarity")
    second = {k: v.clone() for k, v in seed.backbone.streams[1].state_dict().items()}
    init_from(seed, tmp_path / "pre.safetensors", ["backbone"])
    torch.testing.assert_close(seed.backbone.streams[0].state_dict(), source.backbone.state_dict())
    torch.testing.assert_close(seed.backbone.streams[1].state_dict(), second)


def test_a_frozen_run_from_the_pretrained_stages_saves_that_backbone_not_the_bundled_one(tmp_path):
    """The EmotionROI tables' affective rows: a frozen, cached run over bundled Lite0 that --init put the pre-trained
    stages into keeps them in its checkpoint, so the model read back (and tested) is the model trained."""
    from recipe_data import make_emotionroi
    from emolens.data import load_dataset, make_protocol

    source = pretrained(tmp_path / "pre.safetensors")
    dataset = load_dataset(make_emotionroi(tmp_path / "emotion6", per_class=2))
    fold = make_protocol(dataset, "split", seed=0, fractions=(0.5, 0.25, 0.25)).folds[0]
    seed = create_model("global", taxonomy=dataset.taxonomy, task="polarity")
    fit(seed, dataset, fold, tmp_path / "run", config(epochs=1, tune_stages=0, freeze_backbone=True,
                                                       init=str(tmp_path / "pre.safetensors"), init_parts=("backbone",)),
        progress=False)
    torch.testing.assert_close(load_model(tmp_path / "run").backbone.state_dict(), source.backbone.state_dict())

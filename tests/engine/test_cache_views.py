"""Random views in the feature cache: training on a cached frozen part still sees random crops and flips."""

import numpy as np
import pytest
import torch

from helpers import tiny_model
from emolens.engine import TrainConfig, fit
from emolens.engine.data import CachedViews, FeatureCache
from emolens.images import load_image
from emolens.engine.trainer import _Batches, feature_cache, feed_for


def config(**kw):
    return TrainConfig(**{**dict(epochs=1, batch_size=4, workers=0, patience=None, optimizer="adamw", lr=3e-2,
                                 tune_stages=2, cache_views=2), **kw})


def frozen(cache: FeatureCache) -> np.ndarray:
    return np.asarray(cache.features["frozen"], dtype=np.float32)


def test_each_view_is_its_own_random_crop_and_the_same_when_built_again(tiny, tmp_path):
    ds, _ = tiny
    model = tiny_model()
    model.backbone.tune_last_stages(2)
    plain = frozen(feature_cache(model, ds, tmp_path / "a", config(), progress=False))
    views = [frozen(feature_cache(model, ds, tmp_path / "a", config(), progress=False, view=k)) for k in range(2)]
    again = frozen(feature_cache(model, ds, tmp_path / "b", config(), progress=False, view=1))
    for view in views:
        assert not np.allclose(view, plain, atol=1e-2)
    assert not np.allclose(views[0], views[1], atol=1e-2)
    np.testing.assert_array_equal(again, views[1])
    assert len(list((tmp_path / "a").iterdir())) == 3


def test_a_training_batch_takes_each_image_from_one_view_drawn_by_its_seed():
    views = CachedViews([FeatureCache({"pooled": np.full((6, 2), float(v))}, 6) for v in range(3)])
    rows = torch.tensor([5, 0, 3, 1, 2, 4, 0, 3])
    first = views.batch(rows, (7, 0, 1))["pooled"]
    torch.testing.assert_close(views.batch(rows, (7, 0, 1))["pooled"], first)
    assert (first[:, 0] == first[:, 1]).all()
    drawn = torch.cat([views.batch(rows, (7, 0, n))["pooled"][:, 0] for n in range(20)])
    assert set(drawn.tolist()) == {0.0, 1.0, 2.0}
    marked = CachedViews([FeatureCache({"levels": [np.arange(6.0)[:, None] + 10 * v]}, 6) for v in range(2)])
    taken = marked.batch(rows, (1, 0, 0))["levels"][0][:, 0]
    assert torch.equal(taken % 10, rows.float())


def test_training_batches_come_from_the_views_and_scoring_batches_from_the_plain_view(tiny, tmp_path):
    ds, fold = tiny
    model = tiny_model()
    model.backbone.tune_last_stages(2)
    cfg = config()
    cache = feature_cache(model, ds, tmp_path, cfg, progress=False)
    views = CachedViews([feature_cache(model, ds, tmp_path, cfg, progress=False, view=k) for k in range(2)])
    batches = _Batches(ds, cache, cfg, model, cfg.placement(), feed_for(cfg, cache), views=views)
    view_rows = [frozen(c) for c in views.caches]
    for train in (True, False):
        for inputs, idx, _ in batches(fold.train, train, 3, 0, 1):
            for row, got in zip(idx.tolist(), inputs["frozen"].numpy()):
                sources = view_rows if train else [frozen(cache)]
                assert any(np.allclose(got, s[row], atol=1e-3) for s in sources), (train, row)


def test_fit_builds_the_views_and_counts_them_in_the_cache_budget(tiny, tmp_path):
    ds, fold = tiny
    fit(tiny_model(), ds, fold, tmp_path / "run", config(), cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 3
    model = tiny_model()
    model.backbone.tune_last_stages(2)
    one = feature_cache(model, ds, tmp_path / "cache", config(), progress=False)
    size = np.asarray(one.features["frozen"]).nbytes / 2**30
    assert feature_cache(model, ds, tmp_path / "new", config(cache_budget=size * 2.5), progress=False) is None
    assert feature_cache(model, ds, tmp_path / "new", config(cache_budget=size * 3.5), progress=False) is not None


def test_without_a_cache_a_frozen_backbone_with_views_trains_on_random_crops(tiny):
    ds, _ = tiny
    model = tiny_model()
    image = load_image(ds.samples[0].path)

    def training_views(cache_views: int) -> list[torch.Tensor]:
        cfg = config(tune_stages=0, freeze_backbone=True, cache_views=cache_views)
        batches = _Batches(ds, None, cfg, model, cfg.placement(), "frozen")
        out = []
        for seed in range(4):
            torch.manual_seed(seed)
            out.append(batches.train_tf(image))
        return out

    random, plain = training_views(2), training_views(0)
    assert any(not torch.equal(random[0], other) for other in random[1:])
    assert all(torch.equal(plain[0], other) for other in plain[1:])


def test_views_without_a_cached_part_or_for_eval_frame_targets_are_refused(tiny, tmp_path):
    ds, fold = tiny
    with pytest.raises(ValueError, match="need a cached frozen part"):
        fit(tiny_model(), ds, fold, tmp_path / "a", config(tune_stages=0), progress=False)
    model = tiny_model()
    model.random_crops = False
    with pytest.raises(ValueError, match="random views cannot be cached"):
        fit(model, ds, fold, tmp_path / "b", config(), progress=False)

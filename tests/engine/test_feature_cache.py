"""The frozen-backbone feature cache: on disk in shards, memory-mapped, resumable after a kill, above a
budget replaced by the backbone run on the fly - and the head cannot tell which fed it."""

import numpy as np
import pytest
import torch

from helpers import assert_feeds_agree, tiny_model
from emolens.data.transforms import eval_transform
from emolens.engine import TrainConfig, fit
from emolens.engine.data import build_cache, cache_key, open_cache, plan_cache
from emolens.engine.trainer import feature_cache, run_model
from emolens.images import load_image


def config(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=4, workers=0, patience=None, optimizer="adamw", lr=3e-3,
                                 freeze_backbone=True), **kw})


def test_the_cache_is_memory_mapped_and_each_view_says_which_it_is_and_the_size_of_all(tiny, tmp_path, capsys):
    ds, _ = tiny
    model = tiny_model("maiafa:width=16,groups=2")
    cache = feature_cache(model, ds, tmp_path / "cache", config(cache_views=2), progress=True)
    arrays = [a for value in cache.features.values() for a in (value if isinstance(value, list) else [value])]
    assert arrays and all(isinstance(a, np.memmap) for a in arrays)
    said = " ".join(capsys.readouterr().err.split())
    assert f"caching backbone features, evaluation view ({len(ds)} images x" in said and "x 3 views" in said
    assert "GiB in all)" in said
    feature_cache(model, ds, tmp_path / "cache", config(cache_views=2), progress=True, view=1)
    said = " ".join(capsys.readouterr().err.split())
    assert "caching backbone features, random view 2 of 2 (" in said


def test_above_the_budget_the_backbone_runs_on_the_fly_with_the_same_head_outputs(tiny, tmp_path):
    ds, fold = tiny
    model = tiny_model().eval()
    cached = feature_cache(model, ds, tmp_path / "cache", config(), progress=False)
    assert feature_cache(model, ds, tmp_path / "other", config(cache_budget=1e-9), progress=False) is None
    assert not (tmp_path / "other").exists()
    assert_feeds_agree(model, ds, cached, "frozen", "cached")
    result = fit(tiny_model(), ds, fold, tmp_path / "run", config(cache_budget=1e-9), progress=False)
    assert not (tmp_path / "run" / "cache").exists() and result.val_metrics["n"] == len(fold.val)


def test_a_killed_build_resumes_at_the_first_unfinished_shard(tiny, tmp_path):
    ds, _ = tiny
    model = tiny_model().eval()
    paths = [s.path for s in ds.samples]
    meta = cache_key(paths, model.backbone, list(model.feature_keys))
    plan = plan_cache(model.backbone, model.feature_keys, meta, tmp_path / "killed", shard_size=8)
    calls = []
    real_forward = model.backbone.forward

    class Killed(Exception):
        pass

    def dies_in_the_third_shard(images):
        calls.append(len(images))
        if len(calls) == 5 and not resumed:  # shards of 8 images in batches of 4: the third shard's first batch
            raise Killed
        return real_forward(images)

    model.backbone.forward = dies_in_the_third_shard
    resumed = None
    with pytest.raises(Killed):
        build_cache(plan, model.backbone, paths, batch_size=4, workers=0, progress=False)
    assert open_cache(plan) is None  # not finished: never read
    calls.clear()
    resumed = True
    resumed = build_cache(plan, model.backbone, paths, batch_size=4, workers=0, progress=False)
    assert sum(calls) == len(paths) - 16  # only the shards not recorded as done
    model.backbone.forward = real_forward
    whole = build_cache(plan_cache(model.backbone, model.feature_keys, meta, tmp_path / "whole", shard_size=8),
                        model.backbone, paths, batch_size=4, workers=0, progress=False)
    everything = torch.arange(len(paths))
    torch.testing.assert_close(resumed.batch(everything), whole.batch(everything))


def test_level_means_join_the_pooled_feature_and_are_cached_without_the_levels(tiny, tmp_path):
    ds, _ = tiny
    model = tiny_model("global:level_means=true").eval()
    rows = torch.tensor([1, 4])
    images = torch.stack([eval_transform(model.preprocessing)(load_image(ds.samples[r].path)) for r in rows.tolist()])
    with torch.no_grad():
        out = model.backbone(images)
        embedding = model(images)["embedding"]
    expected = torch.cat([out["pooled"], *(level.mean((2, 3)) for level in out["levels"])], 1)
    torch.testing.assert_close(embedding, expected)
    cache = feature_cache(model, ds, tmp_path / "cache", config(), progress=False)
    assert set(cache.features) == {"pooled", "level_means"}  # means, not the spatial maps
    with torch.no_grad():
        from_cache = run_model(model, cache.batch(rows), "cached")["embedding"]
    torch.testing.assert_close(from_cache, embedding, atol=2e-2, rtol=2e-2)


def test_a_part_of_a_cache_is_its_rows_with_their_errors_renumbered():
    from emolens.engine.data import FeatureCache

    pooled = np.arange(20, dtype=np.float16).reshape(10, 2)
    levels = [np.arange(10, dtype=np.float16).reshape(10, 1, 1, 1)]
    cache = FeatureCache({"pooled": pooled, "levels": levels}, 10, {2: "truncated", 5: "not an image"})
    part = cache.part(4, 3)
    assert part.count == 3 and part.errors == {1: "not an image"}
    batch = part.batch(torch.tensor([0, 2]))
    assert batch["pooled"].tolist() == [[8.0, 9.0], [12.0, 13.0]] and batch["levels"][0].flatten().tolist() == [4.0, 6.0]
    assert part.usable([0, 1, 2]) == [0, 2]

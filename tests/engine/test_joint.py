"""Joint training: several datasets, one trunk, one head per label space; a batch adds only the losses of
the spaces its images are labelled in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_BACKBONE, make_ldl_dataset, make_oasis
from emolens import create_model
from emolens.data import load_dataset, make_protocol
from emolens.data.joint import JointDataset, label_spaces
from emolens.engine import TrainConfig, evaluate, fit
from emolens.engine.data import task_targets_arrays
from emolens.losses import build_loss
from emolens.weights import load_model


@pytest.fixture
def members(tmp_path):
    ldl = load_dataset(make_ldl_dataset(tmp_path / "ldl", per_class=6))
    oasis = load_dataset(make_oasis(tmp_path / "oasis", n=24))
    return ldl, oasis


def joint_model(spaces="mikels+affect", trunk="global"):
    return create_model(f"joint:trunk={trunk},spaces={spaces}", backbone=TINY_BACKBONE, backbone_weights=None)


def test_each_image_keeps_only_its_own_datasets_labels(members):
    ldl, oasis = members
    joint = JointDataset.of([ldl, oasis])
    assert label_spaces(ldl) == ("mikels",) and label_spaces(oasis) == ("affect@oasis",)
    targets = task_targets_arrays(joint, "joint")
    n = len(ldl)
    assert set(targets) == {"mikels.label", "mikels.distribution", "affect@oasis"}
    assert (targets["mikels.label"][n:] == -1).all() and np.isnan(targets["mikels.distribution"][n:]).all()
    assert np.isnan(targets["affect@oasis"][:n]).all() and not np.isnan(targets["affect@oasis"][n:]).any()
    np.testing.assert_array_equal(targets["mikels.label"][:n], ldl.labels)


def test_joint_folds_are_each_datasets_own_folds(members):
    ldl, oasis = members
    joint = JointDataset.of([ldl, oasis])
    protocol = joint.protocol("kfold", seed=0, k=3)
    for k, fold in enumerate(protocol.folds):
        own = make_protocol(oasis, "kfold", seed=0, k=3).folds[k]
        assert [r - len(ldl) for r in fold.test if r >= len(ldl)] == own.test
        assert [r for r in fold.train if r < len(ldl)] == make_protocol(ldl, "kfold", seed=0, k=3).folds[k].train


def test_a_batch_without_a_space_adds_no_loss_for_it():
    loss = build_loss("joint", None)
    logits = torch.randn(4, 8, requires_grad=True)
    affect = torch.randn(4, 2, requires_grad=True)
    outputs = {"logits": logits, "mikels.logits": logits, "affect": affect}
    unrated = {"mikels.label": torch.tensor([0, 3, 5, 7]), "mikels.distribution": torch.softmax(torch.randn(4, 8), -1),
               "affect@oasis": torch.full((4, 2), float("nan"))}
    loss(outputs, unrated).backward()
    assert affect.grad is None or affect.grad.abs().sum() == 0
    logits.grad = None
    only_rated = {"mikels.label": torch.full((4,), -1), "mikels.distribution": torch.full((4, 8), float("nan")),
                  "affect@oasis": torch.zeros(4, 2)}
    value = loss(outputs, only_rated)
    value.backward()
    assert value.item() == pytest.approx(affect.detach().square().mean().item())
    assert logits.grad is None or logits.grad.abs().sum() == 0


def test_a_joint_model_trains_on_two_datasets_and_is_scored_on_each(members, tmp_path):
    ldl, oasis = members
    joint = JointDataset.of([ldl, oasis])
    fold = joint.protocol("split", seed=0).folds[0]
    torch.manual_seed(0)
    model = joint_model()
    assert set(model.heads) == {"mikels", "affect"} and model.taxonomy.name == "mikels"
    config = TrainConfig(epochs=2, batch_size=8, workers=0, optimizer="adamw", lr=3e-3, patience=None)
    result = fit(model, joint, fold, tmp_path / "run", config, progress=False)
    assert {"mikels_accuracy", "mikels_kl", "valence_pearson", "arousal_ccc", "loss"} <= set(result.val_metrics)
    best = load_model(tmp_path / "run")
    test_ldl = evaluate(best, ldl, [r for r in fold.test if r < len(ldl)], config, progress=False)
    test_oasis = evaluate(best, oasis, [r - len(ldl) for r in fold.test if r >= len(ldl)], config, progress=False)
    assert "mikels_accuracy" in test_ldl and "valence_mae" not in test_ldl
    assert "valence_mae" in test_oasis and "mikels_accuracy" not in test_oasis
    with torch.no_grad():
        out = best(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out["distribution"], out["mikels.logits"].softmax(-1))
    assert out["affect"].shape == (2, 2)


@pytest.mark.parametrize("trunk", ["apse", "maiafa/width=16"])
def test_any_registered_model_is_a_trunk(trunk):
    model = joint_model("mikels+emotion6+affect", trunk).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out["mikels.logits"].shape == (2, 8) and out["emotion6.logits"].shape == (2, 7) and out["affect"].shape == (2, 2)
    assert not any(k.startswith("trunk.backbone.") for k in model.state_dict())  # the backbone is saved once


def test_a_dataset_the_model_has_no_head_for_is_refused(members):
    ldl, oasis = members
    with pytest.raises(ValueError, match="no head for affect"):
        evaluate(joint_model("mikels"), oasis, [0, 1], TrainConfig(workers=0), progress=False)


def test_data_given_twice_trains_and_benchmarks_a_joint_model(members, tmp_path):
    import json

    from typer.testing import CliRunner

    from emolens.cli import app

    ldl, oasis = members
    runner = CliRunner(env={"COLUMNS": "240"})
    tiny = ["--backbone", TINY_BACKBONE, "--backbone-weights", "none", "--workers", "0", "--batch-size", "8",
            "--epochs", "1"]
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", "global:dropout=0.1", "--data", ldl.spec, "--data", oasis.spec,
                                 "--out", str(out), *tiny])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test_by_dataset"]) == {ldl.spec, oasis.spec}
    assert "valence_mae" in metrics["test_by_dataset"][oasis.spec]
    spec = json.loads((out / "best.json").read_text())["spec"]
    assert spec["name"] == "joint" and spec["args"]["trunk"] == "global/dropout=0.1"
    assert spec["args"]["spaces"] == "mikels+affect"
    result = runner.invoke(app, ["evaluate", str(out), "--split", "val", "--workers", "0"])
    assert result.exit_code == 0 and "mikels_accuracy" in result.output, result.output

    result = runner.invoke(app, ["benchmark", "--models", "global", "--data", ldl.spec, "--data", oasis.spec,
                                 "--folds", "2", "--out", str(tmp_path / "bench"), *tiny])
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "bench" / "results.json").read_text())["models"]["joint:trunk=global,spaces=mikels+affect"]
    assert bench["backbone"] == TINY_BACKBONE  # what a rebuild from these figures checks it trains on
    fold = bench["folds"][0]
    assert {"flickr_ldl.mikels_accuracy", "oasis.valence_pearson"} <= set(fold)
    assert "oasis.mikels_accuracy" not in fold  # a dataset is scored in its own spaces only


def test_each_rating_set_can_have_its_own_head(members, tmp_path):
    from emolens.data.joint import joint_spec

    ldl, oasis = members
    other = load_dataset(make_oasis(tmp_path / "oasis2", n=24))
    other.kind = "oasis_b"  # a second rating set, as Emotion6's would be
    joint = JointDataset.of([ldl, oasis, other])
    assert joint_spec("global", joint).endswith("spaces=mikels+affect")
    spec = joint_spec("global:affect_heads=per_dataset", joint)
    assert spec.endswith("spaces=mikels+affect@oasis+affect@oasis_b")
    model = create_model(spec, backbone=TINY_BACKBONE, backbone_weights=None).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(out["affect@oasis"], out["affect@oasis_b"])
    torch.testing.assert_close(out["affect"], out["affect@oasis"])  # the first rating set's head speaks for the model
    loss = build_loss("joint", None)
    only_b = {"affect@oasis_b": torch.zeros(2, 2)}
    out = model(torch.randn(2, 3, 32, 32))
    loss(out, only_b).backward()
    assert model.heads["affect@oasis"].weight.grad is None  # set b's ratings train set b's head alone
    assert model.heads["affect@oasis_b"].weight.grad.abs().sum() > 0


def test_figures_of_several_rating_sets_do_not_overwrite_each_other():
    from emolens.engine.trainer import joint_metrics

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    nan = np.full((6, 2), np.nan)
    targets = {"affect@a": np.concatenate([a, nan]), "affect@b": np.concatenate([nan, b])}
    predicted = {"affect@a": np.concatenate([a, a]), "affect@b": np.concatenate([b, -b])}
    figures = joint_metrics(targets, np.arange(12), predicted)
    assert figures["a_valence_pearson"] == pytest.approx(1.0) and figures["b_valence_pearson"] == pytest.approx(-1.0)
    assert "valence_pearson" not in figures


def test_affect_weight_scales_the_rating_loss_alone():
    logits = torch.randn(4, 8)
    outputs = {"logits": logits, "mikels.logits": logits, "affect": torch.randn(4, 2)}
    nan = float("nan")
    targets = {"mikels.label": torch.tensor([0, 3, -1, -1]), "mikels.distribution": torch.tensor([[nan] * 8] * 4),
               "affect@oasis": torch.tensor([[nan, nan], [nan, nan], [0.1, -0.2], [0.5, 0.3]])}
    ce = build_loss("joint", None, affect_weight=0.0)(outputs, targets)
    once = build_loss("joint", None)(outputs, targets)
    five = build_loss("joint", None, affect_weight=5.0)(outputs, targets)
    assert five.item() == pytest.approx(ce.item() + 5 * (once.item() - ce.item()), rel=1e-5)
    assert once.item() > ce.item()
    with pytest.raises(ValueError, match="affect_weight"):
        build_loss("joint", None, affect_weight=-1.0)


def test_embed_is_a_shared_learned_layer_that_is_the_embedding(members):
    from emolens.data.joint import joint_spec

    ldl, oasis = members
    spec = joint_spec("global:embed=12,affect_weight=3,dropout=0.1", JointDataset.of([ldl, oasis]))
    assert spec == "joint:trunk=global/dropout=0.1,spaces=mikels+affect,affect_weight=3,embed=12"
    model = create_model(spec, backbone=TINY_BACKBONE, backbone_weights=None).eval()
    assert model.spec["loss"] == {"name": "joint", "args": {"affect_weight": 3}}
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out["embedding"].shape == (2, 12)
    torch.testing.assert_close(out["affect"], model.heads["affect"](out["embedding"]))
    with pytest.raises(ValueError, match="embed"):
        create_model("joint:trunk=global,spaces=mikels+affect,embed=-1", backbone=TINY_BACKBONE, backbone_weights=None)


def test_a_joint_benchmark_scores_retrieval_on_its_first_class_spaces_dataset(members, tmp_path):
    from emolens.engine.benchmark import retrieval_member, run_benchmark

    ldl, oasis = members
    joint = JointDataset.of([oasis, ldl])  # the class space's dataset need not come first
    fold = joint.protocol("kfold", seed=0, k=2).folds[0]
    member, member_fold = retrieval_member(joint, fold, ldl.taxonomy)
    assert member is ldl
    assert sorted(member_fold.test) == sorted(r - len(oasis) for r in fold.test if r >= len(oasis))
    config = TrainConfig(epochs=1, batch_size=8, workers=0, freeze_backbone=True)
    results = run_benchmark(joint, ["joint:trunk=global,spaces=mikels+affect,embed=8"], "joint", tmp_path / "bench",
                            folds=2, config=config, backbone=TINY_BACKBONE, backbone_weights=None, progress=False,
                            log=lambda m: None, retrieval=True, only_folds=[0])
    figures = results["models"]["joint:trunk=global,spaces=mikels+affect,embed=8"]["folds"][0]
    assert 0 <= figures["flickr_ldl.map8"] <= 1 and "flickr_ldl.map2" in figures
    assert not any(k.startswith("oasis.map") for k in figures)
    # each dataset is scored from the joint run's frozen features: one cache, none per member
    assert len(list((tmp_path / "bench" / "cache").glob("features-*"))) == 1
    best = load_model(tmp_path / "bench" / "joint_trunk=global_spaces=mikels_affect_embed=8" / "fold0")
    own_cache = evaluate(best, ldl, member_fold.test, config, tmp_path / "own", progress=False)
    assert figures["flickr_ldl.mikels_kl"] == pytest.approx(own_cache["mikels_kl"], abs=1e-7)  # the same features


def test_a_joint_split_passes_its_fractions_to_every_member(members):
    ldl, oasis = members
    joint = JointDataset.of([ldl, oasis])
    fold = joint.protocol("split", seed=0, fractions=(0.75, 0.25, 0.0)).folds[0]
    assert fold.test == []
    for member, val in zip(joint.members, joint.member_rows(fold.val)):
        assert len(val) == pytest.approx(len(member) / 4, abs=2)
    assert joint.protocol("split", seed=0).folds[0].test  # the papers' 80/5/15 by default

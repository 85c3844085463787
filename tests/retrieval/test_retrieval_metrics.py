import json
import math

import numpy as np
import pytest

from emolens.retrieval.metrics import evaluate_retrieval, rank_gallery, retrieval_report


def test_two_hand_computed_rankings():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    report = retrieval_report(rel, f1_k=2)
    ap = [(1 / 1 + 2 / 3) / 2, 1 / 4]
    assert report["map8"] == pytest.approx(np.mean(ap))
    assert report["nn"] == pytest.approx(0.5)
    assert report["ft"] == pytest.approx((1 / 2 + 0) / 2)  # top R: 1 of 2, then 0 of 1
    assert report["st"] == pytest.approx((2 / 2 + 0) / 2)  # top 2R: 2 of 2, then 0 of 1 (top 2)
    dcg = [(1 + 1 / math.log2(3)) / (1 + 1 / math.log2(2)), (1 / math.log2(4)) / 1]
    assert report["dcg"] == pytest.approx(np.mean(dcg))
    assert report["f1"] == pytest.approx((0.5 + 0) / 2)
    # ANMRR: R = 2 and 1, GTM = 2 -> K = 4 for both; NMRR = (AVR - 0.5 - R/2) / (1.25 K - 0.5 - R/2)
    nmrr = [(2 - 0.5 - 1) / (5 - 0.5 - 1), (4 - 0.5 - 0.5) / (5 - 0.5 - 0.5)]
    assert report["anmrr"] == pytest.approx(np.mean(nmrr))


def test_perfect_and_worst_rankings_hit_the_bounds():
    perfect = retrieval_report(np.array([[1, 1, 0, 0, 0]], dtype=bool))
    assert perfect["map8"] == perfect["nn"] == perfect["ft"] == perfect["dcg"] == pytest.approx(1)
    assert perfect["anmrr"] == pytest.approx(0)
    rel = np.zeros((1, 40), dtype=bool)
    rel[0, -1] = True  # one relevant item, beyond K = min(4, 2) = 2
    assert retrieval_report(rel)["anmrr"] == pytest.approx(1)


def test_leave_one_out_and_polarity_map():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    labels = np.array([0, 0, 4, 5])
    polarity = [1, 1, 1, 1, 0, 0, 0, 0]
    ranking, _ = rank_gallery(emb, emb, exclude_self=True)
    assert ranking[0, 0] == 1 and ranking[0, -1] == 0  # a query never finds itself
    report = evaluate_retrieval(emb, labels, None, None, polarity)
    assert report["nn"] == pytest.approx(1)  # classes 4 and 5 have no same-class partner: left out
    assert report["queries"] == 2 and report["map2"] == pytest.approx(1.0)


def test_queries_against_a_gallery():
    gallery = np.eye(3, dtype=np.float32)
    report = evaluate_retrieval(np.array([[0, 1, 0]], dtype=np.float32), np.array([1]), gallery, np.array([0, 1, 1]),
                                [1, 0])
    # items 0 and 2 tie behind item 1: AP is the mean over both orders, ((1 + 2/3) / 2 + 1) / 2
    assert report["nn"] == 1 and report["map8"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_benchmark_scores_retrieval_per_fold(tmp_path):
    from helpers import TINY_BACKBONE, make_ldl_dataset
    from emolens.data import load_dataset
    from emolens.engine import TrainConfig
    from emolens.engine.benchmark import RETRIEVAL_HEADLINE, run_benchmark

    ds = load_dataset(make_ldl_dataset(tmp_path / "ds", per_class=6))
    results = run_benchmark(ds, ["apse:loss=npair"], "emotion", tmp_path / "out", folds=2,
                            config=TrainConfig(epochs=1, batch_size=8, freeze_backbone=True, workers=0),
                            backbone=TINY_BACKBONE, backbone_weights=None, progress=False, log=lambda *_: None,
                            retrieval=True)
    for fold in results["models"]["apse:loss=npair"]["folds"]:
        assert set(RETRIEVAL_HEADLINE) <= set(fold)
        assert 0 <= fold["map8"] <= 1 and 0 <= fold["anmrr"] <= 1


def test_tied_scores_never_depend_on_the_gallery_order():
    """80 identical embeddings over a class-sorted gallery: every ranking is one big tie, so mAP is the
    chance level (the class's share), whatever the gallery's order."""
    labels = np.repeat(np.arange(4), 20)
    same = np.ones((80, 8), dtype=np.float32) / np.sqrt(8)
    polarity = [1, 1, 0, 0, 1, 1, 0, 0]
    report = evaluate_retrieval(same, labels, None, None, polarity)

    def chance_ap(relevant: int, n: int) -> float:  # mean AP of random orders, by sampling
        rng = np.random.default_rng(0)
        aps = []
        for _ in range(4000):
            rel = rng.permutation(n) < relevant
            aps.append((np.cumsum(rel) / np.arange(1, n + 1))[rel].mean())
        return float(np.mean(aps))

    assert report["map8"] == pytest.approx(chance_ap(19, 79), abs=3e-3)  # 19 of the other 79 share the class
    assert report["map2"] == pytest.approx(chance_ap(39, 79), abs=3e-3)
    assert report["nn"] == pytest.approx(19 / 79) and report["ft"] == pytest.approx(19 / 79)
    order = np.random.default_rng(0).permutation(80)
    shuffled = evaluate_retrieval(same[order], labels[order], None, None, polarity)
    for key, value in report.items():
        assert shuffled[key] == pytest.approx(value), key
    gallery = evaluate_retrieval(same[:8], np.arange(8) % 4, same, labels, polarity)
    assert gallery["map8"] == pytest.approx(chance_ap(20, 80), abs=3e-3)


def test_tie_aware_ap_is_the_mean_over_orders():
    """A small case checked by enumerating every order of the tie."""
    from itertools import permutations

    scores = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    labels = np.array([1, 0, 1, 1, 0])
    want = []
    for order in permutations([1, 2, 3]):
        rel = labels[[0, *order, 4]] == 1
        hits = np.cumsum(rel)
        want.append((hits / np.arange(1, 6))[rel].mean())
    query, gallery = np.array([[1.0]]), scores.T
    report = evaluate_retrieval(query, np.array([1]), gallery, labels, [1, 0])
    assert report["map8"] == pytest.approx(np.mean(want))


def test_benchmark_on_the_papers_split_with_leave_one_out_retrieval(tmp_path, monkeypatch):
    import emolens.engine.benchmark as benchmark
    from helpers import TINY_BACKBONE, make_ldl_dataset
    from emolens.data import load_dataset
    from emolens.engine import TrainConfig

    calls = []
    real = benchmark.evaluate_retrieval

    def spy(queries, query_labels, gallery, gallery_labels, polarity, *args):
        calls.append((len(queries), gallery is None))
        return real(queries, query_labels, gallery, gallery_labels, polarity, *args)

    monkeypatch.setattr(benchmark, "evaluate_retrieval", spy)
    ds = load_dataset(make_ldl_dataset(tmp_path / "ds", per_class=10))
    results = benchmark.run_benchmark(ds, ["apse:loss=npair"], "emotion", tmp_path / "out", protocol="split",
                                      config=TrainConfig(epochs=1, batch_size=8, freeze_backbone=True, workers=0),
                                      backbone=TINY_BACKBONE, backbone_weights=None, progress=False,
                                      log=lambda *_: None, retrieval=True, retrieval_protocol="loo")
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    test = protocol["folds"][0]["test"]
    assert protocol["kind"] == "split" and results["folds"] == 1
    assert calls == [(len(test), True)]  # every test image queried the other test images
    assert 0 <= results["models"]["apse:loss=npair"]["mean"]["map8"] <= 1
    with pytest.raises(ValueError, match="another task, protocol"):
        benchmark.run_benchmark(ds, ["apse"], "emotion", tmp_path / "out", protocol="kfold", backbone=TINY_BACKBONE,
                                backbone_weights=None, progress=False, log=lambda *_: None)

import numpy as np
import pytest

from emolens import metrics as M
from emolens.taxonomy import MIKELS, wheel_steps

# 3 classes; truth / prediction chosen so every figure can be worked out by hand
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 2, 2, 0]


def test_confusion_matrix():
    cm = M.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 1]]


def test_per_class_scores_by_hand():
    s = M.per_class_scores(Y_TRUE, Y_PRED, 3)
    np.testing.assert_allclose(s["precision"], [3 / 4, 1 / 2, 1 / 2])
    np.testing.assert_allclose(s["recall"], [3 / 4, 1 / 2, 1 / 2])
    np.testing.assert_allclose(s["f1"], [3 / 4, 1 / 2, 1 / 2])
    assert s["support"].tolist() == [4, 2, 2]


def test_summary_scores_by_hand():
    r = M.classification_report(Y_TRUE, Y_PRED, 3)
    assert r["accuracy"] == pytest.approx(5 / 8)
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert r["macro_f1"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)


def test_scores_ignore_classes_absent_from_truth_and_prediction():
    # class 2 of 3 never appears: it must not drag the means down
    assert M.balanced_accuracy([0, 1], [0, 1], 3) == 1.0
    assert M.macro_f1([0, 1], [0, 1], 3) == 1.0
    # a class predicted but never true counts in macro-F1 with F1 = 0
    assert M.macro_f1([0, 0], [0, 2], 3) == pytest.approx((2 / 3 + 0) / 2)


def test_majority_guess_has_high_accuracy_but_low_balanced_accuracy():
    y = [0] * 9 + [1]
    r = M.classification_report(y, [0] * 10, 2)
    assert r["accuracy"] == 0.9 and r["balanced_accuracy"] == 0.5 and r["macro_f1"] == pytest.approx(0.9 / 1.9 * 2 / 2)


def test_polarity_report():
    r = M.polarity_report([1, 1, 1, 0, 0], [1, 0, 1, 0, 1])
    assert r["accuracy"] == pytest.approx(3 / 5) and r["positive_recall"] == pytest.approx(2 / 3)


def test_distribution_metrics_by_hand():
    t = np.array([[0.5, 0.5, 0.0]])
    p = np.array([[0.25, 0.5, 0.25]])
    assert M.kl_divergence(t, p) == pytest.approx(0.5 * np.log(2), rel=1e-6)
    assert M.chebyshev(t, p) == pytest.approx(0.25)
    assert M.canberra(t, p) == pytest.approx(0.25 / 0.75 + 0 + 1)
    assert M.clark(t, p) == pytest.approx(np.sqrt((0.25 / 0.75) ** 2 + 1))
    assert M.cosine(t, p) == pytest.approx(0.375 / (np.sqrt(0.5) * np.sqrt(0.375)))
    assert M.intersection(t, p) == pytest.approx(0.75)


def test_identical_distributions_are_perfect():
    d = np.array([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0]])
    r = M.distribution_report(d, d)
    assert r["kl"] == pytest.approx(0, abs=1e-9) and r["chebyshev"] == 0 and r["clark"] == 0 and r["canberra"] == 0
    assert r["cosine"] == pytest.approx(1) and r["intersection"] == pytest.approx(1)


def test_distribution_shape_mismatch():
    with pytest.raises(ValueError):
        M.kl_divergence([[0.5, 0.5]], [[1.0, 0, 0]])


def test_wheel_errors_weigh_mistakes_by_distance():
    steps = wheel_steps(MIKELS)
    a = MIKELS.index
    near = M.wheel_errors([a("excitement")], [a("awe")], steps)  # neighbours
    far = M.wheel_errors([a("excitement")], [a("disgust")], steps)
    assert near["wheel_distance"] == pytest.approx(1 / 4) and far["wheel_distance"] > near["wheel_distance"]
    both = M.wheel_errors([a("awe"), a("awe"), a("amusement")], [a("awe"), a("contentment"), a("sadness")], steps)
    assert both["wheel_distance"] == pytest.approx((0 + 1 / 4 + 1) / 3)
    assert both["wheel_score"] == pytest.approx(1 - (1.25 / 3))
    assert both["misclassification_distance"] == pytest.approx(1.25 / 2)
    assert np.isnan(M.wheel_errors([0], [0], steps)["misclassification_distance"])


def test_regression_figures_match_scipy_and_hand_values():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    t = rng.normal(size=50)
    p = 0.5 * t + rng.normal(scale=0.3, size=50) + 0.2
    r = M.regression_report(t, p)
    assert r["pearson"] == pytest.approx(pearsonr(t, p)[0]) and r["spearman"] == pytest.approx(spearmanr(t, p)[0])
    assert r["mae"] == pytest.approx(np.abs(p - t).mean()) and r["rmse"] == pytest.approx(np.sqrt(((p - t) ** 2).mean()))
    # CCC by hand: 2 cov / (var t + var p + (mean t - mean p)^2), population moments
    assert M.concordance_correlation([1, 2, 3], [2, 3, 4]) == pytest.approx(2 * (2 / 3) / (2 / 3 + 2 / 3 + 1))
    assert M.concordance_correlation(t, t) == pytest.approx(1.0)
    assert M.concordance_correlation(t, 2 * t)  < 0.9 < M.regression_report(t, 2 * t)["pearson"]  # scale is punished
    with_gap = M.regression_report(np.r_[t, np.nan], np.r_[p, 100.0])  # unrated targets are left out
    assert with_gap["mae"] == pytest.approx(r["mae"])


def test_affect_report_names_dimensions_and_reports_on_the_datasets_scale():
    from emolens.taxonomy import OASIS_SCALE

    t = np.array([[-1.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    p = t + np.array([[0.5, 0.0], [0.0, 0.0], [-0.5, 0.0]])
    common = M.affect_report(t, p)
    on_scale = M.affect_report(t, p, OASIS_SCALE)
    assert common["valence_mae"] == pytest.approx(1 / 3) and on_scale["valence_mae"] == pytest.approx(1.0)  # x3
    assert on_scale["valence_pearson"] == pytest.approx(common["valence_pearson"])
    assert common["arousal_ccc"] == pytest.approx(1.0)

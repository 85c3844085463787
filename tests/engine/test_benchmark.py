import pytest

from emolens.engine.benchmark import summarise


def test_fold_figures_are_summarised_by_mean_and_sample_std():
    """k-fold spread is the sample standard deviation (n - 1): 0.5..0.9 has std sqrt(0.1 / 4), not sqrt(0.1 / 5)."""
    folds = [{"accuracy": a, "kl": 1.0} for a in (0.5, 0.6, 0.7, 0.8, 0.9)]
    mean, std = summarise(folds)
    assert mean["accuracy"] == pytest.approx(0.7) and std["accuracy"] == pytest.approx(0.15811388300841897)
    assert std["kl"] == 0.0


def test_a_figure_missing_from_a_fold_is_left_out_and_one_fold_has_no_spread():
    mean, std = summarise([{"accuracy": 0.5, "mAP8": 0.3}, {"accuracy": 0.7}])
    assert set(mean) == {"accuracy"} and mean["accuracy"] == pytest.approx(0.6)
    assert summarise([{"accuracy": 0.5}])[1] == {"accuracy": 0.0}

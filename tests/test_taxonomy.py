import numpy as np
import pytest

from emolens.taxonomy import (
    EMOTION6, EMOTIONROI, MIKELS, MIKELS_WHEEL_ORDER, POLARITY, WEBEMO, Taxonomy, dominant_label, emotion_distance,
    get_taxonomy, labels_to_polarity, votes_to_distribution, wheel_distribution, wheel_steps,
)


def test_mikels_order_and_polarity_are_explicit():
    assert MIKELS.classes == ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")
    assert MIKELS.polarity == (1, 1, 1, 1, 0, 0, 0, 0)
    assert EMOTION6.classes == ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
    assert EMOTION6.polarity[EMOTION6.index("surprise")] is None
    assert EMOTIONROI.num_classes == 6 and WEBEMO.num_classes == 7 and POLARITY.classes == ("negative", "positive")


def test_index_is_case_insensitive_and_unknown_names_fail():
    assert MIKELS.index("Awe") == 1
    with pytest.raises(KeyError, match="joy"):
        MIKELS.index("joy")


def test_taxonomy_validates_and_round_trips():
    with pytest.raises(ValueError):
        Taxonomy("bad", ("a", "a"), (1, 0))
    with pytest.raises(ValueError):
        Taxonomy("bad", ("a", "b"), (1,))
    assert Taxonomy.from_dict(EMOTION6.to_dict()) == EMOTION6
    assert get_taxonomy("MIKELS") is MIKELS


def test_polarity_distribution_drops_ambiguous_mass():
    d = np.array([0.1, 0.0, 0.0, 0.3, 0.0, 0.4, 0.2])  # anger, joy, surprise, neutral
    neg, pos = EMOTION6.polarity_distribution(d)
    assert neg == pytest.approx(0.25) and pos == pytest.approx(0.75)
    assert EMOTION6.with_polarity(surprise=1).polarity_distribution(d)[1] == pytest.approx(0.7 / 0.8)


def test_votes_to_distribution_and_errors():
    np.testing.assert_allclose(votes_to_distribution([1, 3, 0]), [0.25, 0.75, 0])
    with pytest.raises(ValueError, match="all zero"):
        votes_to_distribution([0, 0])
    with pytest.raises(ValueError):
        votes_to_distribution([1, -1])


def test_dominant_label_breaks_ties_towards_first_class_and_counts_them():
    d = np.array([[0.2, 0.4, 0.4], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    dom = dominant_label(d)
    assert dom.labels.tolist() == [1, 0, 0]
    assert dom.ties == 2
    np.testing.assert_allclose(dom.probability, [0.4, 0.5, 1 / 3])


def test_labels_to_polarity_marks_ambiguous():
    assert labels_to_polarity([0, 3, 5], EMOTION6).tolist() == [0, 1, -1]
    assert labels_to_polarity(range(8), MIKELS).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_wheel_distance_matrix():
    d = emotion_distance()
    assert d.shape == (8, 8)
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_array_equal(np.diag(d), 1)
    assert d.max() == 5  # opposite emotions: four steps
    a = MIKELS.index
    assert d[a("amusement"), a("excitement")] == 2  # neighbours on the wheel
    assert d[a("amusement"), a("anger")] == 2  # the wheel wraps round
    assert d[a("amusement"), a("sadness")] == 5
    assert d[a("awe"), a("disgust")] == 4
    # every emotion has exactly two neighbours and one opposite
    assert all((row == 2).sum() == 2 and (row == 5).sum() == 1 for row in d)


def test_wheel_order_is_replaceable_and_checked():
    custom = list(MIKELS_WHEEL_ORDER[1:]) + [MIKELS_WHEEL_ORDER[0]]  # same circle, rotated
    np.testing.assert_array_equal(wheel_steps(MIKELS, custom), wheel_steps(MIKELS))
    with pytest.raises(ValueError):
        wheel_steps(MIKELS, ["amusement"] * 8)


def test_wheel_distribution_eq4():
    j = MIKELS.index("contentment")
    f = wheel_distribution(j, 0.6)
    assert f.sum() == pytest.approx(1.0)
    assert f[j] == pytest.approx(0.6)
    d = emotion_distance()[j]
    others = [i for i in range(8) if i != j]
    # closer emotions get more mass: ordering by distance is ordering by probability (descending)
    for a in others:
        for b in others:
            if d[a] < d[b]:
                assert f[a] > f[b]
            if d[a] == d[b]:
                assert f[a] == pytest.approx(f[b])
    # by hand: inverse distances of the others, normalised, times 0.4
    inv = np.array([1 / d[i] for i in others])
    np.testing.assert_allclose(f[others], 0.4 * inv / inv.sum())


def test_wheel_distribution_batched():
    f = wheel_distribution(np.array([0, 7]), np.array([1.0, 0.5]))
    assert f.shape == (2, 8)
    np.testing.assert_allclose(f.sum(1), 1.0)
    assert f[0, 0] == 1.0 and f[0, 1:].sum() == 0.0

import numpy as np
import pytest

from helpers import write_image
from emolens.data import Protocol, load_dataset, make_protocol, stratified_kfold, stratified_split


def labels():
    return np.repeat(np.arange(4), [50, 30, 15, 5])


def test_split_is_stratified_disjoint_complete_and_seeded():
    y = labels()
    f = stratified_split(y, seed=3)
    parts = [np.array(p) for p in (f.train, f.val, f.test)]
    assert sum(len(p) for p in parts) == len(y)
    assert len(np.unique(np.concatenate(parts))) == len(y)
    assert len(f.train) == pytest.approx(0.8 * len(y), abs=4)
    for c, n in zip(range(4), [50, 30, 15, 5]):
        assert abs((y[parts[2]] == c).sum() - 0.15 * n) <= 1
    assert stratified_split(y, seed=3) == f
    assert stratified_split(y, seed=4) != f


def test_kfold_tests_cover_every_sample_once_and_val_is_inside_train_part():
    y = labels()
    folds = stratified_kfold(y, k=5, seed=0)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests.tolist()) == list(range(len(y)))
    for f in folds:
        assert not set(f.train) & set(f.val) and not set(f.train) & set(f.test) and not set(f.val) & set(f.test)
        assert len(f.train) + len(f.val) + len(f.test) == len(y)
        assert (y[f.test] == 0).sum() == 10  # 50 / 5 per fold
    assert stratified_kfold(y, k=5, seed=0) == folds


def small_dataset(tmp_path):
    for c, n in (("amusement", 6), ("awe", 6), ("fear", 6), ("sadness", 6)):
        for i in range(n):
            write_image(tmp_path / c / f"{i}.png")
    return load_dataset(f"folder={tmp_path}:taxonomy=mikels")


def test_protocol_saves_loads_and_notices_a_changed_dataset(tmp_path):
    ds = small_dataset(tmp_path / "d")
    proto = make_protocol(ds, "kfold", seed=1, k=3)
    proto.save(tmp_path / "p.json")
    again = Protocol.load(tmp_path / "p.json", ds)
    assert again.folds == proto.folds and again.seed == 1 and again.params["k"] == 3
    write_image(tmp_path / "d" / "awe" / "new.png")
    with pytest.raises(ValueError, match="another sample list"):
        Protocol.load(tmp_path / "p.json", load_dataset(f"folder={tmp_path / 'd'}:taxonomy=mikels"))


def test_polarity_protocol_is_stratified_on_polarity_and_indexes_the_dataset(tmp_path):
    ds = small_dataset(tmp_path)
    proto = make_protocol(ds, "split", task="polarity", fractions=(0.5, 0.0, 0.5))
    f = proto.folds[0]
    pol = ds.polarities
    assert (pol[f.test] == 1).sum() == 6 and (pol[f.test] == 0).sum() == 6
    assert proto.params["task"] == "polarity"


def test_polarity_task_drops_ambiguous_samples(tmp_path):
    for c in ("joy", "surprise", "fear"):
        for i in range(4):
            write_image(tmp_path / c / f"{i}.png")
    ds = load_dataset(f"folder={tmp_path}:taxonomy=emotion6")
    proto = make_protocol(ds, "kfold", k=2, task="polarity")
    used = set().union(*[set(f.train + f.val + f.test) for f in proto.folds])
    assert all(ds.samples[i].path.parent.name != "surprise" for i in used) and len(used) == 8
    with pytest.raises(ValueError, match="no emotion distributions"):
        make_protocol(ds, task="distribution")


def test_a_split_that_leaves_a_part_empty_is_refused_with_the_counts():
    with pytest.raises(ValueError, match="split of 6 images leaves no validation"):
        stratified_split([0, 0, 0, 1, 1, 1])
    fold = stratified_split([0] * 20 + [1] * 20)
    assert fold.val and fold.test and fold.train
    assert stratified_split([0, 1] * 5, fractions=(0.8, 0.0, 0.2)).val == []  # no part asked for: none refused

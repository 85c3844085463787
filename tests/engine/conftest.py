import pytest

from helpers import make_ldl_dataset
from emolens.data import load_dataset, make_protocol


@pytest.fixture
def tiny(tmp_path):
    """A tiny Flickr_LDL-style dataset (24 images) and a 60/20/20 split of it."""
    ds = load_dataset(make_ldl_dataset(tmp_path / "data", per_class=6))
    return ds, make_protocol(ds, "split", seed=0, fractions=(0.6, 0.2, 0.2)).folds[0]

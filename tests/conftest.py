import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("EMOLENS_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Exports the tests make go to a folder of their own, never the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("emolens-cache")
        mp.setenv("EMOLENS_CACHE", str(folder))
        yield folder


@pytest.fixture
def tiny(tmp_path):
    """A tiny Flickr_LDL-style dataset (24 images) and a 60/20/20 split of it."""
    from helpers import make_ldl_dataset
    from emolens.data import load_dataset, make_protocol

    ds = load_dataset(make_ldl_dataset(tmp_path / "data", per_class=6))
    return ds, make_protocol(ds, "split", seed=0, fractions=(0.6, 0.2, 0.2)).folds[0]

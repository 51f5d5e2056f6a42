from __future__ import annotations

import pytest

from dnnmod.data import load_dataset, make_splits, prepare


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data directory with the bundled digits dataset prepared and split with seed 0."""
    root = tmp_path_factory.mktemp("data")
    prepare("digits", root)
    make_splits(root, "digits", seed=0)
    return root


@pytest.fixture(scope="session")
def digits(data_root):
    return load_dataset(data_root, "digits", seed=0)

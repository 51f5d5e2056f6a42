from __future__ import annotations

import pytest

from dnnmod.data import DatasetSplits, load_dataset, make_splits, prepare


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


@pytest.fixture(scope="session")
def small_digits(digits):
    """A few hundred digits: enough to train for a test, small enough to take a second."""
    return DatasetSplits(train=digits.train.take(range(320)), val=digits.val.take(range(160)),
                         test=digits.test.take(range(160)), meta=digits.meta)


class Interrupted(Exception):
    """Stands for a job killed right after a checkpoint was written."""


@pytest.fixture
def interrupt_after_epoch(monkeypatch):
    """``arm(module, epoch)`` makes the next checkpoint of ``epoch`` (0-based step: epoch or
    generation) written through ``module.save_checkpoint`` raise :class:`Interrupted` once it
    is on disk; ``undo()`` disarms it. Arm :mod:`dnnmod.resumable` to interrupt any
    :class:`~dnnmod.resumable.ResumableLoop`."""

    def arm(module, epoch: int):
        save = module.save_checkpoint

        def save_then_die(path, checkpoint):
            save(path, checkpoint)
            if checkpoint["step"] == epoch:
                raise Interrupted

        monkeypatch.setattr(module, "save_checkpoint", save_then_die)
        return monkeypatch

    return arm

from __future__ import annotations

import pytest
import torch
from torch import nn
from workflow_helpers import TINY, make_project, snakemake, write_config

from dnnmod.data import DatasetSplits, load_dataset, make_splits, prepare
from dnnmod.models import build_model
from dnnmod.training.model_io import save_model
from dnnmod.training.objectives import get_objective
from dnnmod.training.train import Recipe, train


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


@pytest.fixture(scope="session")
def small_simcnn(small_digits):
    """A width-0.0625 simcnn trained one epoch on ``small_digits`` (copy it before changing it)."""
    torch.manual_seed(0)
    net = build_model("simcnn", small_digits.num_classes, width=0.0625)
    return train(net, small_digits, Recipe(epochs=1, batch_size=64, lr=0.05), seed=0).model


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A project with the TINY study run to the end, once per session. Tests only read it,
    or copy it (``workflow_helpers.copy_project``) to run more on top."""
    project = make_project(tmp_path_factory.mktemp("tiny_study") / "project")
    configfile = write_config(project, TINY)
    run = snakemake(project, "--cores", "2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    return project


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


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so a norm's shift is far from zero
    and a leak of dropped channels through it would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.normal_(1.0, 0.3, generator=generator)
                module.bias.normal_(0.0, 0.5, generator=generator)
    return model.eval()


def train_modular(kind: str, data, directory, width: float = 0.0625):
    """A simcnn trained one epoch with training kind ``kind`` and saved under ``directory``:
    (TrainResult, weights path)."""
    torch.manual_seed(0)
    objective = get_objective(kind)
    result = train(build_model("simcnn", data.num_classes, width=width), data,
                   Recipe(epochs=1, batch_size=64, lr=0.05), seed=0, objective=objective)
    path = directory / "model.safetensors"
    save_model(path, result.model, {
        "arch": "simcnn", "model": "simcnn", "dataset": "digits",
        "num_classes": data.num_classes, "width": width, "options": {}, "training": kind,
        "objective": objective.hyperparameters, "seed": 0,
        "normalization": {"mean": data.train.mean.tolist(), "std": data.train.std.tolist()}})
    return result, path

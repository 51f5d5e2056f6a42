"""Training: the resumable loop, recipes, training kinds (objectives), determinism, model
artifacts."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import Interrupted
from torch import nn
from workflow_helpers import TINY, make_project, snakemake_process, write_config

import dnnmod.resumable
from dnnmod.cli import main
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.resumable import ResumableLoop, epoch_generator
from dnnmod.study import check_study_config
from dnnmod.training.model_io import load_model, model_record, save_model
from dnnmod.training.objectives import OBJECTIVES, Objective, get_objective, register_objective
from dnnmod.training.train import Recipe, augment, train

RECIPE = Recipe.from_dict({"epochs": 3, "batch_size": 64, "lr": 0.05, "nesterov": True,
                           "augmentation": ["crop", "flip"], "selection": "best_val"})


def _fresh_model(seed=0):
    torch.manual_seed(seed)
    return build_model("vgg16", 10, width=0.0625)  # has dropout: exercises the global RNG


def test_resume_after_interruption_gives_the_same_weights(small_digits, tmp_path,
                                                          interrupt_after_epoch):
    reference = train(_fresh_model(), small_digits, RECIPE, seed=3, checkpoint=tmp_path / "a.pt",
                      progress=False)
    armed = interrupt_after_epoch(dnnmod.resumable, epoch=1)
    with pytest.raises(Interrupted):
        train(_fresh_model(), small_digits, RECIPE, seed=3, checkpoint=tmp_path / "b.pt",
              progress=False)
    armed.undo()
    resumed = train(_fresh_model(seed=99), small_digits, RECIPE, seed=3,
                    checkpoint=tmp_path / "b.pt", progress=False)

    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert resumed.selected_epoch == reference.selected_epoch
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [r.val_accuracy for r in resumed.history] == [r.val_accuracy for r in reference.history]


def test_same_seed_same_weights_other_seed_differs(small_digits):
    recipe = Recipe.from_dict({"epochs": 1, "batch_size": 128, "lr": 0.05})
    first = train(_fresh_model(), small_digits, recipe, seed=1, progress=False).model.state_dict()
    again = train(_fresh_model(), small_digits, recipe, seed=1, progress=False).model.state_dict()
    other = train(_fresh_model(), small_digits, recipe, seed=2, progress=False).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_checkpoint_of_another_run_is_not_resumed(small_digits, tmp_path, caplog):
    checkpoint = tmp_path / "run.pt"
    recipe = Recipe.from_dict({"epochs": 1, "batch_size": 128, "lr": 0.05})
    train(_fresh_model(), small_digits, recipe, seed=1, checkpoint=checkpoint, progress=False)
    longer = Recipe.from_dict({"epochs": 2, "batch_size": 128, "lr": 0.05})
    with caplog.at_level("WARNING"):
        result = train(_fresh_model(), small_digits, longer, seed=1, checkpoint=checkpoint,
                       progress=False)
    assert "another run configuration" in caplog.text
    assert [r.epoch for r in result.history] == [1, 2]


def test_torn_checkpoint_is_ignored(small_digits, tmp_path, caplog):
    checkpoint = tmp_path / "torn.pt"
    checkpoint.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    recipe = Recipe.from_dict({"epochs": 1, "batch_size": 128, "lr": 0.05})
    with caplog.at_level("WARNING"):
        result = train(_fresh_model(), small_digits, recipe, seed=1, checkpoint=checkpoint,
                       progress=False)
    assert "unreadable checkpoint" in caplog.text
    assert len(result.history) == 1


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 0}, "epochs"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"augmentation": ["rotate"]}, "augmentation"),
    ({"warmup": 5}, "unknown keys"),
])
def test_bad_recipe_is_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"epochs": 1, "batch_size": 8, "lr": 0.1, **bad})


def test_augment_keeps_shape_and_content_statistics():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(x, ("crop", "flip"), torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape
    unchanged = augment(x, (), torch.Generator().manual_seed(0))
    assert torch.equal(unchanged, x)


def _meta(arch="simcnn", dataset="digits"):
    """The metadata every model file needs (see records.REQUIRED_KEYS)."""
    return {"arch": arch, "num_classes": 10, "width": 0.0625, "options": {},
            "dataset": dataset, "training": "st", "objective": {},
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


def _saved(tmp_path, arch="simcnn", dataset="digits"):
    model = build_model(arch, 10, width=0.0625)
    path = tmp_path / arch / "model.safetensors"
    save_model(path, model, _meta(arch, dataset))
    return model, path


def test_model_round_trip(tmp_path):
    model, path = _saved(tmp_path)
    loaded, meta = load_model(path, arch="simcnn", dataset="digits")
    assert meta["arch"] == "simcnn"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))


def test_model_of_another_architecture_or_dataset_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(ArtifactError, match="holds a simcnn trained on digits"):
        load_model(path, arch="vgg16")
    with pytest.raises(ArtifactError, match="dataset of 'shapes'"):
        load_model(path, dataset="shapes")


def test_weights_swapped_for_another_architecture_are_refused(tmp_path):
    _, simcnn_path = _saved(tmp_path, "simcnn")
    _, vgg_path = _saved(tmp_path, "vgg16")
    simcnn_path.write_bytes(vgg_path.read_bytes())
    with pytest.raises(ArtifactError, match="does not match the hash"):
        load_model(simcnn_path)
    with pytest.raises(ArtifactError, match="weights do not fit"):
        load_model(simcnn_path, verify_hash=False)


def test_truncated_weights_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError):
        load_model(path, verify_hash=False)


def test_train_command_writes_weights_and_metadata(data_root, tmp_path, capsys):
    out = tmp_path / "m" / "model.safetensors"
    recipe = json.dumps({"epochs": 2, "batch_size": 64, "lr": 0.05})
    status = main(["train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
                   "--recipe", recipe, "--seed", "0", "--data-root", str(data_root),
                   "--device", "cpu", "--checkpoint", str(tmp_path / "ck.pt"),
                   "--out", str(out)])
    assert status == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["arch"] == "simcnn" and meta["dataset"] == "digits" and meta["seed"] == 0
    assert meta["device"] == "cpu" and len(meta["history"]) == 2
    assert len(meta["config_hash"]) == 16 and meta["wall_seconds"] > 0
    assert 0 <= meta["metrics"]["test_accuracy"] <= 100
    assert meta["training"] == "st" and meta["objective"] == {}
    assert len(meta["normalization"]["mean"]) == len(meta["normalization"]["std"]) == 3
    assert set(meta["history"][0]["losses"]) == {"cross_entropy"}
    assert not (tmp_path / "ck.pt").exists()  # a finished run drops its resume state
    assert not list(out.parent.glob("*.tmp"))


def test_train_command_names_a_bad_architecture(data_root, tmp_path, capsys):
    status = main(["train", "--dataset", "digits", "--arch", "alexnet", "--recipe",
                   '{"epochs": 1, "batch_size": 8, "lr": 0.1}', "--seed", "0", "--data-root",
                   str(data_root), "--device", "cpu", "--out", str(tmp_path / "x.safetensors")])
    assert status == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_diverged_training_is_an_error_and_saves_no_model(data_root, tmp_path, capsys):
    """A learning rate this model cannot train with turns the loss into NaN: the command fails
    naming the epoch and the rate instead of saving a model at chance accuracy."""
    out = tmp_path / "m" / "model.safetensors"
    status = main(["train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
                   "--recipe", '{"epochs": 3, "batch_size": 64, "lr": 1e12}', "--seed", "0",
                   "--data-root", str(data_root), "--device", "cpu", "--out", str(out)])
    assert status == 2
    message = capsys.readouterr().err
    assert "st training diverged: epoch 1/3 ended with mean loss nan" in message
    assert "learning rate 1e+12" in message and "lower the recipe's lr" in message
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_full_disk_is_reported_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    import dnnmod.artifacts as artifacts

    def no_space(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts.os, "fsync", no_space)
    model = build_model("simcnn", 10, width=0.0625)
    target = tmp_path / "m.safetensors"
    with pytest.raises(ArtifactError, match="no space left on the device"):
        save_model(target, model, _meta())
    assert list(tmp_path.iterdir()) == []


# The resumable loop on its own: what training and every iterative search rely on.


def _random_walk(path, fingerprint="walk", steps=4, pause=0.0):
    """A loop whose state is a sum of one draw per step; returns (loop, sum, steps it ran)."""
    loop = ResumableLoop(path, fingerprint, steps, desc="walk", progress=False)
    total = loop.state["total"] if loop.state is not None else 0.0
    ran = []
    for step in loop.steps():
        total += torch.rand(1, generator=epoch_generator(7, step)).item()
        ran.append(step)
        time.sleep(pause)
        loop.save(step, {"total": total}, postfix={"total": f"{total:.2f}"})
    return loop, total, ran


def test_loop_resumes_after_its_last_checkpoint_and_replays_exactly(tmp_path, caplog,
                                                                     interrupt_after_epoch):
    _, reference, _ = _random_walk(None)
    checkpoint = tmp_path / "walk.pt"
    armed = interrupt_after_epoch(dnnmod.resumable, epoch=1)
    with pytest.raises(Interrupted):
        _random_walk(checkpoint, pause=0.05)
    armed.undo()
    saved_seconds = torch.load(checkpoint, weights_only=True)["wall_seconds"]
    with caplog.at_level("INFO"):
        loop, resumed, ran = _random_walk(checkpoint)
    assert ran == [2, 3] and resumed == reference
    assert f"walk: resuming from {checkpoint} after epoch 2" in caplog.text
    assert loop.wall_seconds >= saved_seconds >= 0.1  # the interrupted run's time counts


def test_loop_ignores_a_checkpoint_of_another_run_or_layout(tmp_path, caplog):
    checkpoint = tmp_path / "walk.pt"
    _random_walk(checkpoint, fingerprint="one")
    with caplog.at_level("WARNING"):
        loop, _, ran = _random_walk(checkpoint, fingerprint="other")
    assert "another run configuration" in caplog.text
    assert loop.state is None and ran == [0, 1, 2, 3]
    torch.save({"fingerprint": "walk", "epoch": 3}, checkpoint)  # a pre-ResumableLoop layout
    with caplog.at_level("WARNING"):
        _, _, ran = _random_walk(checkpoint)
    assert "another layout" in caplog.text and ran == [0, 1, 2, 3]


# Training kinds: an approach file registers its own objective; training, model files and the
# command line serve it unchanged.


class _ScaledLogits(nn.Module):
    """A base network plus one trainable part, as modular training adds (e.g. mask generators)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.log_scale = nn.Parameter(0.1 * torch.randn(()))

    def forward(self, x):
        return self.base(x) * self.log_scale.exp()


class ActivationPenalty(Objective):
    """Cross-entropy + weight × mean squared conv activation, captured by forward hooks."""

    name = "test_activation_l2"
    defaults = {"weight": 0.01}

    def prepare(self, model):
        return _ScaledLogits(model)

    @contextmanager
    def capture(self, model):
        captured = {}

        def keep(name):
            return lambda module, inputs, output: captured.__setitem__(name, output)

        handles = [module.register_forward_hook(keep(name))
                   for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def loss(self, logits, labels, captured):
        cross_entropy = nn.functional.cross_entropy(logits, labels)
        penalty = torch.stack([a.float().pow(2).mean() for a in captured.values()]).mean()
        return (cross_entropy + self.hyperparameters["weight"] * penalty,
                {"cross_entropy": cross_entropy.item(), "activation_l2": penalty.item()})


@pytest.fixture
def activation_penalty():
    register_objective(ActivationPenalty)
    yield ActivationPenalty.name
    del OBJECTIVES[ActivationPenalty.name]


def test_registered_training_kind_trains_saves_and_reloads(activation_penalty, small_digits,
                                                           tmp_path):
    objective = get_objective(activation_penalty, {"weight": 0.05})
    recipe = Recipe(epochs=2, batch_size=64, lr=0.05)
    torch.manual_seed(0)
    result = train(build_model("simcnn", 10, width=0.0625), small_digits, recipe, seed=0,
                   objective=objective, progress=False)
    for record in result.history:  # the objective's loss is what was minimised, by parts
        assert set(record.losses) == {"cross_entropy", "activation_l2"}
        assert record.train_loss == pytest.approx(
            record.losses["cross_entropy"] + 0.05 * record.losses["activation_l2"])

    path = tmp_path / "model.safetensors"
    save_model(path, result.model, model_record(
        arch="simcnn", name="simcnn", width=0.0625, options={}, dataset="digits",
        data=small_digits, seed=0,
        objective=objective, recipe=recipe, result=result, accuracies={"test": 0.0},
        device="cpu"))
    loaded, meta = load_model(path)
    assert meta["training"] == activation_penalty and meta["objective"] == {"weight": 0.05}
    assert meta["normalization"] == {"mean": small_digits.train.mean.tolist(),
                                     "std": small_digits.train.std.tolist()}
    assert isinstance(loaded, _ScaledLogits)  # prepare applied before the weights went in
    x, _ = small_digits.test.float_batch(torch.arange(16))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


def test_train_command_trains_a_registered_kind_and_e1_lists_it(activation_penalty, data_root,
                                                                  tmp_path):
    def train_command(*training):
        out = tmp_path / (training[1] if training else "st") / "model.safetensors"
        status = main(["train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
                       "--recipe", '{"epochs": 1, "batch_size": 128, "lr": 0.05}', *training,
                       "--seed", "0", "--data-root", str(data_root), "--device", "cpu",
                       "--out", str(out)])
        assert status == 0
        return out

    modular = train_command("--training", activation_penalty, "--objective", '{"weight": 0.5}')
    model, meta = load_model(modular)
    assert isinstance(model, _ScaledLogits)
    assert meta["training"] == activation_penalty and meta["objective"] == {"weight": 0.5}
    assert set(meta["history"][0]["losses"]) == {"cross_entropy", "activation_l2"}

    table = tmp_path / "e1.csv"
    assert main(["table", "base-models", "--models", str(train_command()), str(modular),
                 "--out", str(table)]) == 0
    rows = table.read_text().splitlines()
    assert rows[0].startswith("training,") and len(rows) == 3
    assert {row.split(",")[0] for row in rows[1:]} == {"st", activation_penalty}


@pytest.mark.parametrize("arguments, message", [
    (["--training", "nope"], "unknown training kind 'nope'; known: moda, mwt, st"),
    (["--objective", '{"alpha": 1}'], "objectives.st: unknown keys ['alpha']"),
])
def test_train_command_names_a_bad_training_kind_or_hyperparameter(arguments, message,
                                                                    data_root, tmp_path, capsys):
    status = main(["train", "--dataset", "digits", "--arch", "simcnn", "--recipe",
                   '{"epochs": 1, "batch_size": 8, "lr": 0.1}', "--seed", "0", "--data-root",
                   str(data_root), "--device", "cpu", "--out", str(tmp_path / "x.safetensors"),
                   *arguments])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("objectives, message", [
    ({"nope": {}}, "objectives.nope: unknown training kind 'nope'"),
    ({"st": {"alpha": 1}}, "objectives.st: unknown keys ['alpha']"),
])
def test_study_objectives_are_checked_by_name(objectives, message):
    with pytest.raises(ConfigError) as error:
        check_study_config({**TINY, "objectives": objectives})
    assert message in str(error.value)


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.pop("normalization"), "lacks ['normalization']"),
    (lambda meta: meta.update(training="nope"), "unknown training kind 'nope'"),
])
def test_model_file_without_what_rebuilds_it_is_refused(change, message, tmp_path):
    _, path = _saved(tmp_path)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError) as error:
        load_model(path)
    assert message in str(error.value) and str(meta_path) in str(error.value)


# The workflow: which (dataset, model, training kind) it trains, and how.

REGISTER_TOY_KIND = '''
from dnnmod.approaches import APPROACHES
from dnnmod.approaches.gradsplitter import GradSplitter
from dnnmod.training.objectives import StandardTraining, register_objective


@register_objective
class ToyTraining(StandardTraining):
    name = "toy"
    defaults = {"weight": 1.0}


class ToySplitter(GradSplitter):
    name = "toysplitter"
    training = "toy"


APPROACHES["toysplitter"] = ToySplitter()
'''


def test_workflow_trains_each_base_model_for_every_kind_an_approach_decomposes(tmp_path):
    # What an approach file with its own training kind (MwT, MODA) will do when imported.
    project = make_project(tmp_path / "project")
    snakefile = project / "Snakefile"
    snakefile.write_text(REGISTER_TOY_KIND + snakefile.read_text())
    config = {**TINY, "objectives": {"toy": {"weight": 0.5}},
              "modularize": [{"approach": "toysplitter", "dataset": "digits",
                              "models": ["simcnn"]}]}
    # Its own process: the Snakefile's registrations would otherwise stay in this one's
    # registries, where later tests list every approach.
    run = snakemake_process(project, "-n", "-p", "--configfile", write_config(project, config))
    assert run.returncode == 0, run.stdout[-3000:]
    models = "results/tiny/models/digits/simcnn"
    table_job = run.stdout[run.stdout.index("rule table_base_models"):].split("\n\n")[0]
    assert f"{models}/st/seed0/model.safetensors" in table_job
    assert f"{models}/toy/seed0/model.safetensors" in table_job
    assert "--training toy --objective '{\"weight\": 0.5}'" in run.stdout
    assert "--training st --objective '{}'" in run.stdout
    modularize_job = run.stdout[run.stdout.index("rule modularize"):].split("\n\n")[0]
    assert f"{models}/toy/seed0/model.safetensors" in modularize_job

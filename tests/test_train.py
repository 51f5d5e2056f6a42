"""Standard training: recipes, resumable checkpoints, determinism, model artifacts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Interrupted

import dnnmod.training.train as training
from dnnmod.cli import main
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.training.model_io import load_model, save_model
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
    armed = interrupt_after_epoch(training, epoch=1)
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


def _saved(tmp_path, arch="simcnn", dataset="digits"):
    model = build_model(arch, 10, width=0.0625)
    path = tmp_path / arch / "model.safetensors"
    save_model(path, model, {"arch": arch, "num_classes": 10, "width": 0.0625, "options": {},
                             "dataset": dataset})
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
    assert not (tmp_path / "ck.pt").exists()  # a finished run drops its resume state
    assert not list(out.parent.glob("*.tmp"))


def test_train_command_names_a_bad_architecture(data_root, tmp_path, capsys):
    status = main(["train", "--dataset", "digits", "--arch", "alexnet", "--recipe",
                   '{"epochs": 1, "batch_size": 8, "lr": 0.1}', "--seed", "0", "--data-root",
                   str(data_root), "--device", "cpu", "--out", str(tmp_path / "x.safetensors")])
    assert status == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


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
        save_model(target, model, {"arch": "simcnn", "num_classes": 10, "width": 0.0625,
                                   "options": {}, "dataset": "digits"})
    assert list(tmp_path.iterdir()) == []

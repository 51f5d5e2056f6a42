"""GradSplitter: the straight-through mask, the schedule, selection, a tiny run, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import Interrupted

import dnnmod.approaches.gradsplitter as gradsplitter
import dnnmod.resumable
from dnnmod.approaches import resolve_hyperparameters
from dnnmod.cli import main
from dnnmod.models import build_model
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.training.train import Recipe, train

TINY = {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1, "head_epochs": 1,
        "mask_lr": 0.05, "max_train_samples": 128}


@pytest.fixture(scope="module")
def trained(small_digits):
    torch.manual_seed(0)
    model = build_model("simcnn", 10, width=0.0625)
    result = train(model, small_digits, Recipe(epochs=2, batch_size=64, lr=0.05), seed=0,
                   progress=False)
    meta = {"arch": "simcnn", "model": "simcnn", "dataset": "digits", "num_classes": 10,
            "width": 0.0625, "options": {}, "seed": 0, "weights_sha256": "f" * 64}
    return result.model.eval(), meta


def test_mask_is_binary_forward_and_passes_a_clipped_gradient_back():
    scores = torch.tensor([0.5, -0.2, 0.0, 2.0], requires_grad=True)
    mask = gradsplitter._BinaryMask.apply(scores)
    assert mask.tolist() == [1.0, 0.0, 0.0, 1.0]
    (mask * torch.tensor([3.0, -5.0, 0.5, 1.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, -1.0, 0.5, 1.0]


def test_reference_schedule():
    phases = gradsplitter.schedule(resolve_hyperparameters("gradsplitter", {}))
    assert sum(p.epochs for p in phases) == 5 + 20 * (5 + 2)
    assert [p.kind for p in phases[:3]] == ["head", "mask", "head"]
    assert phases[0].lr == 0.01 and phases[1].alpha == 0.1 and phases[2].alpha == 0.0


def test_selection_prefers_fewest_kernels_within_the_loss_threshold():
    history = [{"val_accuracy": 95.0, "kernels": 100}, {"val_accuracy": 94.5, "kernels": 60},
               {"val_accuracy": 93.0, "kernels": 20}]
    assert gradsplitter.select_epoch(history, base_val_accuracy=95.2, max_loss_pp=1.0) == 1
    assert gradsplitter.select_epoch(history, base_val_accuracy=99.0, max_loss_pp=1.0) == 0


def test_mask_travel_spreads_one_distance_over_the_steps_of_a_mask_phase():
    reference = resolve_hyperparameters("gradsplitter", {})
    assert gradsplitter.effective_mask_lr(reference, 45_000) == 0.001  # mask_lr as given
    travel = resolve_hyperparameters("gradsplitter", {"mask_travel": 3.5, "mask_epochs": 5,
                                                      "batch_size": 64})
    # 5 epochs of ceil(45000 / 64) = 704 steps: about the reference's 0.001 on CIFAR-10 ...
    assert gradsplitter.effective_mask_lr(travel, 45_000) == pytest.approx(3.5 / 3520)
    # ... and 40x larger on a dataset 40x smaller, so a score can travel as far in a phase.
    assert gradsplitter.effective_mask_lr(travel, 1_125) == pytest.approx(3.5 / 90)


def test_run_records_the_effective_mask_lr(trained, small_digits):
    model, meta = trained
    hyperparameters = resolve_hyperparameters("gradsplitter", {**TINY, "mask_travel": 2.0,
                                                               "batch_size": 64})
    modules = gradsplitter.GradSplitter().modularize(model, meta, small_digits, hyperparameters,
                                                     seed=1, progress=False)
    # 128 samples, batch 64, 1 mask epoch: 2 steps.
    assert modules.provenance["effective_mask_lr"] == pytest.approx(1.0)


def _run(trained, data, checkpoint=None):
    model, meta = trained
    hyperparameters = resolve_hyperparameters("gradsplitter", TINY)
    return gradsplitter.GradSplitter().modularize(model, meta, data, hyperparameters, seed=1,
                                                  checkpoint=checkpoint, progress=False)


def test_tiny_run_returns_a_module_set(trained, small_digits, tmp_path):
    modules = _run(trained, small_digits)
    assert isinstance(modules, ModuleSet) and modules.classes == list(range(10))
    assert modules.head.kind == "logit_mlp" and modules.combination == "argmax"
    history = modules.provenance["history"]
    assert [r["phase"] for r in history] == ["head", "mask", "head"]
    assert modules.provenance["train_samples"] == 128
    # Scores start at 1: only mask epochs can drop kernels.
    assert history[0]["krr"] == 1.0 and history[1]["krr"] <= 1.0
    modules.save(tmp_path / "m.safetensors")
    assert ModuleSet.load(tmp_path / "m.safetensors").provenance["selected_epoch"] >= 1


def test_resume_after_interruption_gives_the_same_modules(trained, small_digits, tmp_path,
                                                          interrupt_after_epoch):
    reference = _run(trained, small_digits, tmp_path / "a.pt")
    armed = interrupt_after_epoch(dnnmod.resumable, epoch=1)
    with pytest.raises(Interrupted):
        _run(trained, small_digits, tmp_path / "b.pt")
    armed.undo()
    resumed = _run(trained, small_digits, tmp_path / "b.pt")
    assert [r["val_accuracy"] for r in resumed.provenance["history"]] == \
        [r["val_accuracy"] for r in reference.provenance["history"]]
    assert all(torch.equal(resumed.masks[n], reference.masks[n]) for n in reference.masks)
    for name, tensor in reference.head.state_dict().items():
        assert torch.equal(tensor, resumed.head.state_dict()[name])


def test_unknown_approach_is_refused_by_the_command_line(tmp_path, capsys):
    status = main(["modularize", "--approach", "netsplitter", "--model", "m.safetensors",
                   "--seed", "0", "--out", str(tmp_path / "x.safetensors")])
    assert status == 2
    assert "unknown approach 'netsplitter'" in capsys.readouterr().err

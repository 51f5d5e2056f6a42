"""Each approach's random control: cut from the model the approach decomposes (MwT's and
MODA's own modular-trained models), it keeps per class and per group exactly as many units as
the approach's module for that class, chosen at random."""

from __future__ import annotations

from dataclasses import replace

import pytest
import test_approaches
import torch
from test_approaches import _reference, _run

from dnnmod.approaches import APPROACHES, get_approach, run_approach
from dnnmod.approaches.random_kernels import RandomControl, draw_like
from dnnmod.errors import ConfigError

trained_bases = test_approaches.trained_bases  # the fixture: each training kind's tiny model
DECOMPOSING = [
    name for name, approach in APPROACHES.items() if not isinstance(approach, RandomControl)
]


def test_every_approach_has_a_control_that_reads_its_modules():
    controls = {
        name: approach
        for name, approach in APPROACHES.items()
        if isinstance(approach, RandomControl)
    }
    assert sorted(controls) == sorted(f"random_{name}" for name in DECOMPOSING)
    for control in controls.values():
        matched = get_approach(control.control_of)
        assert control.references({}) == [control.control_of]
        assert control.training_for({}) == matched.training_for(matched.resolve({}))
        assert control.composes_by_union == matched.composes_by_union
        assert control.krr_definition == matched.krr_definition
    assert get_approach("random_mwt").training_for({}) == "mwt"
    assert get_approach("random_moda").training_for({}) == "moda"


@pytest.mark.parametrize("matched", ["gradsplitter", "mwt", "moda", "pan_rajan"])
def test_a_control_keeps_the_matched_counts_per_class_and_group(
    matched, trained_bases, small_digits
):
    control_name = f"random_{matched}"
    base = trained_bases(get_approach(control_name).training_for({}))
    reference = _reference(matched, base, small_digits)
    control = _run(control_name, base, small_digits)

    # Cut from the same model as the matched modules: MwT's and MODA's own modular model.
    assert control.base["weights_sha256"] == reference.base["weights_sha256"]
    assert control.base["training"] == base[1]["training"]
    assert control.provenance["matched"] == {
        "approach": matched,
        "base_weights_sha256": reference.base["weights_sha256"],
    }
    assert control.classes == reference.classes
    assert set(control.masks) == set(reference.masks)
    for group, kept in reference.masks.items():
        assert control.masks[group].shape == kept.shape
        assert torch.equal(_counts(control.masks[group]), _counts(kept)), group
    # Seeded: the same draw again, another with another seed.
    model, meta = base
    again = run_approach(
        control_name, model, meta, small_digits, {}, seed=0, references={matched: reference}
    )
    other = run_approach(
        control_name, model, meta, small_digits, {}, seed=1, references={matched: reference}
    )
    assert all(torch.equal(again.masks[g], control.masks[g]) for g in control.masks)
    if any((_counts(kept) < kept[0].numel()).any() for kept in reference.masks.values()):
        assert any(not torch.equal(other.masks[g], control.masks[g]) for g in control.masks)


def _counts(masks: torch.Tensor) -> torch.Tensor:
    return masks.flatten(1).sum(dim=1)


@pytest.mark.parametrize("positions", [False, True])
def test_a_control_draws_other_units_than_sparse_modules(positions, trained_bases, small_digits):
    """Modules keeping the first third of every group's channels (or of a conv group's
    positions): the control keeps as many, mostly others."""
    base = trained_bases("st")
    real = _reference("gradsplitter", base, small_digits)
    masks = {}
    for group in real.structure.conv_groups:
        shape = (len(real.classes), *(group.shape if positions else (group.size,)))
        kept = torch.zeros(shape, dtype=torch.bool).flatten(1)
        kept[:, : max(1, kept.shape[1] // 3)] = True
        masks[group.name] = kept.reshape(shape)
    reference = replace(real, masks=masks)
    drawn = draw_like(reference, real.structure, reference.classes, seed=0)
    assert set(drawn) == set(masks)
    shared = total = 0
    for group, kept in masks.items():
        assert drawn[group].shape == kept.shape
        assert torch.equal(_counts(drawn[group]), _counts(kept))
        same = _counts(drawn[group] & kept)
        assert (same < _counts(kept)).any(), group  # some module drew other units here
        shared, total = shared + int(same.sum()), total + int(_counts(kept).sum())
    assert shared / total < 0.5  # about a third by chance, not all


def test_a_control_matches_classes_in_module_order(trained_bases, small_digits):
    base = trained_bases("st")
    reference = _reference("gradsplitter", base, small_digits)
    reversed_order = reference.subset(list(reversed(reference.classes)))
    structure = reference.structure
    masks = draw_like(reversed_order, structure, reference.classes, seed=0)
    for group, kept in reference.masks.items():
        assert torch.equal(masks[group].flatten(1).sum(dim=1), kept.flatten(1).sum(dim=1))


def test_a_control_refuses_modules_it_cannot_match(trained_bases, small_digits):
    base = trained_bases("st")
    reference = _reference("gradsplitter", base, small_digits)
    with pytest.raises(
        ConfigError,
        match=r"random_gradsplitter: the gradsplitter module set "
        r"has no module for classes \[0\]",
    ):
        draw_like(
            reference.subset(reference.classes[1:]), reference.structure, reference.classes, seed=0
        )
    model, meta = base
    with pytest.raises(
        ConfigError,
        match=r"random_gradsplitter reads the module sets of "
        r"\['gradsplitter'\]",
    ):
        run_approach("random_gradsplitter", model, meta, small_digits, {}, seed=0)
    with pytest.raises(ConfigError, match=r"approaches\.random_gradsplitter: unknown keys"):
        get_approach("random_gradsplitter").resolve({"match": "mwt"})


def test_mwts_control_is_reused_on_sub_tasks_as_mwts_union_networks(trained_bases, small_digits):
    """E5: the control of MwT composes sub-tasks as MwT does, one union network without the
    mask generators, fine-tuned; on MwT's own modular-trained model."""
    from dnnmod.reuse.subtasks import evaluate_subtasks

    base = trained_bases("mwt")
    control = _run("random_mwt", base, small_digits)
    settings = {"max_subsets": 30, "samples_per_size": 1, "union_subsets": 1, "fine_tune_epochs": 1}
    frame, summary = evaluate_subtasks(base[0], control, small_digits, settings, seed=0)
    assert summary["union_subsets"] == 1
    assert frame.union_accuracy.notna().sum() == 1 == frame.finetuned_accuracy.notna().sum()

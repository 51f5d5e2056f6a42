"""Composed models run as one fused network and agree with the masked module sets, within one
model and across models trained on different datasets; combination rules; the fused and
sequential executions, the shared first layer and the measured choice between executions."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from dnnmod.data import combine, load_dataset, prepare
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.modules import combination
from dnnmod.modules.combination import combination_rule, combine_scores
from dnnmod.modules.compose import (
    EXECUTIONS,
    ComposedModel,
    ComposedPart,
    ExecutionChoice,
    FusedModuleSet,
    batch_bucket,
)
from dnnmod.modules.extract import FusedModules, extract_module, pad_and_extract
from dnnmod.modules.heads import LogitMLPHead, OwnLogitHead
from dnnmod.modules.masking import channel_view, ensure_nonempty, masked_logits
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure


def random_module_set(structure, classes, head, generator, keep=0.4, position_masks=False,
                      base=None):
    """Random modules of ``classes``, each keeping about ``keep`` of every group and none
    empty; with ``position_masks`` the first group's masks are per position."""
    first = structure.groups[0]

    def shape(group):
        return group.shape if position_masks and group is first else (group.size,)

    count = len(classes)
    masks = ensure_nonempty(
        {g.name: torch.rand(count, *shape(g), generator=generator) < keep
         for g in structure.groups},
        {g.name: torch.rand(count, *shape(g), generator=generator) for g in structure.groups})
    return ModuleSet(approach="test", classes=list(classes), masks=masks, head=head,
                     combination="argmax", base=base or {"weights_sha256": "0" * 64},
                     structure=structure)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("rescnn", 10, width=0.125).eval()
    modules = random_module_set(trace_structure(model), range(10),
                                LogitMLPHead(list(range(10)), 10),
                                torch.Generator().manual_seed(1))
    return model, modules


def test_fused_composition_equals_the_masked_modules(setup):
    model, modules = setup
    x = torch.randn(6, 3, 32, 32)
    composed = ComposedModel(model, modules)
    assert torch.allclose(composed(x), modules.scores(model, x), atol=1e-5)
    assert torch.equal(composed.predict(x), modules.predict(modules.scores(model, x)))


def test_sub_task_composition_outputs_its_classes_in_order(setup):
    model, modules = setup
    x = torch.randn(6, 3, 32, 32)
    composed = ComposedModel(model, modules, classes=[8, 3, 5])
    assert composed(x).shape == (6, 3)
    assert torch.allclose(composed(x), modules.scores(model, x)[:, [8, 3, 5]], atol=1e-5)
    assert set(composed.predict(x).tolist()) <= {8, 3, 5}
    with pytest.raises(RuntimeError, match="eval mode only"):
        composed.train()


# ------------------------------------------------- composition across models and datasets


def random_modules(model, dataset, seed, **base):
    """Hand-made random modules of an untrained ``model``, as if trained on ``dataset``."""
    normalization = {"mean": dataset.train.mean.tolist(), "std": dataset.train.std.tolist()}
    return random_module_set(
        trace_structure(model), range(10), LogitMLPHead(list(range(10)), 10),
        torch.Generator().manual_seed(seed), keep=0.5,
        base={"weights_sha256": str(seed) * 64, "arch": type(model).__name__,
              "dataset": dataset.meta["name"], "normalization": normalization, **base})


@pytest.fixture(scope="module")
def two_models(digits, tmp_path_factory):
    """lenet5 'on digits' and simcnn 'on shapes' (untrained), with modules, and a batch of
    digit 3s and circles."""
    root = tmp_path_factory.mktemp("shapes")
    prepare("shapes", root, options={"train_count": 100, "test_count": 50})
    shapes = load_dataset(root, "shapes", seed=0)
    torch.manual_seed(0)
    lenet = build_model("lenet5", 10).eval()
    simcnn = build_model("simcnn", 10, width=0.0625).eval()
    threes = digits.test.subset([3]).take(range(4))
    circles = shapes.test.subset([0]).take(range(4))
    return {"digits": (lenet, random_modules(lenet, digits, 1), digits),
            "shapes": (simcnn, random_modules(simcnn, shapes, 2), shapes),
            "batch": combine([threes, circles])}


def part_scores(setup, dataset, classes):
    """The modules of ``classes`` run masked on the images normalised their own way."""
    model, modules, data = setup[dataset]
    x, _ = replace(setup["batch"], mean=data.train.mean, std=data.train.std).float_batch()
    return modules.scores(model, x)[:, classes]


def test_parts_of_two_models_compose_a_new_task(two_models):
    lenet, digit_modules, _ = two_models["digits"]
    simcnn, shape_modules, _ = two_models["shapes"]
    x, _ = two_models["batch"].unit_batch()
    composed = ComposedModel.from_parts([ComposedPart(lenet, digit_modules, 3),
                                         ComposedPart(simcnn, shape_modules, 0)])
    by_hand = torch.cat([part_scores(two_models, "digits", [3]),
                         part_scores(two_models, "shapes", [0])], dim=1)
    assert torch.allclose(composed(x), by_hand, atol=1e-5)
    assert torch.equal(composed.predict(x), by_hand.argmax(dim=1))

    # Class i is part i: swapping the parts swaps the scores and the predicted classes.
    swapped = ComposedModel.from_parts([ComposedPart(simcnn, shape_modules, 0),
                                        ComposedPart(lenet, digit_modules, 3)])
    assert torch.allclose(swapped(x), by_hand[:, [1, 0]], atol=1e-5)
    assert torch.equal(swapped.predict(x), 1 - composed.predict(x))


def test_parts_of_one_module_set_run_fused_in_part_order(two_models):
    lenet, digit_modules, _ = two_models["digits"]
    simcnn, shape_modules, _ = two_models["shapes"]
    x, _ = two_models["batch"].unit_batch()
    composed = ComposedModel.from_parts([ComposedPart(lenet, digit_modules, 8),
                                         ComposedPart(simcnn, shape_modules, 0),
                                         ComposedPart(lenet, digit_modules, 3)])
    assert len(composed.groups) == 2
    by_hand = torch.cat([part_scores(two_models, "digits", [8]),
                         part_scores(two_models, "shapes", [0]),
                         part_scores(two_models, "digits", [3])], dim=1)
    assert torch.allclose(composed(x), by_hand, atol=1e-5)
    assert set(composed.predict(x).tolist()) <= {0, 1, 2}


def test_composing_parts_needs_each_base_models_normalisation(two_models):
    lenet, digit_modules, _ = two_models["digits"]
    simcnn, shape_modules, _ = two_models["shapes"]
    bare = replace(shape_modules, base={**shape_modules.base, "normalization": None})
    with pytest.raises(ArtifactError, match="modules of SimCNN on shapes record no input "
                                            "normalisation"):
        ComposedModel.from_parts([ComposedPart(lenet, digit_modules, 3),
                                  ComposedPart(simcnn, bare, 0)])
    with pytest.raises(ArtifactError, match="unknown combination rule 'vote'; known: argmax"):
        ComposedModel.from_parts([ComposedPart(lenet, digit_modules, 3)], combination="vote")


# ------------------------------------------------------------------------ combination rules


def test_argmax_rule_is_todays_prediction():
    scores = torch.rand(50, 4)
    classes = [7, 2, 9, 0]
    assert torch.equal(combine_scores("argmax", scores, classes),
                       torch.tensor(classes)[scores.argmax(dim=1)])
    with pytest.raises(ArtifactError, match="expected \\(batch, 4\\[, k\\]\\)"):
        combine_scores("argmax", scores[:, :3], classes)
    with pytest.raises(ArtifactError, match="'argmax' takes one score per module"):
        combine_scores("argmax", scores[..., None], classes)


def test_a_registered_rule_serves_composed_models(two_models, monkeypatch):
    monkeypatch.setattr(combination, "COMBINATIONS", dict(combination.COMBINATIONS))

    @combination_rule("lowest")
    def lowest(scores, classes):
        return classes[scores.argmin(dim=1)]

    lenet, digit_modules, _ = two_models["digits"]
    x, _ = two_models["batch"].unit_batch()
    composed = ComposedModel.from_parts([ComposedPart(lenet, digit_modules, c) for c in (1, 2)],
                                        combination="lowest")
    assert torch.equal(composed.predict(x), composed(x).argmin(dim=1))


# ------------------------------------------------- execution: fused or sequential, shared work


@pytest.fixture(scope="module")
def normed_setup():
    """rescnn with random BatchNorm statistics and affine maps (so that folding them changes
    the convs), and random modules whose first group has position masks."""
    torch.manual_seed(0)
    model = build_model("rescnn", 10, width=0.125).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                for tensor in (layer.running_mean, layer.weight, layer.bias):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
                layer.running_var.copy_(torch.rand(layer.running_var.shape,
                                                   generator=generator) + 0.5)
    structure = trace_structure(model)
    assert len(structure.groups[0].shape) == 3
    classes = [4, 0, 7, 2, 9, 5]
    modules = random_module_set(structure, classes, OwnLogitHead(classes, 10), generator,
                                position_masks=True)
    return model, modules


def test_every_execution_and_the_dispatched_one_give_the_masked_scores(normed_setup):
    model, modules = normed_setup
    x = torch.randn(5, 3, 32, 32)
    composed = FusedModuleSet(model, modules)
    assert composed.first_layer is not None  # the optimised build passed its self-check
    expected = masked_logits(model, modules.structure, modules.masks, x)
    with torch.no_grad():
        fused, sequential = composed.run_fused(x), composed.run_sequential(x)
        separate = composed.run_separate(x)
        dispatched = composed(x)
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.allclose(sequential, expected, atol=1e-5)
    assert torch.allclose(separate, expected, atol=1e-5)
    assert torch.allclose(dispatched, modules.scores(model, x), atol=1e-5)
    assert composed.choice.chosen[8] in EXECUTIONS


def test_the_shared_first_layer_computes_what_each_module_computes_alone(normed_setup):
    model, modules = normed_setup
    structure = modules.structure
    keeps = [modules.module_masks(position) for position in range(len(modules))]
    composed = FusedModuleSet(model, modules)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        shared = composed.first_layer(x)
        # The first layer ran once, for the union of the kept channels and one zero channel.
        union = torch.stack([channel_view(mask[None])[0]
                             for mask in modules.masks[structure.groups[0].name]]).any(dim=0)
        assert shared.shape[1] == int(union.sum()) + 1
        assert not shared[:, -1].any()
        unshared_sequential = torch.stack([extract_module(model, structure, keep)(x)
                                           for keep in keeps])
        unshared_fused = FusedModules(pad_and_extract(model, structure, keeps))(x)
        assert torch.allclose(composed.run_sequential(x), unshared_sequential, atol=1e-5)
        assert torch.allclose(composed.run_separate(x), unshared_sequential, atol=1e-5)
        assert torch.allclose(composed.run_fused(x), unshared_fused, atol=1e-5)


def test_a_forced_execution_is_honoured(setup, monkeypatch):
    model, modules = setup
    x = torch.randn(4, 3, 32, 32)
    expected = modules.scores(model, x)
    runs = {"fused": "run_fused", "sequential": "run_sequential", "separate": "run_separate"}
    for forced in EXECUTIONS:
        composed = ComposedModel(model, modules, execution=forced)
        group = composed.groups[0]

        def refuse(_x):
            raise AssertionError("the execution not forced ran")

        for other in set(runs) - {forced}:
            monkeypatch.setattr(group, runs[other], refuse)
        assert torch.allclose(composed(x), expected, atol=1e-5)
        assert group.choice.chosen == {}
        assert list(group.executions()) == [forced]
    with pytest.raises(ConfigError, match="unknown execution 'grouped'; known: fused, "
                                          "sequential, separate"):
        FusedModuleSet(model, modules, execution="grouped")


def test_the_choice_is_measured_once_per_batch_bucket():
    calls = {"slow": 0, "fast": 0}

    def runs(value):
        def slow():
            calls["slow"] += 1
            time.sleep(0.01)
            return torch.tensor(value)

        def fast():
            calls["fast"] += 1
            return torch.tensor(value)
        return {"slow": slow, "fast": fast}

    choice = ExecutionChoice(("slow", "fast"), rounds=2)
    assert choice.run(runs(1.0), batch_size=3) == 1.0
    assert choice.chosen == {4: "fast"} and calls == {"slow": 2, "fast": 2}
    choice.run(runs(2.0), batch_size=4)  # same bucket: no new measurement
    assert calls == {"slow": 2, "fast": 3}
    choice.run(runs(3.0), batch_size=5)  # next bucket: measured again
    assert choice.chosen == {4: "fast", 8: "fast"} and calls == {"slow": 4, "fast": 5}
    assert [batch_bucket(n) for n in (1, 2, 3, 32, 33, 256)] == [1, 2, 4, 32, 64, 256]


def test_a_composed_model_caches_its_choice_per_batch_bucket(setup):
    model, modules = setup
    composed = ComposedModel(model, modules, classes=[1, 2, 3])
    group = composed.groups[0]
    for batch_size in (3, 4, 6):
        composed(torch.randn(batch_size, 3, 32, 32))
    assert set(group.choice.chosen) == {4, 8}

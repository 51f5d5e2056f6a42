"""The shared module format: masked execution, heads, save/load, base-model checks, metrics."""

from __future__ import annotations

import pytest
import torch

from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.modules.heads import LogitMLPHead, OwnLogitHead
from dnnmod.modules.masking import check_masks, ensure_nonempty, masked_logits
from dnnmod.modules.metrics import binary_metrics, evaluate, kernel_overlap, kernel_retention
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.modules.structure import trace_structure
from dnnmod.training.model_io import load_model, save_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, width=0.25).eval()
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_model(path, model, {"arch": "resnet20", "num_classes": 10, "width": 0.25,
                             "options": {}, "dataset": "digits", "seed": 0, "training": "st",
                             "objective": {}, "normalization": {"mean": [0.5] * 3,
                                                                "std": [0.25] * 3}})
    model, meta = load_model(path)
    return model, meta, trace_structure(model)


def random_masks(structure, modules, seed=0, keep=0.5):
    generator = torch.Generator().manual_seed(seed)
    masks = {g.name: torch.rand(modules, g.size, generator=generator) < keep
             for g in structure.groups}
    return ensure_nonempty(masks, {n: torch.rand(m.shape, generator=generator)
                                   for n, m in masks.items()})


def module_set(base, head=None, masks=None):
    model, meta, structure = base
    classes = list(range(10))
    return ModuleSet(approach="test", classes=classes,
                     masks=masks if masks is not None else random_masks(structure, 10),
                     head=head or OwnLogitHead(classes, 10), combination="argmax",
                     base=base_identity(meta), structure=structure,
                     provenance={"approach": "test", "hyperparameters": {}, "seed": 0,
                                 "wall_seconds": 0.0})


def test_all_kept_masks_reproduce_the_base_model(base):
    model, _, structure = base
    x = torch.randn(3, 3, 32, 32)
    ones = {g.name: torch.ones(2, g.size) for g in structure.groups}
    out = masked_logits(model, structure, ones, x)
    assert out.shape == (2, 3, 10)
    assert torch.allclose(out[0], model(x), atol=1e-5) and torch.allclose(out[1], model(x),
                                                                           atol=1e-5)


def test_batched_masked_pass_equals_one_module_at_a_time(base):
    model, _, structure = base
    masks = random_masks(structure, 4)
    x = torch.randn(5, 3, 32, 32)
    batched = masked_logits(model, structure, masks, x)
    for m in range(4):
        single = masked_logits(model, structure, {n: t[m:m + 1] for n, t in masks.items()}, x)
        assert torch.allclose(batched[m], single[0], atol=1e-5)


def test_masks_are_checked_against_the_structure(base):
    _, _, structure = base
    masks = random_masks(structure, 2)
    first = structure.groups[0].name
    with pytest.raises(ArtifactError, match="unknown group"):
        check_masks(structure, {**masks, "no.such.conv": masks[first]})
    with pytest.raises(ArtifactError, match="shape"):
        check_masks(structure, {**masks, first: masks[first][:, :-1]})


def test_empty_group_keeps_its_most_important_kernel():
    masks = {"g": torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])}
    importance = {"g": torch.tensor([[0.1, 0.9, 0.3], [0.0, 0.0, 0.0]])}
    fixed = ensure_nonempty(masks, importance)["g"]
    assert fixed.tolist() == [[False, True, False], [True, False, True]]


def test_save_load_round_trip_with_a_learned_head(base, tmp_path):
    model, meta, _ = base
    head = LogitMLPHead(list(range(10)), 10, hidden=10)
    modules = module_set(base, head=head)
    modules.save(tmp_path / "modules.safetensors")
    loaded = ModuleSet.load(tmp_path / "modules.safetensors", base=meta)
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(modules.scores(model, x), loaded.scores(model, x))
    assert loaded.head.kind == "logit_mlp"
    assert all(torch.equal(loaded.masks[n], modules.masks[n]) for n in modules.masks)


def test_module_file_from_another_base_model_is_refused(base, tmp_path):
    _, meta, _ = base
    module_set(base).save(tmp_path / "modules.safetensors")
    other = {**meta, "weights_sha256": "0" * 64, "arch": "vgg16"}
    with pytest.raises(ArtifactError, match="cut from another base model"):
        ModuleSet.load(tmp_path / "modules.safetensors", base=other)


def test_class_out_of_range_is_named(base):
    with pytest.raises(ConfigError, match=r"classes \[12\] out of range"):
        module_set(base).subset([1, 12])


def test_subset_keeps_the_chosen_modules(base):
    model, _, _ = base
    head = LogitMLPHead(list(range(10)), 10)
    modules = module_set(base, head=head)
    x = torch.randn(4, 3, 32, 32)
    sub = modules.subset([7, 2])
    assert sub.classes == [7, 2]
    assert torch.allclose(sub.scores(model, x), modules.scores(model, x)[:, [7, 2]])


def test_module_without_any_kernel_is_refused(base):
    _, _, structure = base
    masks = random_masks(structure, 10)
    first = structure.groups[0].name
    masks[first] = masks[first].clone()
    masks[first][3] = False
    with pytest.raises(ArtifactError, match=rf"keeps nothing .*{first} \(classes \[3\]\)"):
        module_set(base, masks=masks)


def test_shared_metrics(base, small_digits):
    model, _, structure = base
    full = {g.name: torch.ones(10, g.size, dtype=torch.bool) for g in structure.groups}
    modules = module_set(base, masks=full)
    assert kernel_retention(modules) == [1.0] * 10
    assert kernel_overlap(modules) == pytest.approx(1.0)
    result = evaluate(model, modules, small_digits.test)
    # Own-logit modules keeping every kernel are the base model itself.
    assert result["composed_accuracy"] == pytest.approx(result["base_accuracy"])
    assert result["accuracy_loss_pp"] == pytest.approx(0.0, abs=1e-6)
    assert result["module_size"] == pytest.approx(1.0)
    assert result["flops_fraction"] == pytest.approx(1.0, rel=1e-3)

    halved = module_set(base, masks=random_masks(structure, 10, keep=0.5))
    smaller = evaluate(model, halved, small_digits.test)
    assert smaller["krr"] < 0.7 and smaller["module_size"] < 0.7
    assert smaller["flops_fraction"] < 0.7 and 0 < smaller["overlap"] < 1


def test_binary_metrics_of_a_perfect_scorer(base):
    modules = module_set(base)
    labels = torch.tensor([0, 1, 2, 2])
    scores = torch.nn.functional.one_hot(labels, 10).float()
    rows = binary_metrics(modules, scores, labels)
    assert [r["f1"] for r in rows[:3]] == [100.0, 100.0, 100.0]

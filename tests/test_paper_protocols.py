"""Each approach measured as its paper measures it: E2's headline accuracy loss (protocol per
approach), KRR per paper definition, and E5's union networks reused as MwT's authors reuse them
(mask generators removed, ReLU + Linear head, every parameter fine-tuned with MwT's recipe)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import train_modular
from torch import nn

from dnnmod.approaches import APPROACHES, get_approach, run_approach
from dnnmod.approaches.mwt import MaskGenerator, gated_convs
from dnnmod.errors import ConfigError
from dnnmod.models import build_model
from dnnmod.modules.extract import count_parameters, extract_module
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.metrics import (
    evaluate,
    headline_accuracy_loss,
    kernel_retention,
    layer_kernel_retention,
    module_costs,
)
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure
from dnnmod.modules.union import union_classifier, union_masks, union_network
from dnnmod.reuse import subtasks
from dnnmod.training.model_io import load_model
from dnnmod.training.objectives import get_objective
from dnnmod.training.train import Recipe, fine_tune


@pytest.fixture(scope="module")
def mwt_unit(small_digits, tmp_path_factory):
    """A tiny MwT-trained simcnn and its MwT module set."""
    _, path = train_modular("mwt", small_digits, tmp_path_factory.mktemp("mwt"))
    model, meta = load_model(path)
    modules = run_approach("mwt", model, meta, small_digits, {"metric_samples": 8}, seed=0)
    return model, modules


def hand_modules(structure, masks: dict[str, torch.Tensor], approach: str = "test") -> ModuleSet:
    classes = list(range(len(next(iter(masks.values())))))
    return ModuleSet(approach=approach, classes=classes, masks=masks,
                     head=OwnLogitHead(classes, 10), combination="argmax", base={},
                     structure=structure, provenance={"approach": approach,
                                                      "hyperparameters": {}, "seed": 0,
                                                      "wall_seconds": 0.0})


# ------------------------------------------------------------------- E2 headline accuracy


def test_each_approach_declares_its_papers_accuracy_protocol():
    protocols = {name: approach.accuracy_protocol for name, approach in APPROACHES.items()}
    assert protocols == {"mwt": "modular_model", "moda": "modular_model",
                         "gradsplitter": "composed", "cnnsplitter": "composed",
                         "pan_rajan": "composed",
                         # a random control has no modular model of its own: its kernels are
                         # composed, whichever approach's counts it matches
                         **{f"random_{name}": "composed" for name in
                            ("mwt", "moda", "gradsplitter", "cnnsplitter", "pan_rajan")}}
    assert headline_accuracy_loss("composed", 90.0, 80.0, 95.0) == pytest.approx(10.0)
    assert headline_accuracy_loss("modular_model", 90.0, 60.0, 91.5) == pytest.approx(1.5)
    assert headline_accuracy_loss("modular_model", 90.0, 60.0, None) is None
    with pytest.raises(ConfigError, match="accuracy protocol 'own'"):
        headline_accuracy_loss("own", 90.0, 80.0, None)


def test_mwt_headline_is_the_st_model_against_the_modular_model(mwt_unit, small_digits):
    model, modules = mwt_unit
    mwt = get_approach("mwt")
    result = evaluate(model, modules, small_digits.test, base_accuracy=70.0, with_costs=False,
                      union=True, approach=mwt, st_accuracy=72.5)
    assert result["accuracy_protocol"] == "modular_model" and result["st_accuracy"] == 72.5
    assert result["accuracy_loss_pp"] == pytest.approx(2.5)
    # The own-logit argmax composition stays, as an extra column.
    assert result["composed_loss_pp"] == pytest.approx(70.0 - result["composed_accuracy"])
    # The whole set's union network, as MwT's authors reuse one: no mask generators.
    union = mwt.reuse_network(union_network(model, modules, modules.classes))
    assert not gated_convs(union)
    x, labels = small_digits.test.float_batch()
    with torch.no_grad():
        expected = 100.0 * (union(x).argmax(1) == labels).float().mean().item()
    assert result["union_accuracy"] == pytest.approx(expected)
    # of the model without generators: the ST model's size, as MwT's authors count it
    st_params = count_parameters(build_model("simcnn", 10, width=0.0625))
    assert result["union_size"] == pytest.approx(count_parameters(union) / st_params)
    shared = evaluate(model, modules, small_digits.test, base_accuracy=70.0, with_costs=False)
    assert shared["accuracy_protocol"] == "composed"
    assert shared["accuracy_loss_pp"] == pytest.approx(shared["composed_loss_pp"])
    assert shared["composed_accuracy"] == pytest.approx(result["composed_accuracy"])


def test_mwt_module_costs_leave_out_the_generators(mwt_unit, small_digits):
    model, modules = mwt_unit
    mwt = get_approach("mwt")
    st_params = count_parameters(build_model("simcnn", 10, width=0.0625))
    assert count_parameters(mwt.reuse_network(copy.deepcopy(model))) == st_params
    assert count_parameters(model) > st_params  # the generators
    costs = module_costs(model, modules, mwt.reuse_network)
    for position, cost in enumerate(costs):
        extracted = extract_module(model, modules.structure, modules.module_masks(position))
        module = mwt.reuse_network(nn.Sequential(extracted, modules.head.for_module(position)))
        assert not gated_convs(module)
        assert cost["size_fraction"] == pytest.approx(count_parameters(module) / st_params)
    result = evaluate(model, modules, small_digits.test, base_accuracy=70.0, approach=mwt,
                      st_accuracy=72.5)
    assert result["module_size"] == pytest.approx(
        sum(cost["size_fraction"] for cost in costs) / len(costs))
    assert gated_convs(model)  # measured on copies: the model keeps its generators
    counting_generators = module_costs(model, modules)
    assert all(counted["params"] > cost["params"]
               for counted, cost in zip(counting_generators, costs, strict=True))


# ------------------------------------------------------------------------ KRR per paper


class Residual(nn.Module):
    """conv1 (4 kernels) → conv2 (6), conv3 (6) added to conv2's output: one coupled group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        y = torch.relu(y + self.conv3(y))
        return self.fc(y.mean((2, 3)))


def test_krr_definitions_on_a_hand_made_mask():
    structure = trace_structure(Residual(), (1, 3, 8, 8))
    first, coupled = structure.conv_groups
    assert first.convs == ("conv1",) and coupled.convs == ("conv2", "conv3")
    keep = {first.name: torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
            coupled.name: torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
                                       dtype=torch.bool)}
    modules = hand_modules(structure, keep)
    # Shared: each group once. (1 + 3) / (4 + 6), (4 + 1) / 10.
    assert kernel_retention(modules) == pytest.approx([0.4, 0.5])
    # Per conv layer (the splitters): the coupled group once per layer, (1 + 3 + 3) / 16.
    assert layer_kernel_retention(modules) == pytest.approx([7 / 16, 6 / 16])
    # MwT: the gated layers only, the first conv left out: (3 + 3) / 12.
    assert layer_kernel_retention(modules, ["conv2", "conv3"]) == pytest.approx([0.5, 2 / 12])
    # An unmasked first conv counts as kept in the shared definition only.
    ungated = hand_modules(structure, {coupled.name: keep[coupled.name]})
    assert kernel_retention(ungated) == pytest.approx([0.7, 0.5])
    assert layer_kernel_retention(ungated, ["conv2", "conv3"]) == pytest.approx([0.5, 2 / 12])
    with pytest.raises(ConfigError, match="fc"):
        layer_kernel_retention(modules, ["fc"])
    assert get_approach("gradsplitter").paper_kernel_retention(None, modules) == \
        pytest.approx([7 / 16, 6 / 16])
    assert get_approach("moda").paper_kernel_retention(None, modules) == pytest.approx(
        [0.4, 0.5])


def test_mwt_krr_counts_its_gated_layers_and_each_approach_names_its_definition():
    torch.manual_seed(0)
    model = get_objective("mwt").prepare(build_model("simcnn", 10, width=0.0625)).eval()
    structure = trace_structure(model, (1, 3, 32, 32))
    first, *gated = structure.conv_groups
    generator = torch.Generator().manual_seed(0)
    masks = {group.name: torch.rand(2, group.size, generator=generator) < 0.3 for group in gated}
    for mask in masks.values():
        mask[:, 0] = True  # no module keeps nothing of a layer
    modules = hand_modules(structure, masks, "mwt")
    kept = [sum(int(masks[g.name][m].sum()) for g in gated) for m in range(2)]
    gated_total = sum(group.size for group in gated)
    assert get_approach("mwt").paper_kernel_retention(model, modules) == pytest.approx(
        [k / gated_total for k in kept])
    assert kernel_retention(modules) == pytest.approx(
        [(first.size + k) / (first.size + gated_total) for k in kept])
    for approach in APPROACHES.values():
        assert approach.krr_definition and isinstance(approach.krr_definition, str)
    assert "first conv left out" in get_approach("mwt").krr_definition


# ----------------------------------------------------------------- E5 union networks


def test_mwt_union_network_loses_its_generators_and_gets_a_relu_linear_head(mwt_unit,
                                                                            small_digits):
    model, modules = mwt_unit
    classes = [4, 1, 7]
    classifier = union_classifier(model, modules, classes, get_approach("mwt").reuse_network)
    assert not gated_convs(classifier)
    assert not any(isinstance(m, MaskGenerator) for m in classifier.modules())
    union = union_masks(modules, classes)
    convs = dict(classifier.union.named_modules())
    for name in gated_convs(model):
        group = modules.structure.group_of(f"{name}.conv").name
        assert convs[f"{name}.0"].out_channels == int(union[group].sum())
    assert isinstance(classifier.relu, nn.ReLU)
    assert (classifier.head.in_features, classifier.head.out_features) == (10, 3)
    assert gated_convs(model)  # the model itself keeps its generators

    # With every kernel kept, the union is the modular model with each mask at 1.
    everything = hand_modules(modules.structure, {name: torch.ones_like(mask)
                                                  for name, mask in modules.masks.items()},
                              "mwt")
    whole = union_classifier(model, everything, [0, 1], get_approach("mwt").reuse_network)
    x, _ = small_digits.test.float_batch(torch.arange(8))
    originals = {}
    for name, gated in gated_convs(model).items():
        originals[name] = gated.mask_generator.forward
        gated.mask_generator.forward = (
            lambda h, kernels=gated.conv.out_channels: torch.ones(len(h), kernels))
    try:
        with torch.no_grad():
            assert torch.allclose(whole.union(x), model(x), atol=1e-5)
    finally:
        for name, gated in gated_convs(model).items():
            gated.mask_generator.forward = originals[name]


def test_fine_tuning_trains_every_parameter_with_the_recipe(mwt_unit, small_digits):
    model, modules = mwt_unit
    classifier = union_classifier(model, modules, [2, 5], get_approach("mwt").reuse_network)
    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    running = classifier.union.get_submodule(
        f"{next(iter(gated_convs(model)))}.1").running_mean.clone()
    tuned = fine_tune(classifier, small_digits.train.subset([2, 5]),
                      Recipe(epochs=1, batch_size=16, lr=0.05, nesterov=True,
                             augmentation=("crop", "flip")), seed=0, cosine_epochs=2)
    assert not tuned.training
    unchanged = [name for name, p in tuned.named_parameters()
                 if torch.equal(p.detach(), before[name])]
    assert not unchanged
    assert not torch.equal(tuned.union.get_submodule(
        f"{next(iter(gated_convs(model)))}.1").running_mean, running)  # trained in train mode


def test_e5_fine_tunes_mwt_union_networks_with_the_authors_recipe(mwt_unit, small_digits,
                                                                  monkeypatch):
    model, modules = mwt_unit
    settings = subtasks.resolve_settings({"fine_tune_epochs": 1})
    assert {key: settings[key] for key in settings if key.startswith("fine_tune_")} == {
        "fine_tune_epochs": 1, "fine_tune_lr": 0.05, "fine_tune_batch_size": 128,
        "fine_tune_momentum": 0.9, "fine_tune_nesterov": True, "fine_tune_weight_decay": 0.0,
        "fine_tune_cosine_epochs": 20, "fine_tune_augmentation": ["crop", "flip"]}
    calls = []

    def recorded(network, images, recipe, **options):
        calls.append((network, recipe, options))
        return fine_tune(network, images, recipe, **options)

    monkeypatch.setattr(subtasks, "fine_tune", recorded)
    without, tuned = subtasks._union_accuracies(model, modules, get_approach("mwt"),
                                                small_digits, [3, 8], settings, seed=0)
    assert 0 <= without <= 100 and 0 <= tuned <= 100
    (network, recipe, options), = calls
    assert not gated_convs(network) and network.head.out_features == 2
    assert (recipe.epochs, recipe.lr, recipe.momentum, recipe.nesterov, recipe.weight_decay,
            recipe.batch_size, recipe.schedule, recipe.augmentation) == (
        1, 0.05, 0.9, True, 0.0, 128, "cosine", ("crop", "flip"))
    assert options["cosine_epochs"] == 20

    # MODA composes its union network without fine-tuning: no fine-tuned accuracy.
    calls.clear()
    moda = hand_modules(modules.structure, modules.masks, "moda")
    _, moda_tuned = subtasks._union_accuracies(model, moda, get_approach("moda"), small_digits,
                                               [3, 8], settings, seed=0)
    assert math.isnan(moda_tuned) and not calls
    with pytest.raises(ConfigError, match="fine_tune_augmentation"):
        subtasks.resolve_settings({"fine_tune_augmentation": ["rotate"]})


# ------------------------------------------------------------------------------- E2 table


def test_e2_table_puts_each_papers_headline_first_and_names_the_krr_definitions(tmp_path):
    from dnnmod.artifacts import write_json
    from dnnmod.report.tables import headline_accuracy, write_modularization_report

    def record(approach, protocol, st, base, composed, krr, shared):
        return {"approach": approach, "training": approach if protocol != "composed" else "st",
                "model": "vgg16", "arch": "vgg16", "dataset": "cifar10", "seed": 0,
                "accuracy_protocol": protocol, "st_accuracy": st, "base_accuracy": base,
                "composed_accuracy": composed, "composed_loss_pp": base - composed,
                "accuracy_loss_pp": headline_accuracy_loss(protocol, base, composed, st),
                "krr": krr, "krr_shared": shared,
                "krr_definition": get_approach(approach).krr_definition,
                "module_size": 0.2, "flops_fraction": 0.3, "overlap": 0.1, "mean_f1": 80.0,
                "train_seconds": 1.0, "modularize_seconds": 2.0, "device": "cpu",
                "modules": []}

    paths = []
    for name, values in {"mwt": ("modular_model", 93.0, 91.9, 60.0, 0.15, 0.16),
                         "gradsplitter": ("composed", 93.0, 93.0, 91.0, 0.4, 0.4)}.items():
        paths.append(tmp_path / f"{name}.json")
        write_json(paths[-1], record(name, *values))
    table = write_modularization_report(paths, tmp_path / "e2.csv")
    rows = table.set_index("approach")
    assert rows.loc["mwt", "accuracy_loss_pp"] == pytest.approx(1.1)
    assert rows.loc["mwt", "composed_loss_pp"] == pytest.approx(31.9)
    assert rows.loc["gradsplitter", "accuracy_loss_pp"] == pytest.approx(2.0)
    # The published MwT figures stand beside the headline loss and the paper's KRR.
    assert rows.loc["mwt", "published_accuracy_loss_pp"] == pytest.approx(1.13)
    assert rows.loc["mwt", "published_krr"] == pytest.approx(0.1458)
    # The composed modules' accuracy for GradSplitter, the modular model's own for MwT.
    assert dict(zip(table.approach, headline_accuracy(table), strict=True)) == {
        "gradsplitter": 91.0, "mwt": 91.9}
    columns = list(table.columns)
    assert columns.index("accuracy_loss_pp") < columns.index("composed_accuracy")
    assert columns.index("krr") + 1 == columns.index("krr_shared")
    notes = (tmp_path / "e2.md").read_text()
    assert f"krr of mwt: {get_approach('mwt').krr_definition}." in notes
    assert f"krr of gradsplitter: {get_approach('gradsplitter').krr_definition}." in notes

"""MODA: activation losses, modular training, decomposition by activation rate, union network."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_modular

from dnnmod.approaches import get_approach, run_approach
from dnnmod.approaches.moda import activation_sums
from dnnmod.errors import ConfigError
from dnnmod.modules.activations import activation_statistics
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.metrics import evaluate
from dnnmod.modules.union import union_masks, union_network
from dnnmod.training.model_io import load_model
from dnnmod.training.objectives import get_objective, pair_objective

WIDTH = 0.0625


def test_losses_on_hand_made_activations():
    labels = torch.tensor([0, 0, 1, 1])
    conv = torch.zeros(4, 3, 2, 2)
    conv[0, 0], conv[1, 0], conv[2, 1], conv[3, 1] = 1.0, 3.0, 2.0, 1.0
    fc = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 2.0]])
    _, terms = pair_objective(torch.zeros(()), *activation_sums([conv, fc]), labels, 0.0, 0.0,
                              0.0)
    (affinity, dispersion), compactness = terms.means, terms.compactness
    assert terms.present.tolist() == [1.0, 1.0]
    assert affinity.item() == pytest.approx(1.0) and dispersion.item() == pytest.approx(0.0)
    conv_mean = (1 + 3 + 2 + 1) / 12  # channel means per sample, averaged over samples × C
    fc_mean = (1 + 1 + 1 + 2) / 8
    assert compactness.item() == pytest.approx((conv_mean + fc_mean) / 2)

    objective = get_objective("moda", {"gamma": 0.0})
    loss, parts = objective.loss(torch.zeros(2, 2), torch.tensor([0, 1]), {"a": fc[[0, 2]]})
    # No same-class pair: the affinity term reads 0 and adds nothing (not α(1 − 0)).
    assert parts["affinity"] == 0 and parts["dispersion"] == pytest.approx(0.0)
    assert loss.item() == pytest.approx(math.log(2))


def test_bad_hyperparameters_are_named():
    with pytest.raises(ConfigError, match=r"approaches\.moda\.residual_skip"):
        get_approach("moda").resolve({"residual_skip": "both"})
    with pytest.raises(ConfigError, match=r"approaches\.moda\.threshold"):
        get_approach("moda").resolve({"threshold": 1.5})
    with pytest.raises(ConfigError, match=r"objectives\.moda: unknown keys"):
        get_objective("moda", {"delta": 1.0})


@pytest.fixture(scope="module")
def modular(small_digits, tmp_path_factory):
    return train_modular("moda", small_digits, tmp_path_factory.mktemp("moda"), WIDTH)


def test_training_records_losses_and_reloads_identically(modular, small_digits):
    result, path = modular
    assert {"cross_entropy", "affinity", "dispersion", "compactness"} <= set(
        result.history[0].losses)
    loaded, _ = load_model(path)
    x, _ = small_digits.test.float_batch(torch.arange(16))
    assert torch.equal(loaded(x), result.model.eval()(x))


def test_decomposition_thresholds_activation_rates_of_conv_and_linear_groups(modular,
                                                                             small_digits):
    _, path = modular
    model, meta = load_model(path)
    modules = run_approach("moda", model, meta, small_digits, {"threshold": 0.5}, seed=0)
    structure = modules.structure
    assert set(modules.masks) == {group.name for group in structure.groups}
    assert structure.linear_groups
    rates = activation_statistics(model, structure, small_digits.train).group_view(
        "frequency", "intersection")
    for name, mask in modules.masks.items():
        above = rates[name] >= 0.5
        # Thresholded, except a row that would be empty keeps its most active channel.
        assert torch.equal(mask[above.any(dim=1)], above[above.any(dim=1)])
        assert mask.any(dim=1).all()

    classes = [0, 7, 2]
    network = union_network(model, modules, classes)
    x, _ = small_digits.test.float_batch(torch.arange(16))
    union = {name: mask[None] for name, mask in union_masks(modules, classes).items()}
    expected = masked_logits(model, structure, union, x)[0][:, classes]
    assert torch.allclose(network(x), expected, atol=1e-5)
    assert sum(p.numel() for p in network.parameters()) <= sum(
        p.numel() for p in model.parameters())


def test_e2_reports_the_whole_set_composed_as_one_union_network(modular, small_digits):
    _, path = modular
    model, meta = load_model(path)
    modules = run_approach("moda", model, meta, small_digits, {"threshold": 0.5}, seed=0)
    result = evaluate(model, modules, small_digits.test, base_accuracy=90.0, with_costs=False,
                      union=get_approach("moda").composes_by_union)
    network = union_network(model, modules, modules.classes)
    predictions = network(small_digits.test.float_batch(
        torch.arange(len(small_digits.test.labels)))[0]).argmax(1)
    expected = 100.0 * (predictions == small_digits.test.labels).float().mean().item()
    assert result["union_accuracy"] == pytest.approx(expected)
    assert result["union_loss_pp"] == pytest.approx(90.0 - expected)
    whole = sum(p.numel() for p in model.parameters())
    assert result["union_size"] == pytest.approx(
        sum(p.numel() for p in network.parameters()) / whole)
    # A subset of the model's channels and units: never larger than the model.
    assert result["union_size"] <= 1.0
    assert "union_accuracy" not in evaluate(model, modules, small_digits.test,
                                            with_costs=False)
    assert not get_approach("gradsplitter").composes_by_union
    assert get_approach("mwt").composes_by_union

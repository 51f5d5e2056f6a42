"""MwT: mask generators, cohesion/coupling losses, modular training, decomposition, reuse."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_modular
from torch import nn

from dnnmod.approaches import get_approach, run_approach
from dnnmod.approaches.mwt import (
    GatedConv,
    MaskGenerator,
    gated_convs,
    threshold_with_fallback,
)
from dnnmod.models import build_model
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.union import union_classifier, union_masks, union_network
from dnnmod.training.model_io import load_model
from dnnmod.training.objectives import (
    get_objective,
    pair_objective,
    side_by_side,
    spatial_mean,
)
from dnnmod.training.train import Recipe, fine_tune

WIDTH = 0.0625


def test_generator_shapes_init_and_range():
    torch.manual_seed(0)
    small, large = MaskGenerator(8, 16), MaskGenerator(64, 256)
    assert small.hidden.weight.shape == (16, 8) and small.hidden.bias is None
    assert large.hidden.weight.shape == (128, 64) and large.out.weight.shape == (256, 128)
    assert torch.equal(large.out.bias, torch.ones(256))
    masks = large(torch.randn(32, 64, 5, 5))  # tanh rounds to 1.0 in float32 beyond ~9
    assert masks.shape == (32, 256) and masks.min() >= 0 and masks.max() < 1


def test_prepare_gates_every_conv_but_the_first_and_is_deterministic():
    objective = get_objective("mwt")
    torch.manual_seed(0)
    model = objective.prepare(build_model("simcnn", 10, width=WIDTH))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    gated = gated_convs(model)
    assert len(gated) == len(convs) - 1 == 12
    assert all(isinstance(g.bn, nn.BatchNorm2d) for g in gated.values())
    torch.manual_seed(0)
    again = objective.prepare(build_model("simcnn", 10, width=WIDTH))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values(), strict=True))


def test_gated_conv_scales_the_normalised_output_by_the_mask():
    torch.manual_seed(0)
    gated = GatedConv(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = gated.bn(gated.conv(x)) * gated.mask_generator(x)[:, :, None, None]
    assert torch.allclose(gated(x), expected)


def test_cohesion_and_coupling_on_hand_made_masks():
    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0]])
    _, terms = pair_objective(torch.zeros(()), *side_by_side([aligned]), labels, 0.0, 0.0)
    cohesion, coupling = terms.means
    assert cohesion.item() == pytest.approx(1.0) and coupling.item() == pytest.approx(0.0)
    assert terms.present.tolist() == [1.0, 1.0]
    loss, parts = get_objective("mwt").loss(torch.zeros(4, 2), labels, {"a": aligned})
    assert parts["cohesion"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(math.log(2))  # α(1 − 1) + β·0 adds nothing

    # Batch without same-class pairs: no cohesion term (it reads 0), coupling still there.
    _, terms = pair_objective(torch.zeros(()), *side_by_side([aligned[[0, 2]]]),
                              torch.tensor([0, 1]), 0.0, 0.0)
    cohesion, coupling = terms.means
    assert terms.present.tolist() == [0.0, 1.0]
    assert cohesion.item() == 0 and coupling.item() == pytest.approx(0.0)
    loss, parts = get_objective("mwt").loss(torch.zeros(2, 2), torch.tensor([0, 1]),
                                            {"a": aligned[[0, 2]]})
    assert parts["cohesion"] == 0 and loss.item() == pytest.approx(math.log(2))  # no α(1 − 0)


def test_spatial_mean_matches_mean_in_value_and_gradient():
    # Both training kinds' spatial means: summed, then divided on the small result.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 7, generator=generator, requires_grad=True)
    weights = torch.randn(4, 3, generator=generator)
    (spatial_mean(x) * weights).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    expected = x.mean((2, 3))
    (expected * weights).sum().backward()
    torch.testing.assert_close(spatial_mean(x), expected)
    torch.testing.assert_close(ours, x.grad)


def test_pair_objective_matches_the_pairwise_definition():
    # One (batch, batch) product stands for the per-pair cosine similarities: same values and
    # gradients as the definition, pair by pair. Weights -1 and 2 make the loss
    # cohesion + 2·coupling − 1.
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    layers = [torch.randn(6, k, generator=generator, requires_grad=True) for k in (3, 8)]
    loss, terms = pair_objective(torch.zeros(()), *side_by_side(layers), labels, -1.0, 2.0)
    cohesion, coupling = terms.means
    assert loss.item() == pytest.approx((cohesion + 2 * coupling - 1).item())
    loss.backward()
    product_grads = [layer.grad.clone() for layer in layers]
    for layer in layers:
        layer.grad = None
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]

    def mean_similarity(layer, same):
        return torch.stack([nn.functional.cosine_similarity(layer[i], layer[j], dim=0)
                            for i, j in pairs if (labels[i] == labels[j]) == same]).mean()

    expected_cohesion = torch.stack([mean_similarity(layer, True) for layer in layers]).mean()
    expected_coupling = torch.stack([mean_similarity(layer, False) for layer in layers]).mean()
    assert cohesion.item() == pytest.approx(expected_cohesion.item(), abs=1e-6)
    assert coupling.item() == pytest.approx(expected_coupling.item(), abs=1e-6)
    (expected_cohesion + 2 * expected_coupling).backward()
    for layer, grad in zip(layers, product_grads, strict=True):
        assert torch.allclose(grad, layer.grad, atol=1e-6)


def test_threshold_and_per_layer_fallback():
    frequency = torch.tensor([[0.95, 0.9, 0.2], [0.8, 0.7, 0.1], [0.0, 0.0, 0.0]])
    kept = threshold_with_fallback(frequency, 0.9, 0.05)
    assert kept[0].tolist() == [True, True, False]
    assert kept[1].tolist() == [True, False, False]  # 0.9 → 0.85 → 0.8
    assert kept[2].all()  # nothing ever active: lowered to 0, everything kept


@pytest.fixture(scope="module")
def modular(small_digits, tmp_path_factory):
    """A simcnn trained 1 epoch with MwT, saved and reloaded."""
    return train_modular("mwt", small_digits, tmp_path_factory.mktemp("mwt"), WIDTH)


def test_modular_training_records_its_losses_and_reloads_identically(modular, small_digits):
    result, path = modular
    assert {"cross_entropy", "cohesion", "coupling"} <= set(result.history[0].losses)
    loaded, meta = load_model(path)
    x, _ = small_digits.test.float_batch(torch.arange(16))
    assert meta["training"] == "mwt"
    assert torch.equal(loaded(x), result.model.eval()(x))


def test_decomposition_union_network_and_sub_task_reuse(modular, small_digits):
    _, path = modular
    model, meta = load_model(path)
    modules = run_approach("mwt", model, meta, small_digits, {"metric_samples": 8}, seed=0)
    # The first conv has no generator: its kernels stay in every module (group absent).
    first, *gated = modules.structure.conv_groups
    assert set(modules.masks) == {group.name for group in gated}
    assert all(mask.any(dim=1).all() for mask in modules.masks.values())
    assert 0 <= modules.provenance["cohesion"] <= 1 and 0 <= modules.provenance["coupling"] <= 1

    classes = [3, 1]
    network = union_network(model, modules, classes)
    x, _ = small_digits.test.float_batch(torch.arange(16))
    union = {name: mask[None] for name, mask in union_masks(modules, classes).items()}
    expected = masked_logits(model, modules.structure, union, x)[0][:, classes]
    assert torch.allclose(network(x), expected, atol=1e-5)
    size = sum(p.numel() for p in network.parameters())
    assert size <= sum(p.numel() for p in model.parameters())

    # MwT's reuse: generators removed, ReLU + Linear(N -> |T|) head, every parameter tuned.
    reused = get_approach("mwt").reuse_network
    tuned = fine_tune(union_classifier(model, modules, classes, reused),
                      small_digits.train.subset(classes), Recipe(epochs=2, batch_size=32, lr=0.05),
                      seed=0)
    assert tuned(x).shape == (16, 2) and not gated_convs(tuned)

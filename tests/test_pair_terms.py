"""The fused objective of MwT's and MODA's pair terms (one autograd node with its backward
written out), against autograd's derivative of their per-layer definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnnmod.approaches.moda import activation_sums
from dnnmod.training.objectives import layer_layout, pair_objective

ALPHA, BETA, GAMMA = 0.7, 1.3, 0.3


def reference_terms(activations: list[torch.Tensor], labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """MODA's terms by their definition: per layer, the spatial means, normalised; the mean
    cosine similarity of same-class and of different-class pairs i < j; the mean |activation|;
    each averaged over layers."""
    vectors = [a.mean((2, 3)) if a.dim() == 4 else a for a in activations]
    upper = torch.ones(len(labels), len(labels), dtype=torch.bool).triu(1)
    same = (labels[:, None] == labels[None, :]) & upper
    means = []
    for vector in vectors:
        units = nn.functional.normalize(vector, dim=1)
        similarity = units @ units.T
        means.append(torch.stack([similarity[same].mean(), similarity[upper & ~same].mean()]))
    compactness = torch.stack([vector.abs().mean() for vector in vectors]).mean()
    return torch.stack(means).mean(0), compactness


def activations_with_a_dead_layer(memory_format: torch.memory_format) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    activations = [torch.rand(7, 3, 4, 5, generator=generator, dtype=torch.float64),
                   torch.rand(7, 6, 2, 2, generator=generator, dtype=torch.float64),
                   torch.rand(7, 5, generator=generator, dtype=torch.float64)]
    activations[1][3] = 0.0  # a dead layer for one sample: zero unit vector, finite gradient
    return [(a.contiguous(memory_format=memory_format) if a.dim() == 4 else a).requires_grad_()
            for a in activations]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels-last"])
def test_moda_loss_matches_its_definition_in_value_and_gradient(memory_format):
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    activations = activations_with_a_dead_layer(memory_format)
    base = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss, terms = pair_objective(base, *activation_sums(activations), labels, ALPHA, BETA,
                                 GAMMA)
    loss.backward()
    fused = [a.grad.clone() for a in activations]
    for a in activations:
        a.grad = None
    expected_means, expected_compactness = reference_terms(activations, labels)
    expected = (0.5 + ALPHA * (1 - expected_means[0]) + BETA * expected_means[1]
                + GAMMA * expected_compactness)
    expected.backward()
    torch.testing.assert_close(terms.means, expected_means)
    torch.testing.assert_close(terms.compactness, expected_compactness)
    # float64 throughout, the weights included: float64 rounding only
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert terms.present.tolist() == [1.0, 1.0] and base.grad.item() == 1.0
    assert not terms.means.requires_grad and not terms.compactness.requires_grad
    for ours, a in zip(fused, activations, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, a.grad)


def test_pair_objective_backward_passes_gradcheck():
    """The written-out backward against finite differences, float64, with per-layer areas, a
    dead layer for one sample and each term's weight alone."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 1, 3, 1, 0])
    layout = layer_layout([2, 4, 3], "cpu", [6, 1, 4])
    flat = torch.rand(5, 9, generator=generator, dtype=torch.float64) + 0.1
    flat[2, 2:6] = 0.0
    base = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    for weights in ((ALPHA, BETA, GAMMA), (ALPHA, 0.0, None), (0.0, BETA, None),
                    (0.0, 0.0, GAMMA)):
        def loss(x, b, weights=weights):
            # The dead part stays dead: finite differences across 0 would leave the
            # normalisation's floor, where the derivative is not defined.
            return pair_objective(b, torch.where(flat == 0, 0.0, x), layout, labels,
                                  *weights)[0]

        assert torch.autograd.gradcheck(loss, (flat.clone().requires_grad_(), base)), weights


def test_a_batch_without_same_class_pairs_adds_no_affinity_term():
    layout = layer_layout([3], "cpu")
    flat = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], requires_grad=True)
    loss, terms = pair_objective(torch.tensor(0.25), flat, layout, torch.tensor([0, 1]), ALPHA,
                                 0.0)
    assert terms.present.tolist() == [0.0, 1.0] and terms.compactness is None
    coupling = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
    assert terms.means[0] == 0 and terms.means[1].item() == pytest.approx(coupling.item())
    assert loss.item() == 0.25  # no α(1 − 0)
    loss.backward()
    assert torch.equal(flat.grad, torch.zeros_like(flat))

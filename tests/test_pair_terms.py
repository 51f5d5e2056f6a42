"""The fused pair terms of MwT's and MODA's objectives (one autograd node with its backward
written out) against autograd's derivative of their per-layer definition."""

from __future__ import annotations

import torch
from torch import nn

from dnnmod.approaches.moda import activation_terms
from dnnmod.training.objectives import layer_layout, pair_terms


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


def test_activation_terms_match_their_definition_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    activations = [torch.rand(7, 3, 4, 5, generator=generator, dtype=torch.float64),
                   torch.rand(7, 6, 2, 2, generator=generator, dtype=torch.float64),
                   torch.rand(7, 5, generator=generator, dtype=torch.float64)]
    activations[1][3] = 0.0  # a dead layer for one sample: zero unit vector, finite gradient
    activations = [a.requires_grad_() for a in activations]
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    means, present, compactness = activation_terms(activations, labels)
    (means @ weights + 0.3 * compactness).backward()
    fused = [a.grad.clone() for a in activations]
    for a in activations:
        a.grad = None
    expected_means, expected_compactness = reference_terms(activations, labels)
    (expected_means @ weights + 0.3 * expected_compactness).backward()
    torch.testing.assert_close(means, expected_means)
    torch.testing.assert_close(compactness, expected_compactness)
    assert present.tolist() == [True, True]
    for ours, a in zip(fused, activations, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, a.grad)


def test_pair_terms_backward_passes_gradcheck():
    """The written-out backward against finite differences, float64, with per-layer areas, a
    dead layer for one sample and each output's gradient alone."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 1, 3, 1, 0])
    layout = layer_layout([2, 4, 3], "cpu", [6, 1, 4])
    flat = torch.rand(5, 9, generator=generator, dtype=torch.float64) + 0.1
    flat[2, 2:6] = 0.0

    def terms(x):
        # The dead part stays dead: finite differences across 0 would leave the normalisation's
        # floor, where the derivative is not defined.
        means, _, compactness = pair_terms(torch.where(flat == 0, 0.0, x), layout, labels,
                                           compactness=True)
        return means, compactness

    for outputs in (terms, lambda x: terms(x)[0][1], lambda x: terms(x)[1]):
        assert torch.autograd.gradcheck(outputs, flat.clone().requires_grad_())


def test_a_batch_without_same_class_pairs_reads_zero_and_is_absent():
    layout = layer_layout([3], "cpu")
    flat = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], requires_grad=True)
    means, present, compactness = pair_terms(flat, layout, torch.tensor([0, 1]))
    assert present.tolist() == [False, True] and compactness is None
    assert means[0] == 0 and means[1].item() == torch.nn.functional.cosine_similarity(
        flat[0], flat[1], dim=0).item()
    means[0].backward()
    assert torch.equal(flat.grad, torch.zeros_like(flat))

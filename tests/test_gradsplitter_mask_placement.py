"""GradSplitter masks each kernel once, at the output of the ReLU after its conv + BatchNorm,
as its authors' splitters do: the score gradients are those of one post-ReLU product, and a
dropped kernel's score still gets a gradient, so the kernel can come back."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_norms
from torch import nn

import dnnmod.approaches.gradsplitter as gradsplitter
from dnnmod.errors import ConfigError
from dnnmod.models import build_model
from dnnmod.modules.activations import activation_sites
from dnnmod.modules.heads import LogitMLPHead
from dnnmod.modules.masking import check_sites_cover, masked_logits
from dnnmod.modules.structure import trace_structure

MODULES = 3


def _frozen(arch: str, width: float) -> nn.Module:
    torch.manual_seed(0)
    model = randomise_norms(build_model(arch, MODULES, width)).double()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _scores(structure) -> dict[str, torch.Tensor]:
    """Scores ±1: every module drops a random third of each group's kernels but the first."""
    generator = torch.Generator().manual_seed(1)
    scores = {}
    for group in structure.conv_groups:
        dropped = torch.rand(MODULES, group.size, generator=generator) < 1 / 3
        dropped[:, 0] = False
        scores[group.name] = torch.where(dropped, -1.0, 1.0).double()
    return scores


def _by_hand(model, sites, scores, head, x, y) -> dict[str, torch.Tensor]:
    """The score gradients of the cross-entropy with each module's binary mask multiplied
    once into each of its group's ReLU outputs, one module at a time, clipped to [-1, 1]."""
    layers = dict(model.named_modules())
    masks = {name: (s > 0).double().requires_grad_(True) for name, s in scores.items()}
    logits = []
    for module in range(MODULES):
        handles = [layers[relu].register_forward_hook(
            lambda _layer, _inputs, out, mask=masks[group][module]:
                out * mask.view(1, -1, 1, 1))
            for relu, group in sites.items() if group in masks]
        try:
            logits.append(model(x))
        finally:
            for handle in handles:
                handle.remove()
    loss = nn.functional.cross_entropy(head(torch.stack(logits)), y)
    gradients = torch.autograd.grad(loss, list(masks.values()))
    return {name: g.clamp(-1.0, 1.0) for name, g in zip(masks, gradients, strict=True)}


@pytest.mark.parametrize(("arch", "width"), [("simcnn", 0.0625), ("rescnn", 0.0625)])
def test_score_gradients_are_those_of_one_product_after_each_relu(arch, width):
    model = _frozen(arch, width)
    structure = trace_structure(model)
    sites = activation_sites(model, structure)
    scores = _scores(structure)
    torch.manual_seed(2)
    head = LogitMLPHead(list(range(MODULES)), MODULES).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    trainable = {name: s.clone().requires_grad_(True) for name, s in scores.items()}
    gradsplitter.mask_loss(model, structure, sites, trainable, head, x, y, alpha=0.0).backward()
    expected = _by_hand(model, sites, scores, head, x, y)
    for name, score in trainable.items():
        torch.testing.assert_close(score.grad, expected[name], rtol=1e-10, atol=1e-14)
    if arch == "rescnn":
        # A residual group's mask multiplies both of its ReLUs, before the addition.
        shared = [g for g in structure.conv_groups if len(g.convs) == 2]
        assert shared and all(sum(site == g.name for site in sites.values()) == 2
                              for g in shared)
    # Dropped kernels get a gradient of their own, not just the penalty's: they can revive.
    dropped = torch.cat([score.grad[scores[name] < 0] for name, score in trainable.items()])
    assert dropped.numel() > 0 and (dropped != 0).float().mean() > 0.5


def test_the_penalty_adds_alpha_over_the_mask_count_to_every_score():
    model = _frozen("simcnn", 0.0625)
    structure = trace_structure(model)
    sites = activation_sites(model, structure)
    head = LogitMLPHead(list(range(MODULES)), MODULES).double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    gradients = []
    for alpha in (0.0, 0.5):
        trainable = {n: s.clone().requires_grad_(True) for n, s in _scores(structure).items()}
        gradsplitter.mask_loss(model, structure, sites, trainable, head, x, y, alpha).backward()
        gradients.append(torch.cat([s.grad.flatten() for s in trainable.values()]))
    torch.testing.assert_close(gradients[1] - gradients[0],
                               torch.full_like(gradients[0], 0.5 / gradients[0].numel()))


def test_binary_masks_at_the_relus_compute_the_module_extraction_keeps():
    model = _frozen("rescnn", 0.0625)
    structure = trace_structure(model)
    sites = activation_sites(model, structure)
    masks = {name: (s > 0).double() for name, s in _scores(structure).items()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(masked_logits(model, structure, masks, x, sites),
                               masked_logits(model, structure, masks, x))


def test_a_group_without_a_relu_is_refused():
    torch.manual_seed(0)
    model = randomise_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    structure = trace_structure(model)
    with pytest.raises(ConfigError, match="no nn.ReLU follows the group"):
        check_sites_cover(model, structure, activation_sites(model, structure),
                          [group.name for group in structure.conv_groups])

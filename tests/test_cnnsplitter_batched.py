"""CNNSplitter's batched kept-channel pass (GroupedKeptPass): the kept-channel sub-networks'
logits, at most 1.25x their counted FLOPs, through the inference path in chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dnnmod.approaches.cnnsplitter import (
    PAPER_MODELS,
    CNNSplitter,
    gene_layout,
    initial_genes,
    population_logits,
)
from dnnmod.data.dataset import ImageSet
from dnnmod.models import build_model
from dnnmod.modules.extract import extract_module
from dnnmod.modules.grouped_pass import GroupedKeptPass, padded_widths
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.inference import kept_channel_pass, run
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.structure import trace_structure

CLASSES = 10
#: the paper's models: GradSplitter's (BatchNorm, folded into the convs) and CNNSplitter's own
#: (no BatchNorm: the convs' biases are gathered)
MODELS = PAPER_MODELS
IDS = ["simcnn", "rescnn", "incecnn", "simcnn-no-bn", "rescnn-no-bn"]


def _population(arch: str, options: dict, width: float, population: int):
    """A model with trained-looking BatchNorm statistics, its structure and gene layout, and
    one population per class drawn by CNNSplitter's initialiser (every other layer
    sensitive, kernels ranked at random)."""
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, width=width, **options).eval()
    for module in model.modules():  # BatchNorms far from the identity, so folding matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    structure = trace_structure(model, (1, 3, 32, 32))
    generator = torch.Generator().manual_seed(0)
    order = {g.name: torch.stack([torch.randperm(g.size, generator=generator)
                                  for _ in range(CLASSES)]) for g in structure.conv_groups}
    hp = CNNSplitter().resolve({})
    layout = gene_layout(structure, order, hp)
    sensitive = [layer % 2 == 0 for layer in range(len(layout.groups))]
    numbers = np.random.default_rng(0)
    populations = torch.stack([initial_genes(layout, sensitive, population, hp, numbers)
                               for _ in range(CLASSES)])
    return model, structure, layout, populations


def _masks(layout, populations) -> dict[str, torch.Tensor]:
    decoded = [layout.decode(populations[c], c) for c in range(len(populations))]
    return {group: torch.cat([d[group] for d in decoded]) for group in layout.groups}


def _images(count: int) -> ImageSet:
    generator = torch.Generator().manual_seed(1)
    return ImageSet(torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8,
                                  generator=generator),
                    torch.arange(count) % CLASSES, [str(c) for c in range(CLASSES)],
                    torch.full((3,), 0.5), torch.full((3,), 0.25))


def test_padded_widths_stay_within_the_padding_and_share_levels():
    counts = [100, 95, 91, 90, 60, 55, 54, 10, 9, 1]
    widths = padded_widths(counts, 0.1)
    assert all(c <= w <= c * 1.1 for c, w in zip(counts, widths, strict=True))
    assert widths == [100, 100, 100, 90, 60, 60, 54, 10, 9, 1]
    assert padded_widths(counts, 0.0) == counts


@pytest.mark.parametrize(("arch", "options"), MODELS, ids=IDS)
def test_logits_equal_the_kept_channel_sub_networks(arch, options):
    model, structure, layout, populations = _population(arch, options, 0.0625, 3)
    grouped = GroupedKeptPass.build(model, structure)
    kept = kept_channel_pass(model, structure)
    assert grouped is not None and kept is not None
    masks = _masks(layout, populations)
    x = _images(4).float_batch(torch.arange(4))[0]
    with torch.no_grad():
        expected = kept.logits(masks, x)
        got = grouped.prepare(masks)(x)
    scale = float(expected.abs().max())
    assert got.shape == expected.shape == (CLASSES * 3, 4, CLASSES)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    # and one module as its extracted network, built by Torch-Pruning
    keep = {group: mask[7] for group, mask in masks.items()}
    with torch.no_grad():
        extracted = extract_module(model, structure, keep)(x)
    torch.testing.assert_close(got[7], extracted, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(("arch", "options"), MODELS[:3], ids=IDS[:3])
def test_population_logits_through_the_inference_path_in_chunks(arch, options):
    """population_logits with the grouped pass, chunked over modules and images by a small
    budget, gives the kept-channel pass's own-class logits."""
    model, structure, layout, populations = _population(arch, options, 0.0625, 2)
    images = _images(6)
    grouped = GroupedKeptPass.build(model, structure)
    budget = 4 * grouped.weight_bytes() * 3  # three modules per chunk
    expected, _ = population_logits(model, structure, images, layout, populations,
                                    [{} for _ in range(CLASSES)],
                                    kept_channel_pass(model, structure))
    chunks = []
    original = grouped.prepare

    def counting(masks):
        chunks.append(next(iter(masks.values())).shape[0])
        return original(masks)

    grouped.prepare = counting
    owners = [c for c in range(CLASSES) for _ in range(2)]
    chunked = run(model, images, structure=structure, masks=_masks(layout, populations),
                  head=OwnLogitHead(owners, CLASSES), budget=budget, kept_pass=grouped)
    grouped.prepare = original
    assert chunks == [3] * 6 + [2]
    scale = float(expected.abs().max())
    torch.testing.assert_close(chunked, expected.flatten(0, 1).T, rtol=1e-4, atol=1e-5 * scale)
    got, evaluated = population_logits(model, structure, images, layout, populations,
                                       [{} for _ in range(CLASSES)], grouped)
    assert evaluated == 2 * CLASSES
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(("arch", "options"), MODELS[:3], ids=IDS[:3])
def test_flops_within_a_quarter_of_the_kept_channel_sub_networks(arch, options):
    """Counted FLOPs (FlopCounterMode) on a population of CNNSplitter's initialiser: the
    grouped pass does at most 1.25x the kept-channel sub-networks' work; the masked pass,
    which computes every channel, far more."""
    model, structure, layout, populations = _population(arch, options, 0.125, 4)
    masks = _masks(layout, populations)
    grouped = GroupedKeptPass.build(model, structure)
    kept = kept_channel_pass(model, structure)
    x = _images(2).float_batch(torch.arange(2))[0]

    def flops(call) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        return counter.get_total_flops()

    prepared = grouped.prepare(masks)
    grouped_flops = flops(lambda: prepared(x))
    kept_flops = flops(lambda: kept.logits(masks, x))
    masked_flops = flops(lambda: masked_logits(model, structure, masks, x))
    assert kept_flops <= grouped_flops <= 1.25 * kept_flops
    assert masked_flops > 1.5 * grouped_flops
    # without padding, exactly the sub-networks' work (the benchmark's reference at full width)
    unpadded = GroupedKeptPass(model, structure, padding=0.0).prepare(masks)
    assert flops(lambda: unpadded(x)) == kept_flops


def test_models_the_pass_cannot_follow_are_refused():
    """A grouped conv: the pass returns None and callers use the masked pass."""
    model = build_model("mobilenet", CLASSES, width=0.125).eval()
    structure = trace_structure(model, (1, 3, 32, 32))
    assert GroupedKeptPass.build(model, structure) is None

"""The kept-channel pass (GradSplitter's head phases and validation, CNNSplitter's search,
module scoring): the same logits as the straightforward masked pass, and a fallback wherever
it could differ. It gives no mask gradients: GradSplitter's mask steps take the masked pass
with masks at the ReLUs (tests/test_gradsplitter_mask_placement.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_norms
from torch import nn

from dnnmod.data import ImageSet
from dnnmod.models import build_model
from dnnmod.modules.inference import kept_channel_pass, run
from dnnmod.modules.masking import KeptChannelPass, masked_logits
from dnnmod.modules.structure import trace_structure

MODULES = 3
SHAPES = [("simcnn", 0.125), ("vgg16", 0.125), ("resnet20", 0.5)]


def _frozen(arch: str, width: float) -> nn.Module:
    torch.manual_seed(0)
    model = randomise_norms(build_model(arch, MODULES, width))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _scores(structure, seed: int = 0) -> dict[str, torch.Tensor]:
    """Module 0 keeps every kernel, the others a random half (scores ±1 and in between)."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for group in structure.conv_groups:
        values = torch.rand(MODULES, group.size, generator=generator) * 2 - 1
        values[0] = values[0].abs() + 0.1
        values[1:, 0] = 0.5  # every module keeps something of every group
        scores[group.name] = values
    return scores


@pytest.mark.parametrize(("arch", "width"), SHAPES)
def test_in_float64_the_fast_path_is_exact(arch, width):
    # In float64 both ways must agree to rounding.
    model = _frozen(arch, width).double()
    structure = trace_structure(model)
    kept_pass = KeptChannelPass.build(model, structure,
                                      [group.name for group in structure.conv_groups])
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    masks = {name: (s > 0).double() for name, s in _scores(structure).items()}
    dense = masked_logits(model, structure, masks, x)
    fast = kept_pass.logits(masks, x)
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-10 * dense.abs().max().item())


@pytest.mark.parametrize(("arch", "width"), SHAPES[::2])
def test_run_with_the_fast_path_gives_the_masked_logits(arch, width):
    model = _frozen(arch, width)
    structure = trace_structure(model)
    kept_pass = kept_channel_pass(model, structure)
    masks = {name: s > 0 for name, s in _scores(structure, seed=1).items()}
    images = ImageSet(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8),
                      torch.zeros(40, dtype=torch.long), ["a", "b", "c"],
                      torch.full((3,), 0.5), torch.full((3,), 0.25))
    masked = run(model, images, structure=structure, masks=masks)
    fast = run(model, images, structure=structure, masks=masks, kept_pass=kept_pass,
               budget=1 << 20)  # several image chunks
    assert fast.shape == masked.shape == (MODULES, 40, MODULES)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4 * masked.abs().max().item())
    # Module by module: one module's sliced weights are held at a time, so P candidates of a
    # population on a wide model never hold P weight copies.
    assert len(kept_pass._sliced) == 1


def test_modules_with_the_same_masks_run_once(monkeypatch):
    # GradSplitter's first phase: every module keeps every kernel. Each distinct module runs
    # once over the images and the copies get its logits, in the modules' order.
    model = _frozen("simcnn", 0.125)
    structure = trace_structure(model)
    kept_pass = kept_channel_pass(model, structure)
    distinct = {name: (s > 0).float() for name, s in _scores(structure, seed=2).items()}
    order = [1, 0, 1, 2, 0, 1]
    masks = {name: mask[order] for name, mask in distinct.items()}
    images = ImageSet(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8),
                      torch.zeros(12, dtype=torch.long), ["a", "b", "c"],
                      torch.full((3,), 0.5), torch.full((3,), 0.25))
    calls = []
    logits = kept_pass.logits
    monkeypatch.setattr(kept_pass, "logits", lambda m, x: calls.append(m) or logits(m, x))
    fast = run(model, images, structure=structure, masks=masks, kept_pass=kept_pass)
    assert len(calls) == MODULES  # one batch of images per distinct module
    one_by_one = run(model, images, structure=structure, masks=distinct, kept_pass=kept_pass)
    assert torch.equal(fast, one_by_one[order])


def test_a_model_with_in_place_relus_gets_the_kept_pass():
    # No mask gradient needs a layer's output kept, so an in-place ReLU (torchvision's) may
    # overwrite it.
    model = _frozen("simcnn", 0.125)
    for layer in model.modules():
        if isinstance(layer, nn.ReLU):
            layer.inplace = True
    structure = trace_structure(model)
    kept_pass = kept_channel_pass(model, structure)
    assert kept_pass is not None
    masks = {name: (s > 0).float() for name, s in _scores(structure).items()}
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(kept_pass.logits(masks, x),
                               masked_logits(model, structure, masks, x), rtol=1e-4, atol=1e-4)


def test_a_module_with_an_empty_group_runs_masked():
    model = _frozen("vgg16", 0.125)
    structure = trace_structure(model)
    kept_pass = KeptChannelPass.build(model, structure)
    masks = {name: (s > 0).float() for name, s in _scores(structure).items()}
    masks[structure.conv_groups[3].name][2] = 0.0  # module 2 keeps nothing of group 4
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(kept_pass.logits(masks, x), masked_logits(model, structure,
                                                                         masks, x),
                               rtol=1e-4, atol=1e-4)


def test_models_it_cannot_slice_fall_back_to_the_masked_pass():
    # A norm read by the next conv without a ReLU between them slices as well: a dropped
    # channel is zero there in the masked model, absent here.
    torch.manual_seed(0)
    ungated = randomise_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))).eval()
    assert KeptChannelPass.build(ungated, trace_structure(ungated)) is not None
    # Depthwise convs cannot be sliced to a module's channels.
    mobilenet = build_model("mobilenet", 10, width=0.125).eval()
    assert KeptChannelPass.build(mobilenet, trace_structure(mobilenet)) is None

"""Composed models run as one fused network and agree with the masked module set."""

from __future__ import annotations

import pytest
import torch

from dnnmod.models import build_model
from dnnmod.modules.compose import ComposedModel
from dnnmod.modules.heads import LogitMLPHead
from dnnmod.modules.masking import ensure_nonempty
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("rescnn", 10, width=0.125).eval()
    structure = trace_structure(model)
    generator = torch.Generator().manual_seed(1)
    masks = ensure_nonempty(
        {g.name: torch.rand(10, g.size, generator=generator) < 0.4 for g in structure.groups},
        {g.name: torch.rand(10, g.size, generator=generator) for g in structure.groups})
    modules = ModuleSet(approach="test", classes=list(range(10)), masks=masks,
                        head=LogitMLPHead(list(range(10)), 10), combination="argmax",
                        base={"weights_sha256": "0" * 64}, structure=structure)
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

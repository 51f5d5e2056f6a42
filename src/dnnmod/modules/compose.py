"""Composed models: a module set (or the modules of a subset of classes) as one network.

The modules are physically extracted, padded to a common shape and fused
(:class:`~dnnmod.modules.extract.FusedModules`), so one call runs all of them; the set's head turns
their logits into module scores and the combination rule into a prediction. For a sub-task T
the output positions follow T's order, so ``scores(x).argmax(1)`` is the relabelled class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnnmod.modules.extract import FusedModules, pad_and_extract
from dnnmod.modules.moduleset import ModuleSet


class ComposedModel(nn.Module):
    """``modules`` restricted to ``classes`` (base-model indices; default: all) fused into one
    network on ``model``'s weights. ``forward`` returns module scores, (batch, |classes|)."""

    def __init__(self, model: nn.Module, modules: ModuleSet,
                 classes: Sequence[int] | None = None) -> None:
        super().__init__()
        chosen = modules.subset(classes) if classes is not None else modules
        keeps = [chosen.module_masks(position) for position in range(len(chosen))]
        self.backbones = FusedModules(pad_and_extract(model.eval(), chosen.structure, keeps))
        self.head = chosen.head.eval()
        self.register_buffer("classes", torch.tensor(chosen.classes))

    def train(self, mode: bool = True) -> ComposedModel:
        if mode:
            raise RuntimeError("a composed model runs in eval mode only")
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbones(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted base-model class indices."""
        return self.classes[self(x).argmax(dim=1)]

"""Random controls: the control no paper reports, one per approach.

The control of approach A (``random_<A>``) is cut from the same base model as A's modules (for
MwT and MODA their own modular-trained model) and keeps, in every group A's module for a class
masks, exactly as many units as that module keeps there (kernels of a conv group, hidden units
of a linear group, active positions where A masks positions, as Pan & Rajan do), drawn
uniformly at random (seeded). A group A leaves whole stays whole. Everything but the choice of
units is A's: its KRR definition, its union composition and the network its authors reuse, so
A's row against its control's isolates what A's choice of kernels is worth over chance at
equal size. The module's score is its own class's logit and the highest score wins, as in
CNNSplitter; A's trained heads (GradSplitter's) are not carried over, since they were fitted
to A's kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dnnmod.approaches.base import Approach, Decomposition, RunContext
from dnnmod.controls import control_name
from dnnmod.errors import ConfigError
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.moduleset import ModuleSet


class RandomControl(Approach):
    """The random control of one approach (``of``); it has no hyperparameters."""

    defaults: dict[str, Any] = {}

    def __init__(self, of: Approach) -> None:
        self.of = of
        self.name = control_name(of.name)
        self.composes_by_union = of.composes_by_union
        self.fine_tunes_union = of.fine_tunes_union
        self.krr_definition = of.krr_definition

    @property
    def control_of(self) -> str:
        """The approach whose kept-unit counts (and base model) the control matches."""
        return self.of.name

    def references(self, hyperparameters: Mapping[str, Any]) -> list[str]:
        return [self.of.name]

    def training_for(self, hyperparameters: Mapping[str, Any]) -> str:
        # The control is cut from the model the matched approach decomposes.
        return self.of.training_for(self.of.resolve({}))

    def paper_kernel_retention(self, model: nn.Module, modules: ModuleSet) -> list[float]:
        return self.of.paper_kernel_retention(model, modules)

    def reuse_network(self, network: nn.Module) -> nn.Module:
        return self.of.reuse_network(network)

    def decompose(self, context: RunContext) -> Decomposition:
        reference = context.references[self.of.name]
        masks = draw_like(reference, context.structure, context.classes, context.seed)
        return Decomposition(
            masks, OwnLogitHead(context.classes, context.data.num_classes),
            provenance={"matched": {"approach": self.of.name,
                                    "base_weights_sha256": reference.base.get("weights_sha256")}},
            structure=reference.structure)


def draw_like(reference: ModuleSet, structure, classes: list[int],
              seed: int) -> dict[str, torch.Tensor]:
    """Masks of ``classes`` in module order: per group ``reference`` masks and per class, as
    many kept entries of the same mask shape as the reference's module keeps, at random."""
    name = control_name(reference.approach)
    missing = [c for c in classes if c not in reference.classes]
    if missing:
        raise ConfigError(f"{name}: the {reference.approach} module set has no module for "
                          f"classes {missing}")

    def layout(groups):
        return [(group.name, group.kind, group.size) for group in groups]

    if layout(reference.structure.groups) != layout(structure.groups):
        raise ConfigError(f"{name}: the {reference.approach} module set was cut from a model "
                          "with other groups than the model given")
    order = [reference.classes.index(c) for c in classes]
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for group, kept in reference.masks.items():
        kept = kept[order].flatten(1)
        drawn = torch.zeros_like(kept)
        for module, count in enumerate(kept.sum(dim=1).tolist()):
            drawn[module, torch.randperm(kept.shape[1], generator=generator)[:count]] = True
        masks[group] = drawn.reshape(reference.masks[group][order].shape)
    return masks

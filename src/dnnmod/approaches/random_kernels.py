"""Random kernels: the control no paper reports, E2's floor row.

Each module keeps kernels drawn uniformly at random, as many per channel group as a reference
approach's module for the same class keeps there (``match``: KRR matched layer by layer, on
the same base model), or a fixed fraction ``krr`` of every group when nothing is matched. The
module's score is its own class's logit and the highest score wins, as in CNNSplitter, so the
row shows what the kernel choice of the matched approach is worth over chance at equal size.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnnmod.approaches.base import Approach
from dnnmod.errors import ConfigError
from dnnmod.hyperparameters import Range
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.modules.structure import trace_structure


class RandomKernels(Approach):
    name = "random"
    defaults = {
        "match": None,  # approach whose kept-kernel counts are matched (None: use krr)
        "krr": 0.5,     # fraction of every group's kernels kept when nothing is matched
    }

    def references(self, hyperparameters: Mapping[str, Any]) -> list[str]:
        return [hyperparameters["match"]] if hyperparameters["match"] else []

    constraints = {"krr": Range(0, 1, low_open=True)}
    types = {"match": str}

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        hyperparameters = super().resolve(overrides)
        match = hyperparameters["match"]
        if match is not None:
            from dnnmod.approaches import APPROACHES

            if match not in set(APPROACHES) - {self.name}:
                raise ConfigError(f"approaches.random.match: {match!r} is not an approach to "
                                  f"match; known: {sorted(set(APPROACHES) - {self.name})}")
        return hyperparameters

    def training_for(self, hyperparameters: Mapping[str, Any]) -> str:
        # Matched modules must come from the same base model as the reference's.
        from dnnmod.approaches import get_approach

        match = hyperparameters["match"]
        if not match:
            return self.training
        reference = get_approach(match)
        return reference.training_for(reference.resolve({}))

    def modularize(self, model: nn.Module, base_meta: dict[str, Any], data,
                   hyperparameters: dict[str, Any], *, seed: int, device: str = "cpu",
                   checkpoint: Path | None = None, progress: bool | None = None,
                   references: Mapping[str, ModuleSet] | None = None) -> ModuleSet:
        started = time.monotonic()
        structure = trace_structure(model, (1, *data.train.images.shape[1:]))
        classes = list(range(data.num_classes))
        match = hyperparameters["match"]
        if match:
            counts = _matched_counts((references or {})[match], structure, classes)
        else:
            counts = {group.name: torch.full((len(classes),), max(
                1, round(hyperparameters["krr"] * group.size))) for group in structure.conv_groups}
        generator = torch.Generator().manual_seed(seed)
        masks = {}
        for group in structure.conv_groups:
            mask = torch.zeros(len(classes), group.size, dtype=torch.bool)
            for module, count in enumerate(counts[group.name].tolist()):
                mask[module, torch.randperm(group.size, generator=generator)[:count]] = True
            masks[group.name] = mask
        provenance = {"approach": self.name, "hyperparameters": hyperparameters, "seed": seed,
                      "wall_seconds": time.monotonic() - started}
        if match:
            provenance["matched"] = {"approach": match,
                                     "base_weights_sha256": references[match].base.get(
                                         "weights_sha256")}
        return ModuleSet(approach=self.name, classes=classes, masks=masks,
                         head=OwnLogitHead(classes, data.num_classes), combination="argmax",
                         base=base_identity(base_meta), structure=structure,
                         provenance=provenance)


def _matched_counts(reference: ModuleSet, structure, classes: list[int]
                    ) -> dict[str, torch.Tensor]:
    """Kept kernels per (group, class) of ``reference``; a channel with any active position
    counts as kept, and a group the reference does not mask counts as fully kept."""
    missing = [c for c in classes if c not in reference.classes]
    if missing:
        raise ConfigError(f"random: the matched {reference.approach} module set has no module "
                          f"for classes {missing}")
    def layout(groups):
        return [(group.name, group.size) for group in groups]

    if layout(reference.structure.conv_groups) != layout(structure.conv_groups):
        raise ConfigError(f"random: the matched {reference.approach} module set was cut from "
                          "a model with other channel groups")
    order = [reference.classes.index(c) for c in classes]
    counts = {}
    for group in structure.conv_groups:
        mask = reference.masks.get(group.name)
        if mask is None:
            counts[group.name] = torch.full((len(classes),), group.size)
        else:
            kept = mask.flatten(2).any(dim=2) if mask.dim() > 2 else mask
            counts[group.name] = kept[order].sum(dim=1)
    return counts

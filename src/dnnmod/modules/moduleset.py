"""The one module format every approach returns.

A module set holds, for each module (one per class it recognises): the kept kernels of every
channel group of the base model, the output mapping (a :class:`~dnnmod.modules.heads.Head`) and, for
the set, the rule that combines module scores into a prediction; plus the identity of the base
model it was cut from and the provenance of the run (approach, config, seed, wall time,
device). On disk: ``modules.safetensors`` (masks and head tensors) and ``modules.json``.
Loading checks that the set belongs to the base model it is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnnmod.artifacts import load_tensors, read_json, save_tensors, write_json
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.modules.heads import Head, build_head
from dnnmod.modules.masking import check_masks, masked_logits
from dnnmod.modules.structure import ModelStructure

FORMAT = "dnnmod.modules/1"
COMBINATIONS = ("argmax",)


@dataclass
class ModuleSet:
    """Modules cut from one base model.

    Attributes:
        approach: identifier of the approach that produced the set (e.g. ``gradsplitter``).
        classes: base-model class index recognised by each module, in module order.
        masks: group name → bool tensor (modules, group size): the kept kernels.
        head: the modules' output mapping.
        combination: how module scores become a prediction (``argmax``: highest score wins).
        base: identity of the base model (arch, dataset, num_classes, weights_sha256, ...).
        structure: the base model's channel groups the masks refer to.
        provenance: config, seed, wall time, device and approach-specific details.
    """

    approach: str
    classes: list[int]
    masks: dict[str, torch.Tensor]
    head: Head
    combination: str
    base: dict[str, Any]
    structure: ModelStructure
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        modules_count = check_masks(self.structure, self.masks)
        if modules_count != len(self.classes):
            raise ArtifactError(f"{len(self.classes)} classes but masks for {modules_count} "
                                "modules")
        if self.combination not in COMBINATIONS:
            raise ArtifactError(f"unknown combination {self.combination!r}; known: "
                                f"{COMBINATIONS}")
        self.masks = {name: mask.bool() for name, mask in self.masks.items()}
        empty = [name for name, mask in self.masks.items() if not mask.any(dim=1).all()]
        if empty:
            raise ArtifactError(f"a module keeps no kernel in group(s) {empty[:5]}")

    def __len__(self) -> int:
        return len(self.classes)

    def subset(self, classes: Sequence[int]) -> ModuleSet:
        """The modules recognising ``classes`` (base-model indices), in that order."""
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            raise ConfigError(f"classes {unknown} out of range: this module set has modules "
                              f"for classes {self.classes}")
        index = [self.classes.index(c) for c in classes]
        return replace(self, classes=list(classes),
                       masks={name: mask[index] for name, mask in self.masks.items()},
                       head=self.head.subset(index))

    def module_masks(self, position: int) -> dict[str, torch.Tensor]:
        return {name: mask[position] for name, mask in self.masks.items()}

    @torch.no_grad()
    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Scores of every module on ``x`` in one batched masked pass: (batch, modules)."""
        masks = {name: mask.to(x.device) for name, mask in self.masks.items()}
        return self.head.to(x.device)(masked_logits(model, self.structure, masks, x))

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        """Composed predictions (base-model class indices) from module scores."""
        classes = torch.tensor(self.classes, device=scores.device)
        return classes[scores.argmax(dim=1)]

    def save(self, path: str | os.PathLike) -> None:
        """``path`` (*.safetensors) holds masks and head tensors; the JSON beside it the rest."""
        path = Path(path)
        tensors = {f"mask/{name}": mask.to(torch.uint8) for name, mask in self.masks.items()}
        tensors |= {f"head/{name}": t for name, t in self.head.state_dict().items()}
        save_tensors(path, tensors)
        write_json(path.with_suffix(".json"), {
            "format": FORMAT, "approach": self.approach, "classes": self.classes,
            "head": {"kind": self.head.kind, "options": self.head.options()},
            "combination": self.combination, "base": self.base,
            "structure": self.structure.to_json(), "provenance": self.provenance,
        })

    @classmethod
    def load(cls, path: str | os.PathLike, base: dict[str, Any] | None = None) -> ModuleSet:
        """Read a module set; with ``base`` (the base model's metadata) check it belongs there."""
        path = Path(path)
        meta = read_json(path.with_suffix(".json"))
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{path.with_suffix('.json')}: not a dnnmod module set "
                                f"(format {meta.get('format')!r})")
        if base is not None and base.get("weights_sha256") != meta["base"]["weights_sha256"]:
            raise ArtifactError(
                f"{path}: modules were cut from another base model ({meta['base']['arch']} on "
                f"{meta['base']['dataset']}, weights {meta['base']['weights_sha256'][:12]}), not "
                f"from the given {base.get('arch')} on {base.get('dataset')} "
                f"(weights {str(base.get('weights_sha256'))[:12]})")
        tensors = load_tensors(path)
        masks = {k.removeprefix("mask/"): t for k, t in tensors.items() if k.startswith("mask/")}
        head_tensors = {k.removeprefix("head/"): t for k, t in tensors.items()
                        if k.startswith("head/")}
        head = build_head(meta["head"]["kind"], meta["classes"], meta["base"]["num_classes"],
                          head_tensors, **meta["head"]["options"])
        return cls(approach=meta["approach"], classes=meta["classes"], masks=masks, head=head,
                   combination=meta["combination"], base=meta["base"],
                   structure=ModelStructure.from_json(meta["structure"]),
                   provenance=meta["provenance"])


def base_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What a module set records about its base model (from the model's metadata)."""
    keys = ("arch", "model", "dataset", "num_classes", "width", "options", "training", "seed",
            "weights_sha256", "input_shape")
    return {key: meta.get(key) for key in keys}

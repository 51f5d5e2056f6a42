"""The one module format every approach returns.

A module set holds, for each module (one per class it recognises): its masks over the base
model's groups (see :mod:`dnnmod.modules.masking`: kept channels or hidden units, (M, C), or
active positions of conv channels, (M, C, H, W); a group without a mask is kept whole), the
output mapping (a :class:`~dnnmod.modules.heads.Head`) and, for the set, the rule that combines
module scores into a prediction; plus the identity of the base model it was cut from and the
provenance of the run (approach, config, seed, wall time, device).

On disk (format ``dnnmod.modules/2``): ``modules.safetensors`` holds the head tensors and, per
masked group, ``mask/<group>``: the module masks flattened and bit-packed, a uint8 tensor
(M, ceil(prod(mask shape[1:]) / 8)), bits in ``numpy.packbits`` order (most significant bit
first, zero-padded); ``modules.json`` holds the rest, with each mask's unpacked shape under
``masks``. Version-1 files (``dnnmod.modules/1``: unpacked uint8 (M, C) channel masks for every
conv group, structures without group kinds or shapes) still load.

Loading checks that the set belongs to the base model it is given: by the weights' SHA-256
when both the set and the given model record one; otherwise (a model that was never saved has
no hash) by the identity keys both record among arch, dataset, num_classes, width, options and
normalization.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dnnmod.artifacts import load_tensors, read_json, save_tensors, write_json
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.modules.combination import combine_scores, get_combination
from dnnmod.modules.heads import Head, build_head
from dnnmod.modules.masking import check_masks, masked_logits
from dnnmod.modules.structure import ModelStructure

FORMAT = "dnnmod.modules/2"
FORMAT_V1 = "dnnmod.modules/1"
#: what every module set records about the run that made it (approaches/base.py promises it)
REQUIRED_PROVENANCE = ("approach", "hyperparameters", "seed", "wall_seconds")
#: base-model keys compared when either side lacks a weights hash
IDENTITY_CHECK_KEYS = ("arch", "dataset", "num_classes", "width", "options", "normalization")


@dataclass
class ModuleSet:
    """Modules cut from one base model.

    Attributes:
        approach: identifier of the approach that produced the set (e.g. ``gradsplitter``).
        classes: base-model class index recognised by each module, in module order.
        masks: group name → bool tensor (modules, C) of kept channels or units, or (modules,
            C, H, W) of active positions; groups without a mask are kept whole.
        head: the modules' output mapping.
        combination: the rule that turns module scores into a prediction, a name registered
            in :mod:`dnnmod.modules.combination` (``argmax``: highest score wins).
        base: identity of the base model (arch, dataset, num_classes, weights_sha256, ...).
        structure: the base model's groups the masks refer to.
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
        get_combination(self.combination)  # ArtifactError listing the registered rules
        self.masks = {name: mask.bool() for name, mask in self.masks.items()}
        empty = {name: (~mask.flatten(1).any(dim=1)).nonzero().flatten().tolist()
                 for name, mask in self.masks.items()}
        empty = {name: modules for name, modules in empty.items() if modules}
        if empty:
            details = ", ".join(f"{name} (classes {[self.classes[m] for m in modules][:5]})"
                                for name, modules in list(empty.items())[:5])
            raise ArtifactError(f"a module keeps nothing (no channel, unit or position) in "
                                f"group(s) {details}")

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
        """The masks of module ``position``: group name → (C,) or (C, H, W)."""
        return {name: mask[position] for name, mask in self.masks.items()}

    @torch.no_grad()
    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Scores of every module on ``x`` in one batched masked pass: (batch, modules)."""
        masks = {name: mask.to(x.device) for name, mask in self.masks.items()}
        return self.head.to(x.device)(masked_logits(model, self.structure, masks, x))

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        """Composed predictions (base-model class indices) from module scores."""
        return combine_scores(self.combination, scores, self.classes)

    def save(self, path: str | os.PathLike) -> None:
        """``path`` (*.safetensors) holds packed masks and head tensors; the JSON beside it
        the rest."""
        path = Path(path)
        tensors = {f"mask/{name}": pack_mask(mask) for name, mask in self.masks.items()}
        tensors |= {f"head/{name}": t for name, t in self.head.state_dict().items()}
        save_tensors(path, tensors)
        write_json(path.with_suffix(".json"), {
            "format": FORMAT, "approach": self.approach, "classes": self.classes,
            "masks": {name: list(mask.shape) for name, mask in self.masks.items()},
            "head": {"kind": self.head.kind, "options": self.head.options()},
            "combination": self.combination, "base": self.base,
            "structure": self.structure.to_json(), "provenance": self.provenance,
        })

    @classmethod
    def load(cls, path: str | os.PathLike, base: dict[str, Any] | None = None) -> ModuleSet:
        """Read a module set (format 2 or 1); with ``base`` (the base model's metadata) check
        it belongs there (see the module docstring)."""
        path = Path(path)
        json_path = path.with_suffix(".json")
        meta = read_json(json_path)
        found = meta.get("format") if isinstance(meta, dict) else None
        if found not in (FORMAT, FORMAT_V1):
            raise ArtifactError(f"{json_path}: not a dnnmod module set (format {found!r}, "
                                f"expected {FORMAT!r} or {FORMAT_V1!r})")
        required = ("approach", "classes", "head.kind", "head.options", "combination",
                    "base.num_classes", "structure", "provenance")
        values = {key: _field(meta, key, json_path)
                  for key in (*required, *(("masks",) if meta["format"] == FORMAT else ()))}
        if base is not None:
            _check_base(path, meta["base"], base)
        try:
            structure = ModelStructure.from_json(values["structure"])
        except ArtifactError as err:
            raise ArtifactError(f"{json_path}: {err}") from None
        tensors = load_tensors(path)
        stored = {k.removeprefix("mask/"): t for k, t in tensors.items() if k.startswith("mask/")}
        if meta["format"] == FORMAT:
            masks = _unpacked_masks(path, stored, values["masks"])
        else:
            masks = {name: tensor.bool() for name, tensor in stored.items()}
        head_tensors = {k.removeprefix("head/"): t for k, t in tensors.items()
                        if k.startswith("head/")}
        head = build_head(values["head.kind"], values["classes"], values["base.num_classes"],
                          head_tensors, **values["head.options"])
        provenance = dict(values["provenance"])
        if meta["format"] == FORMAT_V1:  # version 1 named the hyperparameters "config"
            provenance = {"approach": values["approach"],
                          "hyperparameters": provenance.pop("config", {}), **provenance}
        check_provenance(provenance, str(json_path))
        try:
            return cls(approach=values["approach"], classes=values["classes"], masks=masks,
                       head=head, combination=values["combination"], base=meta["base"],
                       structure=structure, provenance=provenance)
        except ArtifactError as err:
            raise ArtifactError(f"{path}: {err}") from None


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(M, ...) mask → uint8 (M, ceil(prod(...) / 8)): each module's flattened mask as bits."""
    bits = (mask > 0).flatten(1).cpu().numpy()
    return torch.from_numpy(np.packbits(bits, axis=1))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The bool mask of ``shape`` that :func:`pack_mask` packed into ``packed``."""
    count = math.prod(shape[1:])
    bits = np.unpackbits(packed.cpu().numpy(), axis=1, count=count)
    return torch.from_numpy(bits).bool().reshape(tuple(shape))


def _unpacked_masks(path: Path, packed: Mapping[str, torch.Tensor],
                    shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    if set(packed) != set(shapes):
        missing, extra = sorted(set(shapes) - set(packed)), sorted(set(packed) - set(shapes))
        raise ArtifactError(f"{path}: mask tensors do not match the masks listed in "
                            f"{path.with_suffix('.json').name} (missing {missing[:5]}, "
                            f"unlisted {extra[:5]})")
    masks = {}
    for name, listed in shapes.items():
        if not isinstance(listed, list) or len(listed) < 2:
            raise ArtifactError(f"{path.with_suffix('.json')}: mask shape of group {name} is "
                                f"{listed!r}, expected [modules, C] or [modules, C, H, W]")
        shape = tuple(int(d) for d in listed)
        tensor = packed[name]
        expected = (shape[0], math.ceil(math.prod(shape[1:]) / 8))
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != expected:
            raise ArtifactError(f"{path}: packed mask of group {name} is {tensor.dtype} "
                                f"{tuple(tensor.shape)}, expected uint8 {expected} for a mask "
                                f"of shape {shape}")
        masks[name] = unpack_mask(tensor, shape)
    return masks


def _field(meta: Mapping[str, Any], dotted: str, source: Path) -> Any:
    """``meta``'s value at ``dotted`` (``head.kind``: meta["head"]["kind"]), or an
    ArtifactError naming the key and the file."""
    value: Any = meta
    parts = dotted.split(".")
    for depth, part in enumerate(parts, start=1):
        if not isinstance(value, Mapping) or part not in value:
            raise ArtifactError(f"{source}: lacks key {'.'.join(parts[:depth])!r}")
        value = value[part]
    return value


def _check_base(path: Path, recorded: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    ours, theirs = recorded.get("weights_sha256"), given.get("weights_sha256")
    if ours is not None and theirs is not None:
        differing = ["weights_sha256"] if ours != theirs else []
    else:
        differing = [key for key in IDENTITY_CHECK_KEYS
                     if recorded.get(key) is not None and given.get(key) is not None
                     and recorded[key] != given[key]]
    if differing:
        raise ArtifactError(
            f"{path}: modules were cut from another base model ({recorded.get('arch')} on "
            f"{recorded.get('dataset')}, weights {str(ours)[:12]}), not from the given "
            f"{given.get('arch')} on {given.get('dataset')} (weights {str(theirs)[:12]}); "
            f"differing: {differing}")


def check_provenance(provenance: dict[str, Any], where: str) -> None:
    """Raise :class:`ArtifactError` naming the required provenance keys ``where`` lacks."""
    missing = [key for key in REQUIRED_PROVENANCE if key not in provenance]
    if missing:
        raise ArtifactError(f"{where}: module-set provenance lacks {missing} (every approach "
                            f"records {list(REQUIRED_PROVENANCE)})")


def base_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What a module set records about its base model (from the model's metadata); a key the
    metadata lacks is recorded as None."""
    keys = ("arch", "model", "dataset", "num_classes", "width", "options", "training",
            "objective", "seed", "weights_sha256", "input_shape", "normalization")
    return {key: meta.get(key) for key in keys}

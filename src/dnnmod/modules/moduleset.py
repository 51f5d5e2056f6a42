"""The one module format every approach returns.

A module set holds, for each module (one per class it recognises): its masks over the base
model's groups (see :mod:`dnnmod.modules.masking`: kept channels or hidden units, (M, C), or
active positions of conv channels, (M, C, H, W); a group without a mask is kept whole), the
output mapping (a :class:`~dnnmod.modules.heads.Head`) and, for the set, the rule that combines
module scores into a prediction; plus the identity of the base model it was cut from and the
provenance of the run (approach, config, seed, wall time, device).

On disk (format ``dnnmod.modules/3``): ``modules.safetensors`` holds the head tensors and, per
masked group, ``mask/<group>``: the module masks flattened and bit-packed, a uint8 tensor
(M, ceil(prod(mask shape[1:]) / 8)), bits in ``numpy.packbits`` order (most significant bit
first, zero-padded); ``modules.json`` holds the rest, with each mask's unpacked shape under
``masks``, and commits the pair: ``tensors_sha256`` is the SHA-256 of the tensors file it was
written with. The tensors are written first and the JSON last, under an exclusive lock of the
directory, so concurrent writers leave one whole set; a pair torn by a kill between the two
writes, or mixed from two writers where the file system has no locks, is refused on loading.
Version-2 files (the same without ``tensors_sha256``) and version-1 files
(``dnnmod.modules/1``: unpacked uint8 (M, C) channel masks for every conv group, structures
without group kinds or shapes) still load, unchecked.

Loading checks every field of the JSON by its type (:data:`JSON_SCHEMA`), and that the set
belongs to the base model it is given: by the weights' SHA-256 when both the set and the given
model record one; otherwise (a model that was never saved has no hash) by the identity keys
both record among arch, dataset, num_classes, width, options and normalization. Given the model
itself, it also checks that the stored structure fits it (:func:`check_structure_fits`).
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

from dnnmod.artifacts import (
    directory_lock,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
    write_json,
)
from dnnmod.errors import ArtifactError, ConfigError, DnnmodError
from dnnmod.modules.combination import combine_scores, get_combination
from dnnmod.modules.heads import Head, build_head
from dnnmod.modules.masking import check_masks, masked_logits
from dnnmod.modules.structure import ModelStructure

FORMAT = "dnnmod.modules/3"
FORMAT_V2 = "dnnmod.modules/2"
FORMAT_V1 = "dnnmod.modules/1"
#: what every module set records about the run that made it (approaches/base.py promises it)
REQUIRED_PROVENANCE = ("approach", "hyperparameters", "seed", "wall_seconds")
#: base-model keys compared when either side lacks a weights hash
IDENTITY_CHECK_KEYS = ("arch", "dataset", "num_classes", "width", "options", "normalization")

_COUNT = {"type": "integer", "minimum": 1}
_NAMES = {"type": "array", "items": {"type": "string"}}
_GROUP_SCHEMA = {
    "type": "object", "required": ["name", "size", "convs", "norms"],
    "properties": {
        "name": {"type": "string"}, "size": _COUNT, "kind": {"type": "string"},
        "shape": {"type": "array", "items": _COUNT, "minItems": 1}, "convs": _NAMES,
        "norms": _NAMES, "norm_offsets": {"type": "array", "items": {"type": "integer",
                                                                     "minimum": 0}}}}
#: what ``modules.json`` holds, field by field (formats 1 to 3)
JSON_SCHEMA = {
    "type": "object",
    "required": ["format", "approach", "classes", "head", "combination", "base", "structure",
                 "provenance"],
    "properties": {
        "format": {"enum": [FORMAT, FORMAT_V2, FORMAT_V1]},
        "approach": {"type": "string"},
        "classes": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        "masks": {"type": "object", "additionalProperties": {
            "type": "array", "items": _COUNT, "minItems": 2}},
        "head": {"type": "object", "required": ["kind", "options"],
                 "properties": {"kind": {"type": "string"}, "options": {"type": "object"}}},
        "combination": {"type": "string"},
        "base": {"type": "object", "required": ["num_classes"],
                 "properties": {"num_classes": _COUNT}},
        "structure": {"type": "object", "required": ["groups", "output_layer", "input_shape"],
                      "properties": {"groups": {"type": "array", "items": _GROUP_SCHEMA},
                                     "output_layer": {"type": "string"},
                                     "input_shape": {"type": "array", "items": _COUNT}}},
        "provenance": {"type": "object"},
        "tensors_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
    "allOf": [
        {"if": {"properties": {"format": {"const": FORMAT}}},
         "then": {"required": ["masks", "tensors_sha256"]}},
        {"if": {"properties": {"format": {"const": FORMAT_V2}}}, "then": {"required": ["masks"]}},
    ],
}


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
        if len(set(self.classes)) != len(self.classes):
            raise ArtifactError(f"classes {self.classes} name a class twice")
        num_classes = self.base.get("num_classes")
        beyond = [c for c in self.classes if isinstance(num_classes, int) and c >= num_classes]
        if beyond:
            raise ArtifactError(f"classes {beyond[:5]} are beyond the base model's "
                                f"{num_classes} classes")
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
        the rest and the tensors' hash, written last: it commits the pair."""
        path = Path(path)
        tensors = {f"mask/{name}": pack_mask(mask) for name, mask in self.masks.items()}
        tensors |= {f"head/{name}": t for name, t in self.head.state_dict().items()}
        with directory_lock(path.parent):
            digest = save_tensors(path, tensors)
            write_json(path.with_suffix(".json"), {
                "format": FORMAT, "approach": self.approach, "classes": self.classes,
                "masks": {name: list(mask.shape) for name, mask in self.masks.items()},
                "head": {"kind": self.head.kind, "options": self.head.options()},
                "combination": self.combination, "base": self.base,
                "structure": self.structure.to_json(), "provenance": self.provenance,
                "tensors_sha256": digest,
            })

    @classmethod
    def load(cls, path: str | os.PathLike, base: dict[str, Any] | None = None,
             model: nn.Module | None = None) -> ModuleSet:
        """Read a module set (formats 1 to 3); with ``base`` (the base model's metadata) check
        it belongs there, with ``model`` (the base model) that its structure fits it (see the
        module docstring)."""
        path = Path(path)
        json_path = path.with_suffix(".json")
        with directory_lock(path.parent, shared=True):
            meta = read_json(json_path)
            _check_json(meta, json_path)
            if "tensors_sha256" in meta:
                _check_committed(path, meta["tensors_sha256"])
            tensors = load_tensors(path)
        if base is not None:
            _check_base(path, meta["base"], base)
        try:
            module_set = cls._from_parts(meta, tensors, path)
        except DnnmodError as err:
            raise ArtifactError(f"{path}: {err}") from None
        if model is not None:
            check_structure_fits(module_set, model, path)
        return module_set

    @classmethod
    def _from_parts(cls, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                    path: Path) -> ModuleSet:
        """The set that ``meta`` (checked by :data:`JSON_SCHEMA`) and ``tensors`` describe."""
        structure = ModelStructure.from_json(meta["structure"])
        stored = {k.removeprefix("mask/"): t for k, t in tensors.items() if k.startswith("mask/")}
        if meta["format"] == FORMAT_V1:
            masks = {name: tensor.bool() for name, tensor in stored.items()}
        else:
            masks = _unpacked_masks(stored, meta["masks"], path.with_suffix(".json").name)
        head_tensors = {k.removeprefix("head/"): t for k, t in tensors.items()
                        if k.startswith("head/")}
        head = build_head(meta["head"]["kind"], meta["classes"], meta["base"]["num_classes"],
                          head_tensors, **meta["head"]["options"])
        provenance = dict(meta["provenance"])
        if meta["format"] == FORMAT_V1:  # version 1 named the hyperparameters "config"
            provenance = {"approach": meta["approach"],
                          "hyperparameters": provenance.pop("config", {}), **provenance}
        check_provenance(provenance, path.with_suffix(".json").name)
        return cls(approach=meta["approach"], classes=meta["classes"], masks=masks, head=head,
                   combination=meta["combination"], base=meta["base"], structure=structure,
                   provenance=provenance)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(M, ...) mask → uint8 (M, ceil(prod(...) / 8)): each module's flattened mask as bits."""
    bits = (mask > 0).flatten(1).cpu().numpy()
    return torch.from_numpy(np.packbits(bits, axis=1))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The bool mask of ``shape`` that :func:`pack_mask` packed into ``packed``."""
    count = math.prod(shape[1:])
    bits = np.unpackbits(packed.cpu().numpy(), axis=1, count=count)
    return torch.from_numpy(bits).bool().reshape(tuple(shape))


def _unpacked_masks(packed: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]],
                    listing: str) -> dict[str, torch.Tensor]:
    """The masks ``packed`` holds, of the ``shapes`` that the file ``listing`` lists."""
    if set(packed) != set(shapes):
        missing, extra = sorted(set(shapes) - set(packed)), sorted(set(packed) - set(shapes))
        raise ArtifactError(f"mask tensors do not match the masks listed in {listing} "
                            f"(missing {missing[:5]}, unlisted {extra[:5]})")
    masks = {}
    for name, listed in shapes.items():
        shape = tuple(listed)
        tensor = packed[name]
        expected = (shape[0], math.ceil(math.prod(shape[1:]) / 8))
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != expected:
            raise ArtifactError(f"packed mask of group {name} is {tensor.dtype} "
                                f"{tuple(tensor.shape)}, expected uint8 {expected} for a mask "
                                f"of shape {shape}")
        masks[name] = unpack_mask(tensor, shape)
    return masks


def _check_json(meta: Any, source: Path) -> None:
    """An ArtifactError naming the first field of ``meta`` that :data:`JSON_SCHEMA` refuses."""
    import jsonschema

    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(JSON_SCHEMA).iter_errors(meta))
    if error is not None:
        found = meta.get("format") if isinstance(meta, dict) else None
        if error.json_path == "$.format" or found not in JSON_SCHEMA["properties"]["format"][
                "enum"]:
            raise ArtifactError(f"{source}: not a dnnmod module set (format {found!r}, expected "
                                f"{FORMAT!r}, {FORMAT_V2!r} or {FORMAT_V1!r})")
        key = error.json_path.removeprefix("$").removeprefix(".")
        if error.validator == "required":
            missing = next(k for k in error.validator_value if k not in error.instance)
            raise ArtifactError(f"{source}: lacks key {f'{key}.{missing}'.lstrip('.')!r}")
        message = error.message if len(error.message) <= 200 else error.message[:200] + " ..."
        raise ArtifactError(f"{source}: key {key!r}: {message}")


def _check_committed(path: Path, recorded: str) -> None:
    """ArtifactError unless ``path`` is the tensors file its JSON was written with."""
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found, but {path.with_suffix('.json').name} "
                            "beside it names it")
    if sha256_file(path) != recorded:
        raise ArtifactError(
            f"{path}: not the tensors {path.with_suffix('.json').name} was written with (hash "
            f"{recorded[:12]} recorded): a torn or mixed module set, from a write interrupted "
            "between its two files or from two writers at once; write it again (dnnmod "
            "modularize)")


def check_structure_fits(module_set: ModuleSet, model: nn.Module, where: str | Path) -> None:
    """ArtifactError unless every layer the set's structure names is in ``model``, of its
    group's kind and size (a norm covering the group's slice), and every module's class is one
    of the model's outputs."""
    layers = dict(model.named_modules())
    structure = module_set.structure

    def refuse(problem: str) -> ArtifactError:
        return ArtifactError(f"{where}: does not fit the given model: {problem}")

    producer = {"conv": nn.Conv2d, "linear": nn.Linear}
    for group in structure.groups:
        for name in group.convs:
            layer = layers.get(name)
            if not isinstance(layer, producer[group.kind]):
                raise refuse(f"group {group.name}: layer {name!r} is "
                             f"{type(layer).__name__ if layer else 'absent'}, expected "
                             f"{producer[group.kind].__name__}")
            size = layer.out_channels if group.kind == "conv" else layer.out_features
            if size != group.size:
                raise refuse(f"group {group.name}: layer {name!r} has {size} outputs, the "
                             f"module set {group.size}")
        for name, offset in zip(group.norms, group.norm_offsets, strict=True):
            layer = layers.get(name)
            features = getattr(layer, "num_features", None)
            if not isinstance(features, int) or offset + group.size > features:
                raise refuse(f"group {group.name}: norm {name!r} is "
                             f"{type(layer).__name__ if layer else 'absent'}"
                             f"{f' over {features} channels' if features else ''}, expected "
                             f"one covering channels {offset}..{offset + group.size - 1}")
    output = layers.get(structure.output_layer)
    outputs = getattr(output, "out_features", getattr(output, "out_channels", None))
    if not isinstance(outputs, int):
        raise refuse(f"its output layer {structure.output_layer!r} is "
                     f"{type(output).__name__ if output else 'absent'}")
    beyond = [c for c in module_set.classes if c >= outputs]
    if beyond:
        raise refuse(f"classes {beyond[:5]} are beyond the model's {outputs} outputs")


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

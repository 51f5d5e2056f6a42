"""Version 2 of the module-set format: channel, unit and position masks; bit-packed files;
version-1 files; JSON checks; metrics of every granularity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dnnmod.artifacts import save_tensors, sha256_file, write_json
from dnnmod.errors import ArtifactError
from dnnmod.models import build_model
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.masking import check_masks, ensure_nonempty, kept_kernels, masked_logits
from dnnmod.modules.metrics import (
    evaluate,
    kernel_overlap,
    kernel_retention,
    module_costs,
    unit_retention,
)
from dnnmod.modules.moduleset import (
    FORMAT_V1,
    ModuleSet,
    base_identity,
    pack_mask,
    unpack_mask,
)
from dnnmod.modules.structure import ChannelGroup, ModelStructure, trace_structure
from dnnmod.training.model_io import load_model, save_model

CLASSES = list(range(10))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved vgg16 at width 0.125: conv groups with positions and two hidden Linear layers."""
    torch.manual_seed(0)
    model = build_model("vgg16", 10, width=0.125).eval()
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_model(path, model, {"arch": "vgg16", "num_classes": 10, "width": 0.125, "options": {},
                             "dataset": "digits", "seed": 0, "training": "st", "objective": {},
                             "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    model, meta = load_model(path)
    return model, meta, trace_structure(model)


def every_granularity(structure: ModelStructure, seed: int = 0) -> dict[str, torch.Tensor]:
    """Position masks on the first conv group, channel masks on the second, unit masks on the
    first linear group; the other groups unmasked."""
    generator = torch.Generator().manual_seed(seed)
    first, second = structure.conv_groups[:2]
    hidden = structure.linear_groups[0]
    masks = {first.name: torch.rand(10, *first.shape, generator=generator) < 0.5,
             second.name: torch.rand(10, second.size, generator=generator) < 0.5,
             hidden.name: torch.rand(10, hidden.size, generator=generator) < 0.5}
    masks[first.name][:, 0] = False  # a channel inactive everywhere: removed physically
    return ensure_nonempty(masks, {name: torch.rand(mask.shape, generator=generator)
                                   for name, mask in masks.items()})


def module_set(saved, masks, **changes) -> ModuleSet:
    """A module set on the ``base`` fixture's model with own-logit heads; ``changes`` replace
    fields."""
    _, meta, structure = saved
    fields = {"approach": "test", "classes": CLASSES, "masks": masks,
              "head": OwnLogitHead(CLASSES, 10), "combination": "argmax",
              "base": base_identity(meta), "structure": structure,
              "provenance": {"approach": "test", "hyperparameters": {}, "seed": 0,
                             "wall_seconds": 0.0}}
    return ModuleSet(**{**fields, **changes})


def test_every_granularity_survives_a_bit_packed_round_trip(base, tmp_path):
    model, meta, structure = base
    masks = every_granularity(structure)
    modules = module_set(base, masks)
    path = tmp_path / "modules.safetensors"
    modules.save(path)

    written = json.loads(path.with_suffix(".json").read_text())
    assert written["format"] == "dnnmod.modules/3"
    assert written["tensors_sha256"] == sha256_file(path)
    assert written["masks"] == {name: list(mask.shape) for name, mask in masks.items()}
    with safe_open(str(path), framework="pt") as stored:
        for name, mask in masks.items():
            packed = stored.get_tensor(f"mask/{name}")
            bits = math.prod(mask.shape[1:])
            assert packed.dtype == torch.uint8 and packed.shape == (10, math.ceil(bits / 8))
    unpacked_bytes = sum(mask.numel() for mask in masks.values())  # one uint8 per flag
    assert path.stat().st_size < unpacked_bytes / 6

    loaded = ModuleSet.load(path, base=meta, model=model)
    assert loaded.masks.keys() == masks.keys()
    assert all(torch.equal(loaded.masks[name], mask) for name, mask in masks.items())
    assert loaded.structure == structure
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.scores(model, x), modules.scores(model, x))


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 3, 3), (1, 8), (4, 1)])
def test_packing_is_numpy_packbits_per_module(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_mask(mask)
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.flatten(1).numpy(), axis=1)))
    assert torch.equal(unpack_mask(packed, shape), mask)


def write_version_1(path, structure: ModelStructure, masks, meta) -> None:
    """A module set in the version-1 layout: unpacked uint8 (M, C) masks for every conv group
    and a structure whose groups have neither kind nor shape."""
    written = structure.to_json()
    written["groups"] = [{key: group[key] for key in ("name", "size", "convs", "norms")}
                         for group in written["groups"] if group["kind"] == "conv"]
    save_tensors(path, {f"mask/{name}": mask.to(torch.uint8) for name, mask in masks.items()})
    identity = {key: value for key, value in base_identity(meta).items()
                if key != "normalization"}
    write_json(path.with_suffix(".json"), {
        "format": FORMAT_V1, "approach": "gradsplitter", "classes": CLASSES,
        "head": {"kind": "own_logit", "options": {}}, "combination": "argmax",
        "base": identity, "structure": written,
        "provenance": {"config": {"rounds": 1}, "seed": 0, "wall_seconds": 1.0}})


def test_version_1_files_still_load(base, tmp_path):
    model, meta, structure = base
    generator = torch.Generator().manual_seed(1)
    masks = {g.name: torch.rand(10, g.size, generator=generator) < 0.5
             for g in structure.conv_groups}
    masks = ensure_nonempty(masks, masks)
    path = tmp_path / "v1.safetensors"
    write_version_1(path, structure, masks, meta)

    loaded = ModuleSet.load(path, base=meta)
    assert all(g.kind == "conv" and g.shape == (g.size,) for g in loaded.structure.groups)
    assert all(torch.equal(loaded.masks[name], mask) for name, mask in masks.items())
    # Version 1 called the hyperparameters "config"; they are read as "hyperparameters".
    assert loaded.provenance["hyperparameters"] == {"rounds": 1}
    assert loaded.provenance["approach"] == "gradsplitter"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.scores(model, x), module_set(base, masks).scores(model, x))


@pytest.mark.parametrize("key", ["approach", "classes", "masks", "head", "head.kind",
                                 "combination", "base", "base.num_classes", "structure",
                                 "structure.groups", "provenance"])
def test_a_missing_json_key_is_named(base, tmp_path, key):
    path = tmp_path / "modules.safetensors"
    module_set(base, every_granularity(base[2])).save(path)
    written = json.loads(path.with_suffix(".json").read_text())
    *parents, last = key.split(".")
    holder = written
    for parent in parents:
        holder = holder[parent]
    del holder[last]
    path.with_suffix(".json").write_text(json.dumps(written))
    with pytest.raises(ArtifactError, match=rf"modules.json: .*lacks key '(\w+\.)?{last}'"):
        ModuleSet.load(path)


def test_a_packed_mask_of_the_wrong_size_is_named(base, tmp_path):
    _, _, structure = base
    path = tmp_path / "modules.safetensors"
    masks = every_granularity(structure)
    module_set(base, masks).save(path)
    name = structure.conv_groups[0].name
    with safe_open(str(path), framework="pt") as stored:
        tensors = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118
    tensors[f"mask/{name}"] = tensors[f"mask/{name}"][:, :-1]
    written = json.loads(path.with_suffix(".json").read_text())
    write_json(path.with_suffix(".json"), {**written,
                                           "tensors_sha256": save_tensors(path, tensors)})
    with pytest.raises(ArtifactError, match=f"packed mask of group {name}"):
        ModuleSet.load(path)


def test_base_checks_without_a_weights_hash(base, tmp_path):
    _, meta, structure = base
    path = tmp_path / "modules.safetensors"
    unhashed = {**base_identity(meta), "weights_sha256": None}
    module_set(base, every_granularity(structure), base=unhashed).save(path)
    ModuleSet.load(path, base=meta)  # the hash is unknown on one side: identity keys agree
    with pytest.raises(ArtifactError, match=r"cut from another base model.*\['arch'\]"):
        ModuleSet.load(path, base={**meta, "arch": "simcnn"})
    module_set(base, every_granularity(structure)).save(path)
    ModuleSet.load(path, base={**meta, "weights_sha256": None})
    with pytest.raises(ArtifactError, match="normalization"):
        ModuleSet.load(path, base={**meta, "weights_sha256": None,
                                   "normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}})


def test_base_identity_records_the_normalization(base):
    _, meta, _ = base
    assert base_identity(meta)["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert base_identity({"arch": "vgg16"})["normalization"] is None


def test_a_module_without_any_active_position_is_refused(base):
    _, _, structure = base
    masks = every_granularity(structure)
    first = structure.conv_groups[0].name
    masks[first][4] = False
    with pytest.raises(ArtifactError, match=rf"keeps nothing .*{first} \(classes \[4\]\)"):
        module_set(base, masks)


# Mask checks on a hand-made structure: no model needed.

HAND_MADE = ModelStructure(
    groups=(ChannelGroup("a", 4, ("a",), ("a_bn",), "conv", (4, 3, 3)),
            ChannelGroup("b", 2, ("b", "b_dw"), (), "conv", (2,)),
            ChannelGroup("c", 5, ("c",), (), "linear", (5,))),
    output_layer="out", input_shape=(1, 3, 6, 6))


def test_absent_groups_are_allowed_and_mask_shapes_follow_the_group_kind():
    assert check_masks(HAND_MADE, {"a": torch.ones(3, 4, 3, 3)}) == 3
    assert check_masks(HAND_MADE, {"a": torch.ones(2, 4), "c": torch.ones(2, 5)}) == 2
    for name, mask in [("b", torch.ones(2, 2, 3, 3)), ("c", torch.ones(2, 5, 1, 1)),
                       ("a", torch.ones(2, 4, 3, 2)), ("a", torch.ones(4))]:
        with pytest.raises(ArtifactError, match=f"group {name}: shape"):
            check_masks(HAND_MADE, {name: mask})
    with pytest.raises(ArtifactError, match="unknown group"):
        check_masks(HAND_MADE, {"d": torch.ones(2, 4)})
    with pytest.raises(ArtifactError, match="number of modules"):
        check_masks(HAND_MADE, {"a": torch.ones(2, 4), "c": torch.ones(3, 5)})
    with pytest.raises(ArtifactError, match="no masks"):
        check_masks(HAND_MADE, {})


def test_an_empty_position_mask_keeps_its_most_important_channel_whole():
    masks = {"a": torch.zeros(2, 3, 2, 2)}
    masks["a"][1, 0, 1, 1] = 1.0
    importance = {"a": torch.zeros(2, 3, 2, 2)}
    importance["a"][0, 2] = 1.0
    fixed = ensure_nonempty(masks, importance)["a"]
    assert fixed[0, 2].all() and fixed[0].sum() == 4
    assert torch.equal(fixed[1], masks["a"][1].bool())
    assert kept_kernels({"a": fixed}).tolist() == [1, 1]


def test_position_masks_refuse_inputs_of_another_size(base):
    model, _, structure = base
    first = structure.conv_groups[0]
    masks = {first.name: torch.ones(1, *first.shape)}
    with pytest.raises(ArtifactError, match=f"position mask of group {first.name}"):
        masked_logits(model, structure, masks, torch.randn(1, 3, 64, 64))


def test_metrics_of_hand_made_masks_of_every_granularity(small_digits):
    """lenet5: conv groups of 6 (6x28x28) and 16 kernels, hidden layers of 120 and 84 units.
    Module 0 keeps 2 conv1 kernels by positions (one with a single active position) and 60
    fc1 units; module 1 keeps 3 conv1 kernels by a channel mask and masks no unit."""
    torch.manual_seed(0)
    model = build_model("lenet5", 10, width=1.0).eval()
    structure = trace_structure(model)
    conv1, conv2 = structure.conv_groups
    fc1, fc2 = structure.linear_groups
    assert (conv1.shape, conv2.size, fc1.size, fc2.size) == ((6, 28, 28), 16, 120, 84)
    positions = torch.zeros(2, 6, 28, 28, dtype=torch.bool)
    positions[0, 0, 5, 7] = True
    positions[0, 1] = True
    positions[1, 1:4] = True  # module 1's channel mask {1, 2, 3}, written as positions
    units = torch.zeros(2, 120, dtype=torch.bool)
    units[0, :60] = True
    units[1] = True
    modules = ModuleSet(approach="test", classes=[3, 8], masks={conv1.name: positions,
                                                                fc1.name: units},
                        head=OwnLogitHead([3, 8], 10), combination="argmax",
                        base={"weights_sha256": None}, structure=structure)

    assert kernel_retention(modules) == pytest.approx([(2 + 16) / 22, (3 + 16) / 22])
    assert unit_retention(modules) == pytest.approx([(60 + 84) / 204, 1.0])
    assert kernel_overlap(modules) == pytest.approx((1 + 16) / (4 + 16))

    costs = module_costs(model, modules)
    assert costs[0]["params"] < costs[1]["params"]  # fewer conv1 kernels and fc1 units
    assert all(cost["size_fraction"] < 1 for cost in costs)

    test = small_digits.test.take(range(20))
    result = evaluate(model, modules, test, with_costs=False)
    assert result["krr"] == pytest.approx((18 / 22 + 19 / 22) / 2)
    assert result["unit_retention"] == pytest.approx((144 / 204 + 1.0) / 2)
    assert [row["unit_retention"] for row in result["modules"]] == pytest.approx(
        [144 / 204, 1.0])


def test_unit_retention_is_none_without_hidden_linear_layers():
    modules = ModuleSet(approach="test", classes=[0, 1],
                        masks={"a": torch.ones(2, 4, dtype=torch.bool)},
                        head=OwnLogitHead([0, 1], 2), combination="argmax", base={},
                        structure=ModelStructure(HAND_MADE.groups[:2], "out", (1, 3, 6, 6)))
    assert unit_retention(modules) is None
    assert kernel_retention(modules) == [1.0, 1.0]

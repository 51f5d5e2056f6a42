"""Model zoo and traced channel structure."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from dnnmod.errors import ArtifactError, ConfigError, UnknownNameError
from dnnmod.models import ARCHITECTURES, build_model
from dnnmod.modules.structure import ModelStructure, trace_structure

NUM_CLASSES = 7
# Small enough for a fast CPU test, large enough that every channel group has 2+ channels.
TEST_WIDTH = 0.25


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {arch: build_model(arch, NUM_CLASSES, TEST_WIDTH) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def structures(small_models) -> dict[str, ModelStructure]:
    return {arch: trace_structure(model) for arch, model in small_models.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("width", [1.0, TEST_WIDTH])
def test_forward_gives_one_logit_per_class(arch, width):
    model = build_model(arch, NUM_CLASSES, width).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    output_layer = model.get_submodule(model.output_layer_name)
    assert isinstance(output_layer, nn.Linear)
    assert output_layer.out_features == NUM_CLASSES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_imagenet_inputs_are_accepted(arch, small_models):
    with torch.no_grad():
        assert small_models[arch].eval()(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_relus_are_modules_that_keep_their_input(arch, small_models):
    relus = [m for m in small_models[arch].modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(relu.inplace for relu in relus)


def test_resnet20_without_batch_norm_has_no_batch_norm():
    model = build_model("resnet20", 10, TEST_WIDTH, batch_norm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(conv.bias is not None for conv in model.modules() if isinstance(conv, nn.Conv2d))


def test_deep_resnet_without_batch_norm_starts_with_moderate_logits():
    model = build_model("resnet56", 10, TEST_WIDTH, batch_norm=False).eval()
    with torch.no_grad():
        assert model(torch.randn(8, 3, 32, 32)).abs().max() < 100


def test_unknown_architecture_is_named():
    with pytest.raises(UnknownNameError, match="resnet21"):
        build_model("resnet21", 10)


def test_unknown_option_names_arch_and_option():
    with pytest.raises(ConfigError, match="vgg16.*batch_norm"):
        build_model("vgg16", 10, batch_norm=False)


@pytest.mark.parametrize("width", [0, -0.5])
def test_non_positive_width_is_rejected(width):
    with pytest.raises(ConfigError, match="width"):
        build_model("lenet5", 10, width)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_groups_cover_every_conv_once_with_matching_sizes(arch, small_models, structures):
    model, structure = small_models[arch], structures[arch]
    assert structure.output_layer == model.output_layer_name
    grouped = [conv for group in structure.conv_groups for conv in group.convs]
    all_convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(grouped) == sorted(all_convs)
    for group in structure.conv_groups:
        assert group.name == group.convs[0]
        assert all(model.get_submodule(c).out_channels == group.size for c in group.convs)
        assert all(model.get_submodule(n).num_features == group.size for n in group.norms)
    assert structure.total_kernels == sum(group.size for group in structure.conv_groups)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_linear_groups_are_the_hidden_linear_layers(arch, small_models, structures):
    model, structure = small_models[arch], structures[arch]
    hidden = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name != model.output_layer_name]
    assert [group.convs for group in structure.linear_groups] == [(name,) for name in hidden]
    for group in structure.linear_groups:
        assert group.kind == "linear" and group.norms == ()
        assert group.shape == (group.size,) == (model.get_submodule(group.name).out_features,)
    assert structure.total_units == sum(group.size for group in structure.linear_groups)
    assert structure.groups == structure.conv_groups + structure.linear_groups  # forward order


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_group_shapes_are_the_traced_output_shapes(arch, small_models, structures):
    """A conv group's shape is (C, H, W) where every producer and norm outputs that shape at
    the traced input size, else (C,): position masks are defined only for the former."""
    model, structure = small_models[arch], structures[arch]
    names = {module: name for name, module in model.named_modules()}
    shapes = {}

    def record(module, _inputs, output) -> None:
        shapes[names[module]] = tuple(output.shape[1:])

    hooks = [model.get_submodule(name).register_forward_hook(record)
             for group in structure.groups for name in (*group.convs, *group.norms)]
    with torch.no_grad():
        model.eval()(torch.randn(structure.input_shape))
    for hook in hooks:
        hook.remove()
    for group in structure.conv_groups:
        produced = {shapes[name] for name in (*group.convs, *group.norms)}
        assert group.shape == (produced.pop() if len(produced) == 1 else (group.size,))


def test_mixed_spatial_groups_take_channel_masks_only(structures):
    # A stride-2 depthwise conv joins the group of the pointwise conv feeding it.
    group = structures["mobilenet"].group_of("features.block1.pointwise.conv")
    assert "features.block2.depthwise.conv" in group.convs
    assert group.shape == (group.size,)
    assert structures["mobilenet"].group_of("features.block2.pointwise.conv").shape[1:] == (
        16, 16)


def test_batch_norms_belong_to_their_convs_groups(small_models, structures):
    structure = structures["vgg16"]
    assert structure.group_of("features.conv1.conv").norms == ("features.conv1.bn",)
    all_norms = [
        n for n, m in small_models["vgg16"].named_modules() if isinstance(m, nn.BatchNorm2d)
    ]
    assert sorted(n for g in structure.groups for n in g.norms) == sorted(all_norms)


def test_resnet20_stages_form_one_group_each(structures):
    groups = structures["resnet20"].groups
    # Stem + 9 inner block convs + 2 stages whose channels come from a shortcut conv.
    assert len(groups) == 12
    stage_groups = [group.convs for group in groups if len(group.convs) > 1]
    assert stage_groups == [
        ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"),
        ("layer2.0.conv2", "layer2.0.shortcut.conv", "layer2.1.conv2", "layer2.2.conv2"),
        ("layer3.0.conv2", "layer3.0.shortcut.conv", "layer3.1.conv2", "layer3.2.conv2"),
    ]


def test_rescnn_residual_pairs_share_channels_with_their_input(structures):
    group = structures["rescnn"].group_of("features.res2.conv2.conv")
    assert group.convs == ("features.conv4.conv", "features.res2.conv2.conv")


def test_incecnn_concatenated_branches_stay_separate(structures):
    structure = structures["incecnn"]
    assert all(len(group.convs) == 1 for group in structure.groups)
    assert len(structure.groups) == 12


def test_mobilenet_depthwise_convs_join_the_preceding_group(small_models, structures):
    model, structure = small_models["mobilenet"], structures["mobilenet"]
    previous = "features.stem.conv"
    for index in range(1, 14):
        depthwise = f"features.block{index}.depthwise.conv"
        assert model.get_submodule(depthwise).groups == model.get_submodule(depthwise).in_channels
        assert structure.group_of(depthwise) == structure.group_of(previous)
        assert structure.group_of(depthwise).name == previous
        previous = f"features.block{index}.pointwise.conv"
    assert len(structure.groups) == 14


def output_size(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_removing_a_channel_per_group_shrinks_exactly_its_members(arch, small_models, structures):
    """Pruning one channel (unit) of each group with the dependency graph must shrink every
    member by one and nothing twice: a group split in two would shrink its layers twice, a
    group holding uncoupled layers would leave some unshrunk, and a missed coupling would break
    the forward."""
    model, structure = copy.deepcopy(small_models[arch]).eval(), structures[arch]
    graph = tp.DependencyGraph().build_dependency(
        model, torch.randn(structure.input_shape), verbose=False
    )
    prune = {"conv": tp.prune_conv_out_channels, "linear": tp.prune_linear_out_channels}
    for group in structure.groups:
        layer = model.get_submodule(group.name)
        graph.get_pruning_group(layer, prune[group.kind], [0]).prune()
    for group in structure.groups:
        assert {output_size(model.get_submodule(name)) for name in group.convs} == {
            group.size - 1}
        assert {model.get_submodule(n).num_features for n in group.norms} <= {group.size - 1}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_tracing_leaves_the_model_unchanged():
    model = build_model("resnet20", 10, TEST_WIDTH).train()
    model.layer2.eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trace_structure(model)
    assert model.training and not model.layer2.training and model.layer3.training
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_frozen_models_trace_too():
    model = build_model("rescnn", 10, TEST_WIDTH).requires_grad_(False)
    assert len(trace_structure(model).groups) == 9


def test_models_outside_the_zoo_trace():
    model = torchvision.models.resnet18(num_classes=10)
    structure = trace_structure(model, (1, 3, 64, 64))
    assert structure.output_layer == "fc"
    assert len(structure.groups) == 12
    assert len(structure.group_of("layer1.1.conv2").convs) == 3


def test_hidden_linear_groups_carry_their_batch_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    structure = trace_structure(model)
    assert structure.output_layer == "7"
    (group,) = structure.linear_groups
    assert (group.name, group.convs, group.norms, group.shape) == ("4", ("4",), ("5",), (6,))


def test_models_without_convs_are_rejected():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ConfigError, match="Sequential: no prunable conv layers"):
        trace_structure(mlp)


@pytest.mark.parametrize("arch", ["mobilenet", "vgg16"])
def test_structure_json_round_trip(arch, structures):
    structure = structures[arch]
    assert ModelStructure.from_json(structure.to_json()) == structure


def test_version_1_structures_are_conv_groups_of_unknown_shape(structures):
    written = structures["resnet20"].to_json()
    for group in written["groups"]:
        del group["kind"], group["shape"]
    read = ModelStructure.from_json(written)
    assert all(group.kind == "conv" and group.shape == (group.size,) for group in read.groups)
    assert [g.convs for g in read.groups] == [g.convs for g in structures["resnet20"].groups]


def test_structure_json_with_an_unknown_group_kind_is_refused(structures):
    written = structures["lenet5"].to_json()
    written["groups"][-1]["kind"] = "attention"
    with pytest.raises(ArtifactError, match="classifier.fc2: unknown kind 'attention'"):
        ModelStructure.from_json(written)


def test_group_of_an_unknown_conv_is_named(structures):
    with pytest.raises(UnknownNameError, match="features.nope"):
        structures["vgg16"].group_of("features.nope")

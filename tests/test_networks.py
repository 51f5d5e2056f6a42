"""Networks a user may bring, through trace → mask → extract → compose → evaluate.

Each network has its expected outcome written down: ``HANDLED`` (the extracted modules
compute what the masked base model computes, and module sets, composed models and the
metrics work), or refused at trace time with a ConfigError whose message matches a pattern.

Torchvision families left out, and why: densenet121/161/169/201 (about 10 s each here; the
DenseNet construct, a BatchNorm over a growing concatenation, runs below as a small
``torchvision.models.DenseNet``), resnext*, wide_resnet* and regnet_y* (grouped convs,
refused as regnet_x_400mf is, but slower to build), vgg*/alexnet (a Linear of 25088 inputs
makes them slow; alexnet also needs larger inputs), inception_v3/googlenet (inception_v3
needs 75×75 inputs; googlenet takes about 5 s), efficientnet*/convnext*/vit*/swin*/maxvit
(convnext and the transformers normalise with LayerNorm, refused; efficientnet takes several
seconds), mnasnet* (inverted residuals with depthwise convs, as mobilenet_v2; about 10 s).
mobilenet_v2 and mobilenet_v3_small run at width 0.25.
"""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from conftest import randomise_norms
from torch import nn

from dnnmod.data import ImageSet
from dnnmod.errors import ConfigError
from dnnmod.models import ARCHITECTURES, build_model
from dnnmod.modules.compose import ComposedModel
from dnnmod.modules.extract import extract_module
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.masking import ensure_nonempty, masked_logits
from dnnmod.modules.metrics import evaluate
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure

HANDLED = "handled"
CLASSES = [2, 7]


class DenseStyle(nn.Module):
    """A stem and two dense layers: each BatchNorm reads the concatenation of the stem's and
    the earlier layers' channels, so its channels belong to several groups."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(14)
        self.conv2 = nn.Conv2d(14, 6, 3, padding=1)
        self.norm3 = nn.BatchNorm2d(20)
        self.fc = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.conv1(torch.relu(self.norm1(x)))], dim=1)
        x = torch.cat([x, self.conv2(torch.relu(self.norm2(x)))], dim=1)
        return self.fc(torch.relu(self.norm3(x)).mean((2, 3)))


class Depthwise(nn.Sequential):
    """Conv, depthwise conv with BatchNorm, pointwise conv, Linear classifier."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(12, 10))


class ConvClassifier(nn.Sequential):
    """SqueezeNet-style: the logits are the channels of a 1×1 conv, globally pooled."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
            nn.Conv2d(12, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Grouped(nn.Sequential):
    """RegNet-style: a conv with groups=4 that is not depthwise."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=4),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class Shuffled(nn.Sequential):
    """ShuffleNet-style channel shuffle as a module."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.ChannelShuffle(2), nn.Conv2d(8, 8, 3, padding=1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


class GroupNormed(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def small_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2),
                                       num_init_features=16, bn_size=2, num_classes=10)


def torchvision_model(name: str, **options):
    """An untrained torchvision classifier (weights=None) for 10 classes."""
    return lambda: getattr(torchvision.models, name)(num_classes=10, **options)


#: name → (builder, expected outcome: HANDLED or a pattern of the ConfigError)
NETWORKS = {
    **{f"zoo_{arch}": ((lambda arch=arch: build_model(arch, 10, width=0.125)), HANDLED)
       for arch in ARCHITECTURES},
    "dense_style": (DenseStyle, HANDLED),
    "depthwise": (Depthwise, HANDLED),
    "conv_classifier": (ConvClassifier, HANDLED),
    "grouped": (Grouped, r"layer '2' is a grouped convolution \(groups=4"),
    "channel_shuffle": (Shuffled, r"layer '1' runs channel_shuffle"),
    "group_norm": (GroupNormed, r"layer '1' is a GroupNorm"),
    "torchvision_densenet_small": (small_densenet, HANDLED),
    "torchvision_resnet18": (torchvision_model("resnet18"), HANDLED),
    "torchvision_mobilenet_v2": (torchvision_model("mobilenet_v2", width_mult=0.25), HANDLED),
    "torchvision_mobilenet_v3_small": (
        torchvision_model("mobilenet_v3_small", width_mult=0.25), HANDLED),
    "torchvision_squeezenet1_1": (torchvision_model("squeezenet1_1"), HANDLED),
    "torchvision_shufflenet_v2_x0_5": (
        torchvision_model("shufflenet_v2_x0_5"),
        r"layer 'stage2\.0' runs a channel shuffle or split: view"),
    "torchvision_regnet_x_400mf": (
        torchvision_model("regnet_x_400mf"), r"grouped convolution \(groups="),
}


def build(name: str) -> nn.Module:
    """The network, with random BatchNorm statistics and affine parameters: a norm's shift far
    from zero makes a leak of dropped channels through it show."""
    torch.manual_seed(0)
    return randomise_norms(NETWORKS[name][0](), seed=1)


def random_module_set(model: nn.Module, name: str) -> ModuleSet:
    """Modules for CLASSES keeping about half of every group's channels (units), never none."""
    structure = trace_structure(model)
    generator = torch.Generator().manual_seed(0)
    draws = {group.name: torch.rand(len(CLASSES), group.size, generator=generator)
             for group in structure.groups}
    masks = ensure_nonempty({group: draw > 0.5 for group, draw in draws.items()}, draws)
    return ModuleSet(approach="test", classes=CLASSES, masks=masks,
                     head=OwnLogitHead(CLASSES, 10), combination="argmax",
                     base={"arch": name, "weights_sha256": None}, structure=structure,
                     provenance={"approach": "test", "hyperparameters": {}, "seed": 0,
                                 "wall_seconds": 0.0})


def tiny_images(count: int = 4) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.tensor(CLASSES * (count // len(CLASSES)))
    return ImageSet(images, labels, [str(c) for c in range(10)], torch.full((3,), 0.5),
                    torch.full((3,), 0.25))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    scale = max(expected.abs().max().item(), 1.0)
    assert (actual - expected).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("name", sorted(n for n, (_, outcome) in NETWORKS.items()
                                        if outcome == HANDLED))
def test_handled_networks_extract_compose_and_evaluate(name):
    model = build(name)
    modules = random_module_set(model, name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        masked = masked_logits(model, modules.structure, modules.masks, x)
        extracted = extract_module(model, modules.structure, modules.module_masks(0))
        assert_within(extracted(x), masked[0])
        # Every module, extracted at a common shape and fused.
        composed = ComposedModel(model, modules)
        assert_within(composed(x), modules.scores(model, x))
    result = evaluate(model, modules, tiny_images(), base_accuracy=0.0)
    assert 0 < result["krr"] < 1
    assert 0 < result["module_size"] <= 1 and 0 < result["flops_fraction"] <= 1


@pytest.mark.parametrize("name", sorted(n for n, (_, outcome) in NETWORKS.items()
                                        if outcome != HANDLED))
def test_unsupported_networks_are_refused_at_trace_time(name):
    with pytest.raises(ConfigError, match=NETWORKS[name][1]):
        trace_structure(build(name))


def test_norms_over_concatenations_record_each_groups_slice():
    structure = trace_structure(build("dense_style"))
    slices = {group.name: dict(zip(group.norms, group.norm_offsets, strict=True))
              for group in structure.groups}
    assert slices["stem"] == {"norm1": 0, "norm2": 0, "norm3": 0}
    assert slices["conv1"] == {"norm2": 8, "norm3": 8}
    assert slices["conv2"] == {"norm3": 14}
    # The norms hold more channels than each group: channel masks only.
    assert all(group.shape == (group.size,) for group in structure.groups if group.kind == "conv"
               and group.name != "fc")


def test_norm_offsets_survive_the_json_round_trip():
    structure = trace_structure(build("dense_style"))
    assert type(structure).from_json(structure.to_json()) == structure


def test_a_conv_classifier_has_its_last_conv_as_output_layer():
    structure = trace_structure(build("conv_classifier"))
    assert structure.output_layer == "5"
    assert [group.name for group in structure.groups] == ["0", "3"]
    assert trace_structure(build("torchvision_squeezenet1_1")).output_layer == "classifier.1"


def test_depthwise_convs_join_the_group_they_read():
    structure = trace_structure(build("depthwise"))
    assert [(group.convs, group.norms) for group in structure.conv_groups] == [
        (("0", "2"), ("3",)), (("5",), ())]


def test_a_conv_that_cannot_be_the_output_layer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    with pytest.raises(ConfigError, match="output_layer_name"):
        trace_structure(model)


def test_a_residual_addition_onto_the_logits_is_refused():
    class LogitResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 10, 3)
            self.fc = nn.Linear(10, 10)

        def forward(self, x):
            pooled = self.conv(x).mean((2, 3))
            return self.fc(pooled) + pooled

    with pytest.raises(ConfigError, match=re.escape("output layer 'fc' shares its outputs")):
        trace_structure(LogitResidual())

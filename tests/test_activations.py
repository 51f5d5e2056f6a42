"""Activation sites and per-class activation statistics (dnnmod.modules.activations)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.models import build_model
from dnnmod.modules.activations import (
    STATISTICS,
    activation_sites,
    activation_statistics,
    capture_activations,
)
from dnnmod.modules.inference import activation_bytes_per_image
from dnnmod.modules.structure import trace_structure

WIDTH = 0.125


@pytest.fixture(scope="module")
def images(small_digits):
    return small_digits.train.take(range(160))


@pytest.fixture(scope="module")
def few_images(images):
    """Eight or so per class: float64 passes over them stay fast."""
    return images.take(range(80))


def _model(arch: str, images=None, dtype=torch.float32, **options) -> nn.Module:
    """A tiny zoo model; with ``images``, its BatchNorm statistics come from them, so that
    normalised activations are not the identity of an untouched BatchNorm."""
    torch.manual_seed(0)
    model = build_model(arch, 10, width=WIDTH, **options).to(dtype)
    if images is not None:
        with torch.no_grad():
            model(images.float_batch()[0].to(dtype))
    return model.eval()


def _group(structure, layer: str) -> str:
    return structure.group_of(layer).name


def _conv_bn_relu_sites(structure, prefixes) -> dict[str, str]:
    return {f"{prefix}.relu": _group(structure, f"{prefix}.conv") for prefix in prefixes}


def _classifier_sites(structure) -> dict[str, str]:
    return {f"classifier.relu{k}": _group(structure, f"classifier.fc{k}") for k in (1, 2)}


@pytest.mark.parametrize("arch", ["simcnn", "vgg16"])
def test_vgg_sites_are_conv_and_hidden_linear_relus(arch):
    model = _model(arch)
    structure = trace_structure(model)
    expected = {**_conv_bn_relu_sites(structure, [f"features.conv{k}" for k in range(1, 14)]),
                **_classifier_sites(structure)}
    sites = activation_sites(model, structure)
    assert list(sites.items()) == list(expected.items())  # forward order
    linear_names = {group.name for group in structure.linear_groups}
    assert {sites["classifier.relu1"], sites["classifier.relu2"]} == linear_names


@pytest.mark.parametrize("batch_norm", [True, False])
def test_resnet_post_addition_relus_carry_the_coupled_group(batch_norm):
    model = _model("resnet20", batch_norm=batch_norm)
    structure = trace_structure(model)
    expected = {"relu": _group(structure, "conv1")}
    for stage in (1, 2, 3):
        for block in range(3):
            prefix = f"layer{stage}.{block}"
            expected[f"{prefix}.relu1"] = _group(structure, f"{prefix}.conv1")
            expected[f"{prefix}.relu2"] = _group(structure, f"{prefix}.conv2")
    sites = activation_sites(model, structure)
    assert list(sites.items()) == list(expected.items())
    # Identity shortcuts: stage 1's post-addition ReLUs carry the stem's channels; projection
    # shortcuts: a stage's ReLUs carry the group of its first block's conv2 and shortcut conv.
    assert {sites[f"layer1.{b}.relu2"] for b in range(3)} == {"conv1"}
    assert {sites[f"layer2.{b}.relu2"] for b in range(3)} == {"layer2.0.conv2"}
    assert "layer2.0.shortcut.conv" in structure.group_of("layer2.0.conv2").convs


def test_mobilenet_depthwise_relus_carry_the_feeding_pointwise_group():
    model = _model("mobilenet")
    structure = trace_structure(model)
    prefixes = ["features.stem"]
    for block in range(1, 14):
        prefixes += [f"features.block{block}.depthwise", f"features.block{block}.pointwise"]
    sites = activation_sites(model, structure)
    assert list(sites.items()) == list(_conv_bn_relu_sites(structure, prefixes).items())
    assert sites["features.block1.depthwise.relu"] == sites["features.stem.relu"]
    assert sites["features.block5.depthwise.relu"] == sites["features.block4.pointwise.relu"]


def test_lenet_sites():
    model = _model("lenet5")
    structure = trace_structure(model)
    expected = {"features.relu1": "features.conv1", "features.relu2": "features.conv2",
                **_classifier_sites(structure)}
    assert activation_sites(model, structure) == expected
    assert [group.name for group in structure.linear_groups] == ["classifier.fc1",
                                                                 "classifier.fc2"]


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class ReluOnLogits(FunctionalNet):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.out = nn.ReLU()

    def forward(self, x):
        return self.out(self.fc(self.relu(self.conv(x)).mean((2, 3))))


class ReusedRelu(ReluOnLogits):
    def forward(self, x):
        return self.fc(self.relu(self.relu(self.conv(x)).mean((2, 3))))


def test_functional_activations_have_no_sites():
    model = FunctionalNet()
    with pytest.raises(ConfigError, match=r"FunctionalNet.*nn\.ReLU modules"):
        activation_sites(model, trace_structure(model))


def test_relu_on_the_logits_is_no_site_and_a_reused_relu_is_refused():
    model = ReluOnLogits()
    assert activation_sites(model, trace_structure(model)) == {"relu": "conv"}
    model = ReusedRelu()
    with pytest.raises(ConfigError, match=r"ReusedRelu: nn\.ReLU 'relu' is called more"):
        activation_sites(model, trace_structure(model))


def _naive_statistics(model, images, sites, classes, positions):
    """All images in one pass, every site's output kept, per-class statistics in float64."""
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[site].register_forward_hook(
        lambda _m, _i, output, site=site: outputs.__setitem__(site, output.double()))
        for site in sites]
    with torch.no_grad():
        model(images.float_batch()[0].to(next(model.parameters()).dtype))
    for handle in handles:
        handle.remove()
    rows = [images.labels == label for label in classes]
    result = {statistic: {} for statistic in STATISTICS}
    for site, a in outputs.items():
        conv = a.dim() == 4
        value = a if positions or not conv else a.mean((2, 3))
        l1 = a.abs().sum((2, 3)) if conv else a.abs()
        result["frequency"][site] = torch.stack([(value[r] > 0).double().mean(0) for r in rows])
        result["mean"][site] = torch.stack([value[r].mean(0) for r in rows])
        result["l1"][site] = torch.stack([l1[r].mean(0) for r in rows])
    return result


def _assert_statistics_equal(stats, expected):
    for statistic in STATISTICS:
        computed = getattr(stats, statistic)
        assert computed.keys() == expected[statistic].keys()
        for site, tensor in expected[statistic].items():
            torch.testing.assert_close(computed[site], tensor, rtol=1e-6, atol=1e-6,
                                       msg=f"{statistic} of {site}")


@pytest.mark.parametrize(("arch", "options", "positions"), [
    ("resnet20", {}, False),
    ("resnet20", {}, True),
    ("resnet20", {"batch_norm": False}, False),
    ("simcnn", {}, False),
    ("lenet5", {}, True),
])
def test_statistics_equal_a_full_batch_computation_at_any_chunk_size(few_images, arch, options,
                                                                     positions):
    images = few_images
    # In float64, so that the conv kernels' float32 rounding, which depends on the batch size
    # on a CPU, does not hide the statistics' own (the statistics take the model's dtype).
    model = _model(arch, images, torch.float64, **options)
    structure = trace_structure(model)
    sites = activation_sites(model, structure)
    classes = torch.unique(images.labels).tolist()
    expected = _naive_statistics(model, images, sites, classes, positions)
    # A budget of eight images' activations: tens of passes, all summed into the same numbers.
    tiny = 8 * activation_bytes_per_image(model, (1, *images.images.shape[1:]))
    for budget in (None, tiny):
        stats = activation_statistics(model, structure, images, positions=positions,
                                      budget=budget)
        assert stats.classes == tuple(classes) and stats.sites == sites
        assert stats.counts.tolist() == [int((images.labels == c).sum()) for c in classes]
        _assert_statistics_equal(stats, expected)  # shapes included: l1 is always (K, C)


def test_a_tiny_budget_bounds_the_images_per_pass(few_images):
    images = few_images
    model = _model("resnet20", images)
    structure = trace_structure(model)
    per_image = activation_bytes_per_image(model, (1, *images.images.shape[1:]))
    batch_sizes = []
    model.register_forward_pre_hook(lambda _m, inputs: batch_sizes.append(len(inputs[0])))
    by_positions = {}
    for positions, most in ((False, 4), (True, 2)):
        batch_sizes.clear()
        by_positions[positions] = activation_statistics(
            model, structure, images, positions=positions, budget=4 * per_image)
        # Per-position sums need float64 copies of a site's output: half the chunk.
        assert max(batch_sizes) == most
        assert by_positions[positions].counts.sum() == len(images)
    torch.testing.assert_close(by_positions[True].l1, by_positions[False].l1)


@pytest.fixture(scope="module")
def resnet20_statistics(images):
    """A tiny resnet20, its structure and its statistics over every class."""
    model = _model("resnet20", images)
    structure = trace_structure(model)
    return model, structure, activation_statistics(model, structure, images)


def test_classes_and_sites_restrict_the_statistics(images, resnet20_statistics):
    model, structure, every = resnet20_statistics
    some = activation_statistics(model, structure, images, classes=[7, 2])
    assert some.classes == (7, 2)
    assert some.counts.tolist() == every.counts[[7, 2]].tolist()
    for statistic in STATISTICS:
        for site, tensor in getattr(some, statistic).items():
            torch.testing.assert_close(tensor, getattr(every, statistic)[site][[7, 2]])
    last = {"layer3.2.relu2": "layer3.0.conv2"}
    one_site = activation_statistics(model, structure, images, classes=[7], sites=last)
    assert one_site.sites == last and list(one_site.mean) == list(last)
    torch.testing.assert_close(one_site.mean["layer3.2.relu2"], some.mean["layer3.2.relu2"][:1])
    for bad in ([2, 2], [10], [-1]):
        with pytest.raises(ConfigError, match="need distinct labels that have images"):
            activation_statistics(model, structure, images, classes=bad)


def test_group_view_reduces_the_sites_of_a_group(resnet20_statistics):
    stats = resnet20_statistics[2]
    stem_sites = ["relu", "layer1.0.relu2", "layer1.1.relu2", "layer1.2.relu2"]
    stacked = torch.stack([stats.frequency[site] for site in stem_sites])
    union = stats.group_view("frequency", "union")
    assert list(union) == list(dict.fromkeys(stats.sites.values()))
    assert torch.equal(union["conv1"], stacked.amax(0))
    assert torch.equal(stats.group_view("frequency", "intersection")["conv1"], stacked.amin(0))
    assert torch.equal(stats.group_view("frequency", "first")["conv1"], stacked[0])
    torch.testing.assert_close(stats.group_view("frequency", "mean")["conv1"], stacked.mean(0))
    assert torch.equal(stats.group_view("l1", "intersection")["layer1.0.conv1"],
                       stats.l1["layer1.0.relu1"])
    with pytest.raises(ConfigError, match="unknown activation statistic 'mode'"):
        stats.group_view("mode", "union")
    with pytest.raises(ConfigError, match="unknown reduction 'max'"):
        stats.group_view("mean", "max")


def test_position_statistics_of_sites_of_different_sizes_take_only_first(images):
    # ResCNN's residual pair carries the channels of the conv before the pooling: 32x32 and
    # 16x16 maps in one group.
    model = _model("rescnn", images)
    stats = activation_statistics(model, trace_structure(model), images, positions=True,
                                  classes=[0, 1])
    first = stats.group_view("frequency", "first")["features.conv2.conv"]
    assert first.shape[2:] == (32, 32)
    with pytest.raises(ConfigError, match=r"'features.conv2.conv'.*reduce='first'"):
        stats.group_view("frequency", "union")
    assert stats.group_view("l1", "union")["features.conv2.conv"].shape == first.shape[:2]


def test_statistics_restore_modes_and_remove_hooks(images):
    model = _model("simcnn", images).train()
    model.features.conv1.bn.eval()
    activation_statistics(model, trace_structure(model), images, classes=[0])
    assert model.training and model.classifier.training
    assert not model.features.conv1.bn.training
    assert not any(module._forward_hooks for module in model.modules())


def test_captured_activations_keep_their_graph(images):
    model = _model("resnet20", images).train()
    sites = activation_sites(model, trace_structure(model))
    x, _ = images.float_batch(torch.arange(8))
    with capture_activations(model, sites) as captured:
        logits = model(x)
        assert list(captured) == list(sites)
        assert captured["layer3.2.relu2"].shape == (8, model.fc.in_features, 8, 8)
        loss = sum(activation.mean() for activation in captured.values())
        assert all(activation.grad_fn is not None for activation in captured.values())
    loss.backward()
    assert logits.requires_grad
    for conv in (model.conv1, model.layer3[2].conv1):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert not any(module._forward_hooks for module in model.modules())
    with (pytest.raises(ConfigError, match=r"ResNet has no modules \['nowhere'\]"),
          capture_activations(model, ["nowhere"])):
        pass

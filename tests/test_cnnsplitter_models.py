"""CNNSplitter's own SimCNN and ResCNN (no BatchNorm; SimCNN with a 512-512 classifier) as
options of dnnmod's simcnn and rescnn, against the layer shapes of CNNSplitter's code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.models import build_model
from dnnmod.modules.structure import trace_structure

# CNNSplitter's models/simcnn.py and models/rescnn.py: (in, out) channels of each 3x3 conv, in
# forward order, and the classifier's Linear layers (in, out) for 10 classes.
SIMCNN_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512), *[(512, 512)] * 5]
SIMCNN_LINEARS = [(512, 512), (512, 512), (512, 10)]
RESCNN_CONVS = [(3, 64), (64, 128), (128, 128), (128, 128), (128, 256), (256, 512),
                *[(512, 512)] * 6]
RESCNN_LINEARS = [(512, 10)]
CNNSPLITTER_OPTIONS = {"simcnn": {"batch_norm": False, "hidden_features": 512},
                       "rescnn": {"batch_norm": False, "dropout": 0.4}}


def layer_shapes(model: nn.Module, kind: type[nn.Module]) -> list[tuple[int, int]]:
    return [(layer.weight.shape[1], layer.weight.shape[0]) for layer in model.modules()
            if isinstance(layer, kind)]


@pytest.mark.parametrize("arch, convs, linears", [("simcnn", SIMCNN_CONVS, SIMCNN_LINEARS),
                                                  ("rescnn", RESCNN_CONVS, RESCNN_LINEARS)])
def test_cnnsplitters_models_have_its_layers_and_no_batch_norm(arch, convs, linears):
    model = build_model(arch, 10, **CNNSPLITTER_OPTIONS[arch])
    assert layer_shapes(model, nn.Conv2d) == convs
    assert all(layer.bias is not None and layer.kernel_size == (3, 3)
               for layer in model.modules() if isinstance(layer, nn.Conv2d))
    assert layer_shapes(model, nn.Linear) == linears
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in model.modules())
    weights = sum(3 * 3 * i * o + o for i, o in convs) + sum(i * o + o for i, o in linears)
    assert sum(p.numel() for p in model.parameters()) == weights
    dropouts = [layer.p for layer in model.modules() if isinstance(layer, nn.Dropout)]
    assert dropouts == ([0.5, 0.5] if arch == "simcnn" else [0.4])


def test_the_defaults_stay_gradsplitters_models():
    simcnn = build_model("simcnn", 10)
    assert layer_shapes(simcnn, nn.Linear) == [(512, 4096), (4096, 4096), (4096, 10)]
    assert sum(isinstance(layer, nn.BatchNorm2d) for layer in simcnn.modules()) == 13
    rescnn = build_model("rescnn", 10)
    assert sum(isinstance(layer, nn.BatchNorm2d) for layer in rescnn.modules()) == 12


@pytest.mark.parametrize("arch", ["simcnn", "rescnn"])
def test_cnnsplitters_models_trace_and_scale_with_width(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=0.25, **CNNSPLITTER_OPTIONS[arch]).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    structure = trace_structure(model)
    grouped = {name for group in structure.groups for name in group.convs}
    convs = {name for name, layer in model.named_modules() if isinstance(layer, nn.Conv2d)}
    hidden = {"classifier.fc1", "classifier.fc2"} if arch == "simcnn" else set()
    assert grouped == convs | hidden  # every conv, and SimCNN's hidden classifier layers
    if arch == "simcnn":  # the hidden classifier units: 512 x 0.25
        assert layer_shapes(model, nn.Linear)[1] == (128, 128)
    else:  # the residual pairs share their input's channels, as with BatchNorm
        group = structure.group_of("features.res2.conv2.conv")
        assert group.convs == ("features.conv4.conv", "features.res2.conv2.conv")


@pytest.mark.parametrize("options, message", [
    ({"hidden_features": 0}, r"hidden_features: 0 is out of range \[1, inf\]"),
    ({"hidden_features": 512.0}, r"hidden_features: expected int, got 512\.0"),
    ({"batch_norm": "no"}, r"batch_norm: expected bool, got 'no'"),
])
def test_bad_model_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        build_model("simcnn", 10, **options)

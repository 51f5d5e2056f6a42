"""The small "simple" weak models of CNNSplitter's patching experiment (no BatchNorm).

``simple_simcnn`` is the weak counterpart of SimCNN, ``simple_rescnn`` that of ResCNN.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dnnmod.models.blocks import ConvBNReLU, init_conv_weights, scaled
from dnnmod.models.rescnn import ResidualPair


class SimpleCNN(nn.Module):
    """Four 3x3 conv layers of 64 kernels, each followed by 2x2 max pooling, then one FC.

    A 32x32 input leaves a 2x2 map; larger inputs are average-pooled to 2x2.

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count.
    """

    output_layer_name = "fc"

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        channels = scaled(64, width)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for index in range(4):
            layers[f"conv{index + 1}"] = ConvBNReLU(
                3 if index == 0 else channels, channels, batch_norm=False
            )
            layers[f"pool{index + 1}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(channels * 2 * 2, num_classes)
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class SimpleResCNN(nn.Module):
    """Conv-pool, a residual pair of convs, conv-pool (64 kernels each), dropout, one FC.

    A 32x32 input leaves an 8x8 map; larger inputs are average-pooled to 8x8.

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count.
        dropout: dropout probability before the output layer.
    """

    output_layer_name = "classifier.fc"

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.4) -> None:
        super().__init__()
        channels = scaled(64, width)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=ConvBNReLU(3, channels, batch_norm=False),
                pool1=nn.MaxPool2d(2),
                res1=ResidualPair(channels, batch_norm=False),
                conv2=ConvBNReLU(channels, channels, batch_norm=False),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(8)
        self.classifier = nn.Sequential(
            OrderedDict(dropout=nn.Dropout(dropout), fc=nn.Linear(channels * 8 * 8, num_classes))
        )
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def simple_simcnn(num_classes: int = 10, width: float = 1.0) -> SimpleCNN:
    """Weak "simple" model for SimCNN patching; see :class:`SimpleCNN`."""
    return SimpleCNN(num_classes, width)


def simple_rescnn(num_classes: int = 10, width: float = 1.0, dropout: float = 0.4) -> SimpleResCNN:
    """Weak "simple" model for ResCNN patching; see :class:`SimpleResCNN`."""
    return SimpleResCNN(num_classes, width, dropout)

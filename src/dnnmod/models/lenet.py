"""LeNet-5 for 32x32 RGB inputs (MODA's weak model for patching)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dnnmod.models.blocks import init_conv_weights, scaled


class LeNet5(nn.Module):
    """Two 5x5 conv layers (6 and 16 kernels) with max pooling, then FC 120-84-N.

    A 32x32 input leaves a 5x5 map, which the adaptive pooling passes unchanged; larger
    inputs are pooled to 5x5 so the classifier keeps its size.

    Args:
        num_classes: number of output logits.
        width: multiplier for conv channel counts and hidden FC sizes.
    """

    output_layer_name = "classifier.fc3"

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c6, c16, h120, h84 = (scaled(c, width) for c in (6, 16, 120, 84))
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, c6, 5),
                relu1=nn.ReLU(inplace=False),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(c6, c16, 5),
                relu2=nn.ReLU(inplace=False),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(5)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(c16 * 5 * 5, h120),
                relu1=nn.ReLU(inplace=False),
                fc2=nn.Linear(h120, h84),
                relu2=nn.ReLU(inplace=False),
                fc3=nn.Linear(h84, num_classes),
            )
        )
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def lenet5(num_classes: int = 10, width: float = 1.0) -> LeNet5:
    """LeNet-5; see :class:`LeNet5`."""
    return LeNet5(num_classes, width)

"""InceCNN, GradSplitter's CNN with three inception blocks (parallel 1x1, 3x3, 5x5 convs)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dnnmod.models.blocks import ConvBNReLU, init_conv_weights, scaled


class InceptionBlock(nn.Module):
    """Three parallel conv branches over the same input, concatenated along channels.

    Args:
        in_channels: channels of the input.
        channels_1x1: kernels of the 1x1 branch.
        channels_3x3: kernels of the 3x3 branch.
        channels_5x5: kernels of the 5x5 branch.
    """

    def __init__(
        self, in_channels: int, channels_1x1: int, channels_3x3: int, channels_5x5: int
    ) -> None:
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_channels, channels_1x1, kernel_size=1)
        self.branch3x3 = ConvBNReLU(in_channels, channels_3x3, kernel_size=3)
        self.branch5x5 = ConvBNReLU(in_channels, channels_5x5, kernel_size=5)
        self.out_channels = channels_1x1 + channels_3x3 + channels_5x5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x)], dim=1)


class InceCNN(nn.Module):
    """Three 3x3 convs (64-128-256), then inception blocks (256/256/64, 512/512/64 twice).

    A 2x2 max pooling follows the stem and the first two inception blocks; global average
    pooling and dropout precede the output layer.

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count.
        dropout: dropout probability before the output layer; 0 disables it.
    """

    output_layer_name = "classifier.fc"

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.4) -> None:
        super().__init__()
        c64, c128, c256, c512 = (scaled(c, width) for c in (64, 128, 256, 512))
        inception1 = InceptionBlock(c256, c256, c256, c64)
        inception2 = InceptionBlock(inception1.out_channels, c512, c512, c64)
        inception3 = InceptionBlock(inception2.out_channels, c512, c512, c64)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=ConvBNReLU(3, c64),
                conv2=ConvBNReLU(c64, c128),
                conv3=ConvBNReLU(c128, c256),
                pool1=nn.MaxPool2d(2),
                inception1=inception1,
                pool2=nn.MaxPool2d(2),
                inception2=inception2,
                pool3=nn.MaxPool2d(2),
                inception3=inception3,
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            OrderedDict(
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(inception3.out_channels, num_classes),
            )
        )
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def incecnn(num_classes: int = 10, width: float = 1.0, dropout: float = 0.4) -> InceCNN:
    """InceCNN (3 conv layers and 3 inception blocks with BatchNorm); see :class:`InceCNN`."""
    return InceCNN(num_classes, width, dropout)

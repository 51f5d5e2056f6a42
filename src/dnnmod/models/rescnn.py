"""ResCNN, GradSplitter's and CNNSplitter's 12-layer CNN with three residual connections
(GradSplitter's with BatchNorm, CNNSplitter's without: option ``batch_norm``)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dnnmod.models.blocks import ConvBNReLU, init_conv_weights, scaled


class ResidualPair(nn.Module):
    """Two same-width conv layers whose activated output is added to the block's input.

    The addition comes after the second ReLU, as in the reference, so the block's output
    channels are coupled with those of the layer that produced its input.

    Args:
        channels: channels of the input, of both convolutions and of the output.
        batch_norm: whether each convolution is followed by BatchNorm.
    """

    def __init__(self, channels: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(channels, channels, batch_norm=batch_norm)
        self.conv2 = ConvBNReLU(channels, channels, batch_norm=batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + x


class ResCNN(nn.Module):
    """Conv stack 64-128-[128-128]-256-512-[512-512]-512-512-[512-512] with five poolings.

    Brackets are :class:`ResidualPair` blocks. The defaults are GradSplitter's ResCNN (its
    models/rescnn.py: Conv-BN per layer, dropout 0.5); ``batch_norm=False, dropout=0.4`` is
    CNNSplitter's (its models/rescnn.py), the same layout and residual additions otherwise.
    Deviation from both, stated: He-normal (fan-out) conv kernels, where both keep PyTorch's
    default initialisation. The references flatten the 1x1 map of a 32x32 input; a global
    average pooling does the same there and also accepts 64x64 inputs.

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count.
        dropout: dropout probability before the output layer; 0 disables it.
        batch_norm: whether each convolution is followed by BatchNorm.
    """

    output_layer_name = "classifier.fc"

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.5,
                 batch_norm: bool = True) -> None:
        super().__init__()
        c64, c128, c256, c512 = (scaled(c, width) for c in (64, 128, 256, 512))

        def conv(in_channels: int, out_channels: int) -> ConvBNReLU:
            return ConvBNReLU(in_channels, out_channels, batch_norm=batch_norm)

        self.features = nn.Sequential(
            OrderedDict(
                conv1=conv(3, c64),
                conv2=conv(c64, c128),
                pool1=nn.MaxPool2d(2),
                res1=ResidualPair(c128, batch_norm),
                conv3=conv(c128, c256),
                pool2=nn.MaxPool2d(2),
                conv4=conv(c256, c512),
                pool3=nn.MaxPool2d(2),
                res2=ResidualPair(c512, batch_norm),
                conv5=conv(c512, c512),
                pool4=nn.MaxPool2d(2),
                conv6=conv(c512, c512),
                pool5=nn.MaxPool2d(2),
                res3=ResidualPair(c512, batch_norm),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            OrderedDict(dropout=nn.Dropout(dropout), fc=nn.Linear(c512, num_classes))
        )
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def rescnn(num_classes: int = 10, width: float = 1.0, dropout: float = 0.5,
           batch_norm: bool = True) -> ResCNN:
    """ResCNN (12 conv layers, by default with BatchNorm, 3 residual blocks); see
    :class:`ResCNN`."""
    return ResCNN(num_classes, width, dropout, batch_norm)

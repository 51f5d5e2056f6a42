"""MobileNet v1 for 32x32 inputs (as used by MODA): a stride-1 stem and depthwise-separable
blocks."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dnnmod.models.blocks import ConvBNReLU, init_conv_weights, scaled

# (kernels of the pointwise conv, stride of the depthwise conv) for each block.
MOBILENET_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class DepthwiseSeparable(nn.Sequential):
    """A 3x3 depthwise conv followed by a 1x1 pointwise conv, each with BatchNorm and ReLU.

    Args:
        in_channels: channels of the input and of the depthwise convolution.
        out_channels: kernels of the pointwise convolution.
        stride: stride of the depthwise convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            OrderedDict(
                depthwise=ConvBNReLU(
                    in_channels, in_channels, 3, stride=stride, groups=in_channels, bias=False
                ),
                pointwise=ConvBNReLU(in_channels, out_channels, 1, bias=False),
            )
        )


class MobileNet(nn.Module):
    """Stem conv (32 kernels, stride 1), 13 depthwise-separable blocks, global average pooling.

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count.
    """

    output_layer_name = "fc"

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        in_channels = scaled(32, width)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=ConvBNReLU(3, in_channels, bias=False)
        )
        for index, (channels, stride) in enumerate(MOBILENET_BLOCKS):
            out_channels = scaled(channels, width)
            layers[f"block{index + 1}"] = DepthwiseSeparable(in_channels, out_channels, stride)
            in_channels = out_channels
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet(num_classes: int = 10, width: float = 1.0) -> MobileNet:
    """CIFAR MobileNet v1; see :class:`MobileNet`."""
    return MobileNet(num_classes, width)

"""VGG16 with BatchNorm for 32x32 inputs, as trained by MwT and MODA.

The classifier has two hidden layers of 512 units with dropout (not torchvision's 4096).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dnnmod.models.blocks import ConvBNReLU, init_conv_weights, scaled

# Kernels per conv layer; "M" is a 2x2 max pooling. Five poolings take 32x32 down to 1x1.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


def vgg_features(layout: tuple[int | str, ...], width: float,
                 batch_norm: bool = True) -> nn.Sequential:
    """Conv-BN-ReLU stack described by ``layout``, with conv channels scaled by ``width``
    (Conv-ReLU without ``batch_norm``).

    Children are named ``conv1`` ... ``convK`` and ``pool1`` ... ``poolP`` in forward order.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    in_channels, convs, pools = 3, 0, 0
    for entry in layout:
        if entry == "M":
            pools += 1
            layers[f"pool{pools}"] = nn.MaxPool2d(2)
        else:
            convs += 1
            out_channels = scaled(int(entry), width)
            layers[f"conv{convs}"] = ConvBNReLU(in_channels, out_channels,
                                                batch_norm=batch_norm)
            in_channels = out_channels
    return nn.Sequential(layers)


def feature_channels(features: nn.Sequential) -> int:
    """Output channels of a stack built by :func:`vgg_features`."""
    return [layer for layer in features if isinstance(layer, ConvBNReLU)][-1].out_channels


class VGG(nn.Module):
    """VGG-style network: conv stack, global average pooling, 3-layer classifier.

    On 32x32 inputs the pooled map is already 1x1, so the average pooling only matters for
    larger inputs (64x64 Tiny-ImageNet), where it keeps the classifier's input size fixed.

    Args:
        features: the conv stack (see :func:`vgg_features`).
        num_classes: number of output logits.
        hidden_features: units of each of the two hidden classifier layers.
        dropout: dropout probability after each hidden layer.
    """

    output_layer_name = "classifier.fc3"

    def __init__(
        self, features: nn.Sequential, num_classes: int, hidden_features: int, dropout: float
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(feature_channels(features), hidden_features),
                relu1=nn.ReLU(inplace=False),
                dropout1=nn.Dropout(dropout),
                fc2=nn.Linear(hidden_features, hidden_features),
                relu2=nn.ReLU(inplace=False),
                dropout2=nn.Dropout(dropout),
                fc3=nn.Linear(hidden_features, num_classes),
            )
        )
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16(num_classes: int = 10, width: float = 1.0, dropout: float = 0.5) -> VGG:
    """VGG16-BN with a 512-512 classifier (MwT/MODA).

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count and hidden classifier size.
        dropout: dropout probability in the classifier; 0 disables it (overfit weak models).
    """
    return VGG(vgg_features(VGG16_LAYOUT, width), num_classes, scaled(512, width), dropout)

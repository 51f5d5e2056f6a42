"""SimCNN: GradSplitter's VGG16-BN with a 4096-4096 classifier, and CNNSplitter's without
BatchNorm and with a 512-512 classifier (options ``batch_norm``, ``hidden_features``)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dnnmod.models.blocks import init_conv_weights, scaled
from dnnmod.models.vgg import VGG16_LAYOUT, feature_channels, vgg_features


class SimCNN(nn.Module):
    """VGG16 conv stack (with or without BatchNorm) followed by dropout-FC-ReLU,
    dropout-FC-ReLU, FC.

    The defaults are GradSplitter's SimCNN (models/simcnn.py of its code: Conv-BN per layer,
    4096-4096 classifier); ``batch_norm=False, hidden_features=512`` is CNNSplitter's (its
    models/simcnn.py: plain convs, 512-512 classifier), the same otherwise: dropout 0.5 before
    each hidden layer, He-normal (fan-out) conv kernels with zero biases, PyTorch's default
    Linear initialisation. The references flatten the 1x1x512 map of a 32x32 input; a global
    average pooling does the same there and keeps the classifier's input size fixed on 64x64
    inputs.

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count and hidden classifier size.
        dropout: dropout probability before each hidden layer; 0 disables it.
        batch_norm: whether each convolution is followed by BatchNorm.
        hidden_features: units of each of the two hidden classifier layers (before ``width``).
    """

    output_layer_name = "classifier.fc3"

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.5,
                 batch_norm: bool = True, hidden_features: int = 4096) -> None:
        super().__init__()
        self.features = vgg_features(VGG16_LAYOUT, width, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(hidden_features, width)
        self.classifier = nn.Sequential(
            OrderedDict(
                dropout1=nn.Dropout(dropout),
                fc1=nn.Linear(feature_channels(self.features), hidden),
                relu1=nn.ReLU(inplace=False),
                dropout2=nn.Dropout(dropout),
                fc2=nn.Linear(hidden, hidden),
                relu2=nn.ReLU(inplace=False),
                fc3=nn.Linear(hidden, num_classes),
            )
        )
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def simcnn(num_classes: int = 10, width: float = 1.0, dropout: float = 0.5,
           batch_norm: bool = True, hidden_features: int = 4096) -> SimCNN:
    """SimCNN (13 conv layers, by default with BatchNorm and a 4096-4096 classifier:
    GradSplitter's; CNNSplitter's has neither BatchNorm nor more than 512 hidden units); see
    :class:`SimCNN`."""
    return SimCNN(num_classes, width, dropout, batch_norm, hidden_features)

"""ResNets for 32x32 inputs: ResNet18 with a CIFAR stem (MwT, MODA) and the CIFAR ResNets
20/32/56 of He et al. (Pan & Rajan, who train them without BatchNorm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnnmod.models.blocks import init_conv_weights, scaled


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def _init_glorot_weights(model: nn.Module) -> None:
    # Without BatchNorm, He-initialised residual sums grow with depth (ResNet-56 logits in the
    # thousands); Glorot-uniform, the Keras default Pan & Rajan trained with, keeps them small.
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


class Shortcut(nn.Sequential):
    """Projection shortcut: a strided 1x1 conv (and BatchNorm) where the block changes shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not batch_norm)
        if batch_norm:
            self.bn = nn.BatchNorm2d(out_channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; ReLU after the addition.

    Args:
        in_channels: channels of the input.
        out_channels: kernels of both convolutions.
        stride: stride of the first convolution (2 halves the spatial size).
        batch_norm: whether each convolution is followed by BatchNorm; without it the
            convolutions have biases.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, 3, stride=stride, padding=1, bias=not batch_norm
        )
        self.bn1 = _norm(out_channels, batch_norm)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not batch_norm)
        self.bn2 = _norm(out_channels, batch_norm)
        self.shortcut = (
            Shortcut(in_channels, out_channels, stride, batch_norm)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem conv (stride 1, no max pooling), stages of BasicBlocks, global average pooling.

    Each stage after the first halves the spatial size in its first block.

    Args:
        stage_channels: kernels of the blocks in each stage; the stem has as many as stage 1.
        blocks_per_stage: number of BasicBlocks in each stage.
        num_classes: number of output logits.
        batch_norm: whether convolutions are followed by BatchNorm; without it convolutions
            have biases and weights start Glorot-uniform instead of He-normal.
    """

    output_layer_name = "fc"

    def __init__(
        self,
        stage_channels: Sequence[int],
        blocks_per_stage: Sequence[int],
        num_classes: int = 10,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stage_channels[0], 3, padding=1, bias=not batch_norm)
        self.bn1 = _norm(stage_channels[0], batch_norm)
        self.relu = nn.ReLU(inplace=False)
        in_channels = stage_channels[0]
        self.stage_names: list[str] = []
        for index, (channels, blocks) in enumerate(
            zip(stage_channels, blocks_per_stage, strict=True)
        ):
            stage = nn.Sequential()
            for block_index in range(blocks):
                stride = 2 if index > 0 and block_index == 0 else 1
                stage.append(BasicBlock(in_channels, channels, stride, batch_norm))
                in_channels = channels
            self.stage_names.append(f"layer{index + 1}")
            self.add_module(self.stage_names[-1], stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        if batch_norm:
            init_conv_weights(self)
        else:
            _init_glorot_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet18 (4 stages of 2 blocks, 64-512 channels) with a CIFAR stem (MwT/MODA).

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count.
    """
    channels = [scaled(c, width) for c in (64, 128, 256, 512)]
    return ResNet(channels, [2, 2, 2, 2], num_classes)


def _cifar_resnet(blocks: int, num_classes: int, width: float, batch_norm: bool) -> ResNet:
    channels = [scaled(c, width) for c in (16, 32, 64)]
    return ResNet(channels, [blocks] * 3, num_classes, batch_norm)


def resnet20(num_classes: int = 10, width: float = 1.0, batch_norm: bool = True) -> ResNet:
    """CIFAR ResNet-20: 3 stages of 3 BasicBlocks with 16/32/64 channels.

    Args:
        num_classes: number of output logits.
        width: multiplier for every conv channel count.
        batch_norm: whether convolutions are followed by BatchNorm (Pan & Rajan: False).
    """
    return _cifar_resnet(3, num_classes, width, batch_norm)


def resnet32(num_classes: int = 10, width: float = 1.0, batch_norm: bool = True) -> ResNet:
    """CIFAR ResNet-32: 3 stages of 5 BasicBlocks; arguments as for :func:`resnet20`."""
    return _cifar_resnet(5, num_classes, width, batch_norm)


def resnet56(num_classes: int = 10, width: float = 1.0, batch_norm: bool = True) -> ResNet:
    """CIFAR ResNet-56: 3 stages of 9 BasicBlocks; arguments as for :func:`resnet20`."""
    return _cifar_resnet(9, num_classes, width, batch_norm)

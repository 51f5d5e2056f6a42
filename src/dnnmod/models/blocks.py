"""Building blocks shared by the model families."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def scaled(count: int, width: float) -> int:
    """``count`` channels or hidden units multiplied by ``width``, rounded, at least 1."""
    return max(1, int(count * width + 0.5))


class ConvBNReLU(nn.Sequential):
    """Conv2d, optional BatchNorm2d, ReLU, with children named ``conv``, ``bn``, ``relu``.

    Args:
        in_channels: channels of the input feature map.
        out_channels: kernels of the convolution.
        kernel_size: square kernel size; padding keeps the spatial size at stride 1.
        stride: convolution stride.
        groups: convolution groups (``in_channels`` makes it depthwise).
        batch_norm: whether a BatchNorm2d follows the convolution.
        bias: whether the convolution has a bias term.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        batch_norm: bool = True,
        bias: bool = True,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=bias,
        )
        if batch_norm:
            layers["bn"] = nn.BatchNorm2d(out_channels)
        # Not in place: activation hooks must see the values before later layers overwrite them.
        layers["relu"] = nn.ReLU(inplace=False)
        super().__init__(layers)
        self.out_channels = out_channels


def init_conv_weights(model: nn.Module) -> None:
    """He-normal conv kernels (fan-out mode) with zero biases, as the reference models use."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)

"""Model zoo: every architecture of the study, built by name with a width multiplier.

Every model takes N x 3 x H x W inputs (32x32, and 64x64 for Tiny-ImageNet), uses ``nn.ReLU``
modules so activations can be hooked, and names its logit layer in ``output_layer_name``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from dnnmod.errors import ConfigError, UnknownNameError
from dnnmod.models.incecnn import incecnn
from dnnmod.models.lenet import lenet5
from dnnmod.models.mobilenet import mobilenet
from dnnmod.models.rescnn import rescnn
from dnnmod.models.resnet import resnet18, resnet20, resnet32, resnet56
from dnnmod.models.simcnn import simcnn
from dnnmod.models.simple import simple_rescnn, simple_simcnn
from dnnmod.models.vgg import vgg16

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "simcnn": simcnn,
    "rescnn": rescnn,
    "incecnn": incecnn,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "mobilenet": mobilenet,
    "lenet5": lenet5,
    "simple_simcnn": simple_simcnn,
    "simple_rescnn": simple_rescnn,
}


def architecture_options(arch: str) -> tuple[str, ...]:
    """Names of the options ``arch`` accepts besides ``num_classes`` and ``width``."""
    if arch not in ARCHITECTURES:
        raise UnknownNameError("model", arch, ARCHITECTURES)
    parameters = inspect.signature(ARCHITECTURES[arch]).parameters
    return tuple(name for name in parameters if name not in ("num_classes", "width"))


def build_model(arch: str, num_classes: int, width: float = 1.0, **options) -> nn.Module:
    """A freshly initialised ``arch`` model.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        num_classes: number of output logits.
        width: multiplier for conv channel counts and hidden FC sizes (0.125 runs on a CPU).
        options: architecture-specific settings, e.g. ``batch_norm=False`` for resnet20.
    """
    known_options = architecture_options(arch)
    for name in options:
        if name not in known_options:
            raise ConfigError(
                f"model {arch!r} has no option {name!r}; "
                f"options: {', '.join(known_options) or 'none'}"
            )
    if num_classes < 1:
        raise ConfigError(f"model {arch!r}: num_classes must be >= 1, got {num_classes}")
    if width <= 0:
        raise ConfigError(f"model {arch!r}: width must be > 0, got {width}")
    return ARCHITECTURES[arch](num_classes=num_classes, width=width, **options)


__all__ = ["ARCHITECTURES", "architecture_options", "build_model"]

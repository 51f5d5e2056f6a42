"""Model zoo: every architecture of the study, built by name with a width multiplier.

Every model takes N x 3 x H x W inputs (32x32, and 64x64 for Tiny-ImageNet), uses ``nn.ReLU``
modules so activations can be hooked, and names its logit layer in ``output_layer_name``.
Another package adds an architecture through the ``dnnmod.models`` entry-point group
(docs/plugins.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from dnnmod.errors import ConfigError, UnknownNameError
from dnnmod.hyperparameters import Range, check_type
from dnnmod.plugins import GROUPS, Registry, callable_object

#: architecture name → builder ``(num_classes, width, **options) -> nn.Module``, from the
#: ``dnnmod.models`` entry points (dnnmod's own in its pyproject.toml, and any plug-in's)
ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry(GROUPS["models"], "model",
                                                             callable_object)


#: bounds of the options some architectures take
OPTION_RANGES = {"dropout": Range(0, 1), "hidden_features": Range(1)}


def architecture_options(arch: str) -> dict[str, Any]:
    """The options ``arch`` accepts besides ``num_classes`` and ``width``, with their defaults
    (whose types the options' values must have)."""
    if arch not in ARCHITECTURES:
        raise UnknownNameError("model", arch, ARCHITECTURES)
    parameters = inspect.signature(ARCHITECTURES[arch]).parameters
    return {name: parameter.default for name, parameter in parameters.items()
            if name not in ("num_classes", "width")}


def check_options(arch: str, options: Mapping[str, Any], where: str | None = None) -> None:
    """ConfigError naming the first of ``options`` that ``arch`` does not take, or whose value
    is not of its default's type or out of its range; ``where``: the config key, for errors."""
    known = architecture_options(arch)
    for name, value in options.items():
        if name not in known:
            raise ConfigError(f"{where or f'model {arch!r}'}: {arch} has no option {name!r}; "
                              f"options: {', '.join(known) or 'none'}")
        key = f"{where}.{name}" if where else f"model {arch!r} option {name}"
        check_type(key, value, known[name])
        if name in OPTION_RANGES:
            OPTION_RANGES[name].check(key, value)


def build_model(arch: str, num_classes: int, width: float = 1.0, **options) -> nn.Module:
    """A freshly initialised ``arch`` model.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        num_classes: number of output logits.
        width: multiplier for conv channel counts and hidden FC sizes (0.125 runs on a CPU).
        options: architecture-specific settings, e.g. ``batch_norm=False`` for resnet20.
    """
    check_options(arch, options)
    if num_classes < 1:
        raise ConfigError(f"model {arch!r}: num_classes must be >= 1, got {num_classes}")
    if width <= 0:
        raise ConfigError(f"model {arch!r}: width must be > 0, got {width}")
    return ARCHITECTURES[arch](num_classes=num_classes, width=width, **options)


__all__ = ["ARCHITECTURES", "architecture_options", "build_model", "check_options"]

"""Modularization approaches behind one interface.

Each approach is one module in this package exposing ``NAME``, ``DEFAULTS`` (its reference
hyperparameters) and ``modularize(model, base_meta, data, config, *, seed, device,
checkpoint=None, progress=None) -> ModuleSet``. Registering it here is the only other step.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from dnnmod.errors import ConfigError, UnknownNameError

from . import gradsplitter

APPROACHES: dict[str, ModuleType] = {module.NAME: module for module in (gradsplitter,)}


def get_approach(name: str) -> ModuleType:
    if name not in APPROACHES:
        raise UnknownNameError("approach", name, APPROACHES)
    return APPROACHES[name]


def resolve_config(name: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """The approach's reference hyperparameters overridden by ``config``; unknown keys fail."""
    defaults = get_approach(name).DEFAULTS
    unknown = set(config or {}) - set(defaults)
    if unknown:
        raise ConfigError(f"approaches.{name}: unknown keys {sorted(unknown)}; known: "
                          f"{sorted(defaults)}")
    return {**defaults, **(config or {})}

"""Hyperparameters of approaches and training objectives: reference defaults, overridden.

Approaches (``approaches.<name>`` in a study config) and training objectives
(``objectives.<kind>``) declare their reference hyperparameters as a dict of defaults; the
defaults' types are the schema. An override with an unknown key, or with a value of another
type than its default, is a :class:`~dnnmod.errors.ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dnnmod.errors import ConfigError


def resolve(where: str, defaults: Mapping[str, Any],
            overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` overridden by ``overrides``; ``where`` is the config key, for errors."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(defaults)}")
    for key, value in overrides.items():
        _check_type(f"{where}.{key}", value, defaults[key])
    return {**defaults, **overrides}


def _check_type(key: str, value: Any, default: Any) -> None:
    """A value of its default's type (ints stand for floats; None defaults take anything)."""
    if default is None:
        return
    expected = (int, float) if type(default) is float else (type(default),)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")

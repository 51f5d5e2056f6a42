"""Hyperparameters of approaches and training objectives: reference defaults, overridden.

Approaches (``approaches.<name>`` in a study config) and training objectives
(``objectives.<kind>``) declare their reference hyperparameters as a dict of defaults; the
defaults' types are the schema (a default of None, "not set", declares its type apart, in
``types``), and optional :class:`Range` / :class:`OneOf` constraints bound the values. An
override with an unknown key, a value of another type than its default's (or declared) type,
or a value out of its range is a :class:`~dnnmod.errors.ConfigError` naming the key and the
value. The study config is checked this way before any job runs, the command line and the
library when they are called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dnnmod.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (either may be None: unbounded); ``low_open``: > low."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return
        below = self.low is not None and (value <= self.low if self.low_open
                                           else value < self.low)
        if below or self.high is not None and value > self.high:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            bracket = "(" if self.low_open else "["
            raise ConfigError(f"{key}: {value!r} is out of range {bracket}{low}, {high}]")


@dataclass(frozen=True)
class OneOf:
    """One of ``choices`` (None passes when the default is None)."""

    choices: tuple[Any, ...]

    def check(self, key: str, value: Any) -> None:
        if value is not None and value not in self.choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(self.choices)}")


def resolve(where: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None,
            constraints: Mapping[str, Range | OneOf] | None = None,
            types: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """``defaults`` overridden by ``overrides``; ``where`` is the config key, for errors.

    ``types``: the type of a key whose default is None (None stays allowed: "not set")."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {sorted(defaults)}; got "
                          f"{overrides!r}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(defaults)}")
    for key, value in overrides.items():
        if defaults[key] is None and types and key in types:
            check_declared_type(f"{where}.{key}", value, types[key])
        else:
            check_type(f"{where}.{key}", value, defaults[key])
        if constraints and key in constraints:
            constraints[key].check(f"{where}.{key}", value)
    return {**defaults, **overrides}


def check_type(key: str, value: Any, default: Any) -> None:
    """A value of its default's type (ints stand for floats; None defaults take anything)."""
    if default is None:
        return
    expected = (int, float) if type(default) is float else (type(default),)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")


def check_declared_type(key: str, value: Any, expected: type | tuple[type, ...]) -> None:
    """None or a value of ``expected`` (ints stand for floats, bools for nothing else)."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    if value is None:
        return
    accepted = expected + ((int,) if float in expected else ())
    if isinstance(value, bool) and bool not in expected or not isinstance(value, accepted):
        names = " or ".join(kind.__name__ for kind in expected)
        raise ConfigError(f"{key}: expected {names} or null, got {value!r}")

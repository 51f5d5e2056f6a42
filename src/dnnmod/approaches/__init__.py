"""Modularization approaches behind one interface (:class:`~dnnmod.approaches.base.Approach`).

An approach is an ``Approach`` subclass named by a ``dnnmod.approaches`` entry point: dnnmod's
own in its pyproject.toml, another package's in that package's (docs/plugins.md). Every one
also gets its random control ``random_<name>`` (:mod:`dnnmod.approaches.random_kernels`).
:func:`run_approach` is how the command line and the library run one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from dnnmod.approaches.base import Approach
from dnnmod.approaches.random_kernels import RandomControl
from dnnmod.controls import control_name, control_of
from dnnmod.errors import ConfigError
from dnnmod.modules.moduleset import REQUIRED_PROVENANCE, ModuleSet, check_provenance
from dnnmod.plugins import GROUPS, Registry, named_subclass


def _instance(name: str, loaded: Any) -> Approach:
    cls = named_subclass(Approach)(name, loaded)
    try:
        return cls()
    except TypeError as err:  # abstract methods left, or an __init__ that takes arguments
        raise ValueError(f"{cls.__qualname__}() failed: {err}") from err


class ApproachRegistry(Registry[Approach]):
    """The approaches of the entry points (and any set in-process), each with its random
    control, which is built on first look-up rather than registered."""

    def _names(self) -> list[str]:
        names = super()._names()
        return names + [control_name(name) for name in names
                        if control_of(name) is None and control_name(name) not in names]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __getitem__(self, name: str) -> Approach:
        of = control_of(name)
        if of is not None and name not in self._loaded and name not in self._set \
                and name not in self.entry_points() and name in self:
            self._loaded[name] = RandomControl(self[of])
        return super().__getitem__(name)

    def source(self, name: str) -> str:
        of = control_of(name)
        if of is not None and name not in self._set and name not in self.entry_points():
            return self.source(of)
        return super().source(name)


APPROACHES: ApproachRegistry = ApproachRegistry(GROUPS["approaches"], "approach", _instance)


def get_approach(name: str) -> Approach:
    return APPROACHES[name]  # UnknownNameError listing the known ones


def resolve_hyperparameters(name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The approach's reference hyperparameters overridden by ``overrides``; unknown keys and
    values of the wrong type fail."""
    return get_approach(name).resolve(overrides)


def run_approach(name: str | Approach, model: nn.Module, base_meta: dict[str, Any], data,
                 overrides: Mapping[str, Any] | None = None, *, seed: int, device: str = "cpu",
                 checkpoint: Path | None = None, progress: bool | None = None,
                 references: Mapping[str, ModuleSet] | None = None) -> ModuleSet:
    """Run approach ``name`` (registered, or an unregistered instance, as ``dnnmod
    check-approach`` runs one) on a trained model and check what it returns."""
    approach = name if isinstance(name, Approach) else get_approach(name)
    name = approach.name
    hyperparameters = approach.resolve(overrides)
    references = dict(references or {})
    missing = sorted(set(approach.references(hyperparameters)) - set(references))
    if missing:
        raise ConfigError(f"{name} reads the module sets of {missing} cut from the same base "
                          "model; none was given")
    modules = approach.modularize(model, base_meta, data, hyperparameters, seed=seed,
                                  device=device, checkpoint=checkpoint, progress=progress,
                                  references=references)
    check_provenance(modules.provenance, f"{name} on {base_meta.get('arch')}")
    return modules


__all__ = ["APPROACHES", "REQUIRED_PROVENANCE", "Approach", "check_provenance",
           "get_approach", "resolve_hyperparameters", "run_approach"]

"""The contract every modularization approach fulfils.

An approach takes a trained base model (of the training kind it declares: ``st`` for the
splitters, its own modular training for MwT and MODA) and returns a
:class:`~dnnmod.modules.moduleset.ModuleSet`. Everything after that (extraction, metrics,
composition, reuse experiments, tables) is shared, so a new approach is one subclass of
:class:`Approach` in one file, registered in :mod:`dnnmod.approaches`.

What the contract promises, and tests/test_approaches.py checks for every registered approach:
- ``resolve({})`` gives the reference hyperparameters; an unknown key or a value of the wrong
  type is a :class:`~dnnmod.errors.ConfigError` naming it;
- a run interrupted after a checkpoint and started again gives the same module set;
- the module set's provenance holds :data:`~dnnmod.modules.moduleset.REQUIRED_PROVENANCE`;
- the module set survives save → load unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from dnnmod.hyperparameters import OneOf, Range, resolve
from dnnmod.modules.moduleset import ModuleSet


class Approach(ABC):
    """A modularization approach.

    Class attributes:
        name: identifier in configs, paths and tables (e.g. ``gradsplitter``).
        training: training kind of the base models it decomposes (``st`` = standard).
        defaults: reference hyperparameters (from the paper); configs override them.
        constraints: ranges or choices of hyperparameters (:mod:`dnnmod.hyperparameters`).
        types: the type of each hyperparameter whose default is None ("not set"); every such
            hyperparameter declares one (checked when the subclass is defined).
        composes_by_union: whether the approach's own composition of modules is one union
            network (the OR of their masks: MwT, MODA) rather than the modules side by side;
            E2 then also reports that network for the whole set.
    """

    name: ClassVar[str]
    training: ClassVar[str] = "st"
    composes_by_union: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]]
    constraints: ClassVar[Mapping[str, Range | OneOf]] = {}
    types: ClassVar[Mapping[str, type | tuple[type, ...]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        untyped = [key for key, value in getattr(cls, "defaults", {}).items()
                   if value is None and key not in cls.types]
        if untyped:  # a programming error: without a type, any value would pass
            raise TypeError(f"approach {cls.__name__}: hyperparameters {untyped} default to "
                            "None and declare no type in `types`")

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The reference hyperparameters overridden by ``overrides``, type-checked."""
        return resolve(f"approaches.{self.name}", self.defaults, overrides, self.constraints,
                       self.types)

    def references(self, hyperparameters: Mapping[str, Any]) -> list[str]:
        """Approaches whose module sets (cut from the same base model) this run reads."""
        return []

    def training_for(self, hyperparameters: Mapping[str, Any]) -> str:
        """Training kind of the base model a run with ``hyperparameters`` decomposes."""
        return self.training

    @abstractmethod
    def modularize(self, model: nn.Module, base_meta: dict[str, Any], data,
                   hyperparameters: dict[str, Any], *, seed: int, device: str = "cpu",
                   checkpoint: Path | None = None, progress: bool | None = None,
                   references: Mapping[str, ModuleSet] | None = None) -> ModuleSet:
        """Decompose ``model`` (metadata ``base_meta``) trained on ``data`` (DatasetSplits).

        ``checkpoint``: where to keep resumable state; ``references``: the module sets named
        by :meth:`references`, by approach name. The provenance of the result holds at least
        :data:`~dnnmod.modules.moduleset.REQUIRED_PROVENANCE`.
        """


"""The contract every modularization approach fulfils.

An approach takes a trained base model (of the training kind it declares: ``st`` for the
splitters, its own modular training for MwT and MODA) and returns a
:class:`~dnnmod.modules.moduleset.ModuleSet`. Everything after that (extraction, metrics,
composition, reuse experiments, tables) is shared, so a new approach is one subclass of
:class:`Approach` in one file, registered in :mod:`dnnmod.approaches`. The subclass writes only
its own algorithm, :meth:`Approach.decompose`; :meth:`Approach.modularize` does what every
approach does around it.

What the contract promises, and :mod:`dnnmod.approaches.contract` checks for every registered
approach (tests/test_approach_contract.py) and for a third party's (``dnnmod check-approach``):
- ``resolve({})`` gives the reference hyperparameters; an unknown key or a value of the wrong
  type is a :class:`~dnnmod.errors.ConfigError` naming it;
- a run interrupted after a checkpoint and started again gives the same module set;
- the module set's provenance holds :data:`~dnnmod.modules.moduleset.REQUIRED_PROVENANCE`;
- the module set survives save → load unchanged.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dnnmod.hyperparameters import OneOf, Range, resolve
from dnnmod.modules.metrics import SHARED_KRR, kernel_retention
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.modules.structure import ModelStructure, trace_structure


@dataclass(frozen=True)
class RunContext:
    """What an approach's algorithm (:meth:`Approach.decompose`) starts from: the arguments of
    :meth:`Approach.modularize`, the model moved to ``device`` in eval mode, its traced
    ``structure`` and the ``classes`` to cut a module for (every class of ``data``)."""

    model: nn.Module
    base_meta: dict[str, Any]
    data: Any  # DatasetSplits
    hyperparameters: dict[str, Any]
    structure: ModelStructure
    classes: list[int]
    seed: int
    device: str
    checkpoint: Path | None
    progress: bool | None
    references: Mapping[str, ModuleSet]


@dataclass(frozen=True)
class Decomposition:
    """What an approach's algorithm finds: a mask per channel group (a row per module), the
    head that scores the modules, how their scores combine, and the approach's own provenance
    entries; an entry named like a shared one replaces it (the ``wall_seconds`` of a resumed
    run, the ``hyperparameters`` as the run derived them). ``structure``: the structure the
    module set records where it is not the traced one (a random control keeps its reference
    set's)."""

    masks: dict[str, torch.Tensor]
    head: nn.Module
    combination: str = "argmax"
    provenance: dict[str, Any] = field(default_factory=dict)
    structure: ModelStructure | None = None


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
        accuracy_protocol: how its paper states the accuracy loss, E2's headline (a key of
            :data:`~dnnmod.modules.metrics.ACCURACY_PROTOCOLS`): ``composed`` (the modules
            composed, against the base model) or ``modular_model`` (the ST model against the
            modular-trained model itself: MwT, MODA).
        krr_definition: its paper's KRR, in words; :meth:`paper_kernel_retention` computes it
            (default: the shared definition, :func:`~dnnmod.modules.metrics.kernel_retention`).
        fine_tunes_union: whether its authors fine-tune a sub-task's union network (E5:
            MwT) with a ReLU + Linear head on its logits; :meth:`reuse_network` gives the
            network they reuse.
        contract_hyperparameters: overrides small enough for the contract's tiny run
            (:mod:`dnnmod.approaches.contract`), which still exercise the algorithm.
    """

    name: ClassVar[str]
    training: ClassVar[str] = "st"
    composes_by_union: ClassVar[bool] = False
    accuracy_protocol: ClassVar[str] = "composed"
    krr_definition: ClassVar[str] = SHARED_KRR
    fine_tunes_union: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]]
    constraints: ClassVar[Mapping[str, Range | OneOf]] = {}
    types: ClassVar[Mapping[str, type | tuple[type, ...]]] = {}
    contract_hyperparameters: ClassVar[Mapping[str, Any]] = {}

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

    def paper_kernel_retention(self, model: nn.Module, modules: ModuleSet) -> list[float]:
        """KRR of each module of ``modules`` (cut from ``model``) by :attr:`krr_definition`."""
        return kernel_retention(modules)

    def reuse_network(self, network: nn.Module) -> nn.Module:
        """A union network (extracted from the approach's base model) as its authors reuse
        it for a sub-task; by default as extracted."""
        return network

    def modularize(self, model: nn.Module, base_meta: dict[str, Any], data,
                   hyperparameters: dict[str, Any], *, seed: int, device: str = "cpu",
                   checkpoint: Path | None = None, progress: bool | None = None,
                   references: Mapping[str, ModuleSet] | None = None) -> ModuleSet:
        """Decompose ``model`` (metadata ``base_meta``) trained on ``data`` (DatasetSplits).

        ``checkpoint``: where to keep resumable state; ``references``: the module sets named
        by :meth:`references`, by approach name. The provenance of the result holds at least
        :data:`~dnnmod.modules.moduleset.REQUIRED_PROVENANCE`.

        What every approach does around its algorithm, once: the model on ``device`` in eval
        mode, its structure traced, one module per class, the wall clock, and the module set
        built from what :meth:`decompose` finds.
        """
        started = time.monotonic()
        model = model.to(device).eval()
        context = RunContext(model=model, base_meta=base_meta, data=data,
                             hyperparameters=hyperparameters,
                             structure=trace_structure(model,
                                                       (1, *data.train.images.shape[1:])),
                             classes=list(range(data.num_classes)), seed=seed,
                             device=device, checkpoint=checkpoint, progress=progress,
                             references=references or {})
        found = self.decompose(context)
        provenance = {"approach": self.name, "hyperparameters": hyperparameters, "seed": seed,
                      "wall_seconds": time.monotonic() - started, **found.provenance}
        return ModuleSet(approach=self.name, classes=context.classes, masks=found.masks,
                         head=found.head, combination=found.combination,
                         base=base_identity(base_meta),
                         structure=found.structure or context.structure, provenance=provenance)

    @abstractmethod
    def decompose(self, context: RunContext) -> Decomposition:
        """The approach's own algorithm: the modules of ``context.model``, one per class of
        ``context.classes``."""

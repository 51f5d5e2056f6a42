"""Modularization approaches behind one interface (:class:`~dnnmod.approaches.base.Approach`).

A new approach is one file here defining an ``Approach`` subclass, plus its line in
:data:`APPROACHES`, which also registers its random control ``random_<name>``
(:mod:`dnnmod.approaches.random_kernels`); :func:`run_approach` is how the command line and the
library run one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from dnnmod.approaches.base import Approach
from dnnmod.approaches.cnnsplitter import CNNSplitter
from dnnmod.approaches.gradsplitter import GradSplitter
from dnnmod.approaches.moda import MODA
from dnnmod.approaches.mwt import MwT
from dnnmod.approaches.pan_rajan import PanRajan
from dnnmod.approaches.random_kernels import RandomControl
from dnnmod.errors import ConfigError, UnknownNameError
from dnnmod.modules.moduleset import REQUIRED_PROVENANCE, ModuleSet, check_provenance

_DECOMPOSING = (CNNSplitter(), GradSplitter(), MwT(), MODA(), PanRajan())
APPROACHES: dict[str, Approach] = {
    approach.name: approach
    for approach in (*_DECOMPOSING, *(RandomControl(of) for of in _DECOMPOSING))
}


def get_approach(name: str) -> Approach:
    if name not in APPROACHES:
        raise UnknownNameError("approach", name, APPROACHES)
    return APPROACHES[name]


def resolve_hyperparameters(name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The approach's reference hyperparameters overridden by ``overrides``; unknown keys and
    values of the wrong type fail."""
    return get_approach(name).resolve(overrides)


def run_approach(name: str, model: nn.Module, base_meta: dict[str, Any], data,
                 overrides: Mapping[str, Any] | None = None, *, seed: int, device: str = "cpu",
                 checkpoint: Path | None = None, progress: bool | None = None,
                 references: Mapping[str, ModuleSet] | None = None) -> ModuleSet:
    """Run approach ``name`` on a trained model and check what it returns."""
    approach = get_approach(name)
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

"""Training kinds: what a training run optimises, beyond the shared loop in :mod:`.train`.

Standard training (``st``) minimises cross-entropy. Modular training (MwT, MODA) trains the
same way with extra loss terms over what the forward pass produces (activations, masks), and
may add trainable parts to the model (MwT's mask generators). Each kind is an
:class:`Objective` subclass registered with :func:`register_objective`; an approach file that
needs its own kind registers it when it is imported, and the rest (the ``train`` command, the
workflow's ``{training}`` wildcard, model files, E1) serves it unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from dnnmod.errors import UnknownNameError
from dnnmod.hyperparameters import resolve


class Objective(ABC):
    """A training kind with its hyperparameters.

    Class attributes:
        name: the kind in configs (``objectives.<name>``), paths
            (``models/<dataset>/<model>/<name>/``), model files and tables.
        defaults: reference hyperparameters; ``Objective(overrides)`` overrides them.
    """

    name: ClassVar[str]
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self.hyperparameters: dict[str, Any] = resolve(f"objectives.{self.name}",
                                                       self.defaults, overrides)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The network this kind trains: ``model`` plus its trainable additions, if any.

        Training applies it right after seeding, and loading a saved model applies it before
        copying the weights in, so it must add the same parameter names and shapes every time
        and draw any initial values from the global torch generator only.
        """
        return model

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        """Hooks recording what :meth:`loss` needs during the forward passes of training.

        Yields the dict the hooks fill; training empties it before every forward pass and hands
        it to :meth:`loss` after. The hooks are removed on exit (validation runs without them).
        """
        yield {}

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             captured: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise for one batch, and its named parts (logged and recorded in
        the epoch history as means over the epoch's samples): floats, or detached 0-dim
        tensors, which the loop sums where they are and reads once an epoch."""


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(objective: type[Objective]) -> type[Objective]:
    """Register a training kind (usable as a class decorator)."""
    registered = OBJECTIVES.setdefault(objective.name, objective)
    if registered is not objective:
        raise ValueError(f"training kind {objective.name!r} is already registered by "
                         f"{registered.__module__}.{registered.__qualname__}")
    return objective


def training_kinds() -> list[str]:
    """Every registered training kind, those of the approach files included."""
    _register_approach_kinds()
    return sorted(OBJECTIVES)


def get_objective(kind: str, overrides: Mapping[str, Any] | None = None) -> Objective:
    """Training kind ``kind`` with ``overrides`` of its hyperparameters."""
    _register_approach_kinds()
    if kind not in OBJECTIVES:
        raise UnknownNameError("training kind", kind, OBJECTIVES)
    return OBJECTIVES[kind](overrides)


def _register_approach_kinds() -> None:
    # Approach files register their training kinds when imported; imported here rather than at
    # the top because they may import this module.
    import dnnmod.approaches  # noqa: F401


@register_objective
class StandardTraining(Objective):
    """Plain cross-entropy: the base models every splitting approach decomposes."""

    name = "st"

    def loss(self, logits, labels, captured):
        cross_entropy = nn.functional.cross_entropy(logits, labels)
        return cross_entropy, {"cross_entropy": cross_entropy.detach()}


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel mean of a (batch, C, H, W) tensor: (batch, C).

    Summed, then divided on the small result: the backward pass of ``x.mean((2, 3))`` divides the
    expanded gradient, writing a full-size tensor per call, where a sum's backward is a
    stride-0 view. MwT calls it on every gated conv's input and MODA on every ReLU's output,
    in every training step.
    """
    return x.sum((2, 3)) / (x.shape[2] * x.shape[3])


def pair_similarities(vectors: list[torch.Tensor], labels: torch.Tensor
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mean cosine similarity of the vectors of same-class and of different-class sample pairs
    (i < j) of a batch, averaged over layers; None where the batch has no such pair. MwT's
    cohesion/coupling (of masks) and MODA's affinity/dispersion (of activations) both are this.

    ``vectors``: one (batch, K) tensor per layer.

    Every layer has the same pairs, so the mean over layers of a pair's similarities is the dot
    product of the pair's unit vectors concatenated over layers, divided by the layer count: one
    (batch, batch) product for all pairs and layers. Gathering both vectors of every pair instead
    moves batch²/2 · K values per layer forward and scatters them back
    (benchmarks/modular_training.py times both).
    """
    upper = torch.ones(len(labels), len(labels), dtype=torch.bool, device=labels.device).triu(1)
    same_class = labels[:, None] == labels[None, :]
    same, different = upper & same_class, upper & ~same_class
    units = torch.cat([nn.functional.normalize(layer.float(), dim=1) for layer in vectors], dim=1)
    similarity = (units @ units.T) / len(vectors)
    return (similarity[same].mean() if same.any() else None,
            similarity[different].mean() if different.any() else None)

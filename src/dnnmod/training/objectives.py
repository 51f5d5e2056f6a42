"""Training kinds: what a training run optimises, beyond the shared loop in :mod:`.train`.

Standard training (``st``) minimises cross-entropy. Modular training (MwT, MODA) trains the
same way with extra loss terms over what the forward pass produces (activations, masks), and
may add trainable parts to the model (MwT's mask generators). Each kind is an
:class:`Objective` subclass named by a ``dnnmod.objectives`` entry point (dnnmod's own in its
pyproject.toml: ``st`` here, ``mwt`` and ``moda`` beside their approaches; a plug-in package's
in its own: docs/plugins.md), and the rest (the ``train`` command, the workflow's
``{training}`` wildcard, model files, E1) serves it unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dnnmod.hyperparameters import resolve
from dnnmod.plugins import GROUPS, Registry, named_subclass


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


OBJECTIVES: Registry[type[Objective]] = Registry(GROUPS["objectives"], "training kind",
                                                  named_subclass(Objective))


def register_objective(objective: type[Objective]) -> type[Objective]:
    """Register a training kind in this process (usable as a class decorator); a package
    registers its kinds through the ``dnnmod.objectives`` entry points instead."""
    return OBJECTIVES.register(objective.name, objective)


def training_kinds() -> list[str]:
    """Every registered training kind (from the installed metadata: nothing is imported)."""
    return sorted(OBJECTIVES)


def get_objective(kind: str, overrides: Mapping[str, Any] | None = None) -> Objective:
    """Training kind ``kind`` with ``overrides`` of its hyperparameters."""
    return OBJECTIVES[kind](overrides)


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
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine similarity of the vectors of same-class and of different-class sample pairs
    (i < j) of a batch, averaged over layers. MwT's cohesion/coupling (of masks) and MODA's
    affinity/dispersion (of activations) both are this.

    ``vectors``: one (batch, K) tensor per layer. Returns ``(means, present)``, both of shape
    (2,): ``means`` the same-class and the different-class mean, 0 where the batch has no such
    pair; ``present`` (bool) whether it has one. The caller weights a term by ``present``
    rather than testing it, so nothing here reads a value back to the host.
    """
    flat = torch.cat([layer.float() for layer in vectors], dim=1)
    layout = layer_layout([layer.shape[1] for layer in vectors], flat.device)
    return stacked_pair_similarities(flat, layout, labels)


def stacked_pair_similarities(flat: torch.Tensor, layout: LayerLayout, labels: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pair_similarities` of the layers' vectors laid side by side in ``flat``
    (batch, columns), as ``layout`` says.

    Every layer has the same pairs, so the mean over layers of a pair's similarities is the dot
    product of the pair's unit vectors concatenated over layers, divided by the layer count: one
    (batch, batch) product for all pairs and layers. Gathering both vectors of every pair instead
    moves batch²/2 · K values per layer forward and scatters them back
    (benchmarks/modular_training.py times both). The pairs weight that product rather than
    select from it (boolean indexing has a data-dependent size, which a device answers only
    after a sync): the means are sums over the whole (batch, batch) matrix, so the same terms
    add in another order than in a mean over the selected pairs.
    """
    units = layout.units(flat)
    similarity = (units @ units.T) / layout.layers
    same_class = labels[:, None] == labels[None, :]
    # (2, batch, batch): the same-class pairs i < j, then the different-class ones.
    different, upper = _pair_constants(len(labels), labels.device)
    pairs = (same_class != different) & upper
    counts = pairs.sum((1, 2))
    means = (pairs * similarity).sum((1, 2)) / counts.clamp(min=1)
    return means, counts > 0


@dataclass(frozen=True)
class LayerLayout:
    """Per-layer vectors laid side by side in one (batch, columns) tensor, and the constants that
    reduce it per layer in one op for all layers rather than a loop of small ops per layer.

    ``indicator``: (columns, layers) float, 1 where a column belongs to a layer;
    ``layer_of_column``: (columns,) the same as an index; ``area``: (columns,) float, the
    spatial size its layer's vectors were summed over (1 for vectors of no spatial extent);
    ``column_share``: (columns,) float, 1 / (layers · its layer's size), so that the dot product
    of a row of per-column means with it is the mean over layers of each layer's mean.
    """

    layers: int
    indicator: torch.Tensor
    layer_of_column: torch.Tensor
    area: torch.Tensor
    column_share: torch.Tensor

    def units(self, flat: torch.Tensor) -> torch.Tensor:
        """Each layer's part of every row of ``flat`` scaled to unit L2 norm, as
        ``nn.functional.normalize(part, dim=1)`` does (a norm below 1e-12 counts as 1e-12).

        The squares' per-layer sums are one product with ``indicator``, in float32 whatever
        autocast says, and each norm is gathered back to its layer's columns. They add in
        another order than ``torch.linalg.vector_norm``'s, so a norm may differ from it in the
        last bit. The floor applies to the squared norm, 1e-24, before the square root: an
        all-zero part (a sample's dead layer) then gets a zero gradient, where the square
        root's derivative at 0 times the floor's zero derivative would be 0 · ∞ = NaN.
        """
        with torch.autocast(flat.device.type, enabled=False):
            norms = (flat.float().square() @ self.indicator).clamp_min(1e-24).sqrt()
        return flat / norms.index_select(1, self.layer_of_column)


# Built once per layer sizes (batch size) and device rather than in every step.
_LAYOUTS: dict[tuple[tuple[int, ...], tuple[int, ...], torch.device], LayerLayout] = {}
_PAIRS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def layer_layout(sizes: Sequence[int], device: torch.device,
                 areas: Sequence[int] | None = None) -> LayerLayout:
    """The :class:`LayerLayout` of layers of ``sizes`` columns each, with spatial ``areas``
    (default 1 each), on ``device``."""
    areas = tuple(areas) if areas is not None else (1,) * len(sizes)
    key = (tuple(sizes), areas, torch.device(device))
    if key not in _LAYOUTS:
        layer_of_column = torch.cat([torch.full((size,), layer, dtype=torch.long)
                                     for layer, size in enumerate(sizes)])
        per_layer = torch.tensor([[area, 1 / (len(sizes) * size)]
                                  for size, area in zip(sizes, areas, strict=True)])
        area, column_share = per_layer[layer_of_column].T
        _LAYOUTS[key] = LayerLayout(
            len(sizes), nn.functional.one_hot(layer_of_column, len(sizes)).float().to(device),
            layer_of_column.to(device), area.contiguous().to(device),
            column_share.contiguous().to(device))
    return _LAYOUTS[key]


def _pair_constants(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (2, 1, 1) [False, True], which compared with "same class" gives "same class" and
    "different class"; bool (batch, batch), True above the diagonal: the pairs i < j."""
    key = (batch, torch.device(device))
    if key not in _PAIRS:
        _PAIRS[key] = (torch.tensor([False, True], device=device)[:, None, None],
                       torch.ones(batch, batch, dtype=torch.bool, device=device).triu(1))
    return _PAIRS[key]

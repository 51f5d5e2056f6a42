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
from dataclasses import dataclass, field
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
    stride-0 view. MwT calls it on every gated conv's input in every training step.
    """
    return x.sum((2, 3)) / (x.shape[2] * x.shape[3])


def reduction_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the pair terms of ``tensor``'s values are reduced in: float32, also for the
    float16 of CUDA's autocast; float64 stays (the parity check)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def side_by_side(vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, LayerLayout]:
    """Per-layer (batch, K) vectors (MwT's masks) laid side by side in one (batch, ΣK) tensor
    of their :func:`reduction_dtype`, and its :class:`LayerLayout`: :func:`pair_objective`'s
    input."""
    flat = torch.cat([layer.to(reduction_dtype(layer)) for layer in vectors], dim=1)
    return flat, layer_layout([layer.shape[1] for layer in vectors], flat.device)


@dataclass(frozen=True)
class PairTerms:
    """One batch's pair terms, detached (logged, never differentiated).

    ``means``: (2,) the mean cosine similarity of the vectors of same-class and of
    different-class sample pairs i < j, averaged over layers (MwT's cohesion and coupling of
    masks, MODA's affinity and dispersion of activations), 0 where the batch has no such pair;
    ``present``: (2,) 1.0 where the batch has such a pair, else 0.0; ``compactness``: the mean
    over layers of each layer's mean value (MODA), or None.
    """

    means: torch.Tensor
    present: torch.Tensor
    compactness: torch.Tensor | None


def pair_objective(base_loss: torch.Tensor, flat: torch.Tensor, layout: LayerLayout,
                   labels: torch.Tensor, same_weight: float, different_weight: float,
                   compact_weight: float | None = None) -> tuple[torch.Tensor, PairTerms]:
    """``base_loss + same_weight·(1 − means[0]) + different_weight·means[1]``, plus
    ``compact_weight·compactness`` when given (MwT's cohesion and coupling terms, MODA's
    affinity, dispersion and compactness terms), and the terms (:class:`PairTerms`) of the
    layers' vectors laid side by side in ``flat`` (batch, columns) as ``layout`` says. A pair
    term the batch cannot form (no such pair) adds 0, chosen on the device: nothing is read
    back to the host.

    A column of ``flat`` may hold its layer's vector times the layer's ``area`` (a spatial sum
    rather than mean): the similarities do not see a per-layer scale and the compactness
    divides it out. ``flat`` holds ReLU outputs where compactness is asked for (never negative,
    so the mean value is the mean absolute value, MODA's L1 term).

    One autograd node with its backward pass written out (:class:`_PairObjective`): autograd's
    own derivative of the same ops dispatches about three times as many small kernels, and a
    small model's step is bound by their launches.
    """
    # The layout's and the pairs' constants are float32; a float64 ``flat`` (the parity check)
    # takes float64 copies. The weights and compact shares are made in ``flat``'s dtype.
    scaled_indicator, floor, same_pairs, different_pairs = (
        constant.to(flat.dtype) for constant in (layout.scaled_indicator, layout.floor,
                                                 *_pair_weights(len(labels), flat.device)))
    loss, means, present, compactness = _PairObjective.apply(
        base_loss, flat, labels,
        _loss_weights(same_weight, different_weight, compact_weight, flat.device, flat.dtype),
        scaled_indicator, floor, layout.layer_of_column, same_pairs, different_pairs,
        *layout.batch_constants(len(labels), compact_weight, flat.dtype))
    return loss, PairTerms(means, present, compactness)


class _PairObjective(torch.autograd.Function):
    """Forward and backward of :func:`pair_objective`.

    Every layer has the same pairs, so the mean over layers of a pair's cosine similarities is
    the dot product of the pair's per-layer unit vectors, concatenated over layers and scaled by
    1/sqrt(layers): one (batch, batch) product for all pairs and layers. Each layer's part of a
    row is normalised as ``nn.functional.normalize`` does (a norm below 1e-12 of the vector
    divided by its area counts as 1e-12); the per-layer squared norms are one product with a 0/1
    (columns, layers) matrix. The pairs weight the whole product, both triangles (the
    similarities are symmetric), rather than select from it: boolean indexing has a
    data-dependent size, which a device answers only after a sync. The loss is one product of
    the terms (means, present, compactness) with constant weights: ``same_weight·present[0]``
    is the 1 of ``1 − means[0]`` where the batch has a same-class pair, and an absent mean is 0.
    The same terms add in another order than a mean over the selected pairs i < j does, and
    the norms in another order than ``torch.linalg.vector_norm``'s, so values may differ from
    those in the last bits.

    Backward, for units u = s·r (r = (layers·|s_layer|²)^-1/2 gathered per column) and the
    similarity-weighted loss: du = 2·(pair shares weighted by the means' weights) @ u;
    ds = r·(du − u·layers·Σ_layer du·u), the second term only where the norm was not floored
    (where it was, the floor does not depend on s); compactness adds its constant per-column
    weight. That is also its gradient at 0, where the derivative of |x| is 0: the parameters'
    gradients are the same, because the ReLU's backward zeroes the gradient wherever its output
    is 0 (a channel's sum is 0 only where all its values are).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, base_loss, flat, labels, weights, scaled_indicator, floor, layer_of_column,
                same_pairs, different_pairs, compact_share, compact_gradient):
        squared = (flat * flat) @ scaled_indicator  # (batch, layers): layers·|s_layer|²
        unfloored = squared >= floor
        scale = squared.clamp_min(floor).rsqrt().index_select(1, layer_of_column)
        units = flat * scale
        similarity = units @ units.T
        same_class = labels[:, None] == labels[None, :]
        # (2, batch, batch) float: 1 at the same-class, then at the different-class pairs i != j
        pairs = torch.where(same_class, same_pairs, different_pairs)
        counts = pairs.sum((1, 2))
        # Each pair's share of its mean (all 0 where there is no such pair: its mean reads 0).
        shares = pairs / counts.clamp(min=1).view(2, 1, 1)
        means = torch.mv(shares.view(2, -1), similarity.view(-1))
        present = counts.clamp(max=1)
        terms = [means, present]
        compactness = None
        if compact_share is not None:
            compactness = torch.dot(flat.view(-1), compact_share)
            terms.append(compactness.view(1))
        loss = torch.addmv(base_loss, torch.cat(terms).view(1, -1), weights).view(())
        ctx.mark_non_differentiable(*(term for term in (means, present, compactness)
                                      if term is not None))
        # Unused gradients stay None rather than zeros made for them (an op each).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(units, scale, unfloored, scaled_indicator, layer_of_column,
                              shares, weights, compact_gradient)
        return loss, means, present, compactness

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss, _grad_means, _grad_present, _grad_compactness):
        if grad_loss is None:
            return (None,) * 11
        (units, scale, unfloored, scaled_indicator, layer_of_column, shares, weights,
         compact_gradient) = ctx.saved_tensors
        batch = len(units)
        pair_grad = torch.mv(shares.view(2, -1).T, weights[:2] * grad_loss).view(batch, batch)
        # addmm with beta 0 ignores its first argument: one op for 2·(pair_grad @ units).
        grad_units = torch.addmm(units, pair_grad, units, beta=0, alpha=2)
        radial = ((grad_units * units) @ scaled_indicator) * unfloored
        tangent = torch.addcmul(grad_units, units, radial.index_select(1, layer_of_column),
                                value=-1)
        grad_flat = (scale * tangent if compact_gradient is None
                     else torch.addcmul((compact_gradient * grad_loss).view_as(units), scale,
                                        tangent))
        return grad_loss, grad_flat, *(None,) * 9


@dataclass(frozen=True)
class LayerLayout:
    """Per-layer vectors laid side by side in one (batch, columns) tensor, and the constants that
    reduce it per layer in one op for all layers rather than a loop of small ops per layer.

    ``scaled_indicator``: (columns, layers) float, ``layers`` where a column belongs to a layer,
    else 0; ``floor``: (layers,) the least squared norm of a layer's part times ``layers``,
    (1e-12 · area)² · layers, ``area`` the spatial size its vectors were summed over (1 for
    vectors of no spatial extent); ``layer_of_column``: (columns,) each column's layer;
    ``compact_share``:
    (columns,) float64, 1 / (layers · its layer's size · area), so that the dot product of a
    row of per-column sums with it is the mean over layers of each layer's mean.
    """

    layers: int
    scaled_indicator: torch.Tensor
    floor: torch.Tensor
    layer_of_column: torch.Tensor
    compact_share: torch.Tensor
    _per_batch: dict = field(default_factory=dict, repr=False, compare=False)

    def batch_constants(self, batch: int, compact_weight: float | None, dtype: torch.dtype
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For a batch of ``batch`` samples: the compact share over the batch, tiled per sample
        (flattened, so that the compactness is one dot product with the flattened sums), and
        the same times ``compact_weight`` (the compactness term's gradient per unit loss
        gradient), as ``dtype``, computed in float64; both None without ``compact_weight``."""
        if compact_weight is None:
            return None, None
        key = (batch, compact_weight, dtype)
        if key not in self._per_batch:
            tiled = (self.compact_share / batch).repeat(batch)
            self._per_batch[key] = (tiled.to(dtype), (tiled * compact_weight).to(dtype))
        return self._per_batch[key]


# Built once per layer sizes (batch size) and device rather than in every step.
_LAYOUTS: dict[tuple[tuple[int, ...], tuple[int, ...], torch.device], LayerLayout] = {}
_PAIRS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_WEIGHTS: dict[tuple[float, float, float | None, torch.device, torch.dtype], torch.Tensor] = {}


def layer_layout(sizes: Sequence[int], device: torch.device,
                 areas: Sequence[int] | None = None) -> LayerLayout:
    """The :class:`LayerLayout` of layers of ``sizes`` columns each, with spatial ``areas``
    (default 1 each), on ``device``."""
    areas = tuple(areas) if areas is not None else (1,) * len(sizes)
    key = (tuple(sizes), areas, torch.device(device))
    if key not in _LAYOUTS:
        layers = len(sizes)
        layer_of_column = torch.cat([torch.full((size,), layer, dtype=torch.long)
                                     for layer, size in enumerate(sizes)])
        area = torch.tensor(areas, dtype=torch.float64)
        share = 1 / (layers * torch.tensor(sizes, dtype=torch.float64) * area)
        _LAYOUTS[key] = LayerLayout(
            layers,
            (layers * nn.functional.one_hot(layer_of_column, layers)).float().to(device),
            (layers * (1e-12 * area) ** 2).float().to(device), layer_of_column.to(device),
            share[layer_of_column].to(device))
    return _LAYOUTS[key]


def _loss_weights(same_weight: float, different_weight: float, compact_weight: float | None,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The weights of the terms [means, present, compactness] in :func:`pair_objective`'s
    loss: −same_weight and different_weight on the means, same_weight on the same-class
    ``present`` (the 1 of 1 − means[0]), 0 on the other, compact_weight on compactness; as
    ``dtype``, rounded once from the config's values (a float32 copy made float64 would carry
    float32's rounding of 0.3 into the parity check)."""
    key = (same_weight, different_weight, compact_weight, torch.device(device), dtype)
    if key not in _WEIGHTS:
        weights = [-same_weight, different_weight, same_weight, 0.0]
        _WEIGHTS[key] = torch.tensor(weights if compact_weight is None
                                     else [*weights, compact_weight], device=device,
                                     dtype=dtype)
    return _WEIGHTS[key]


def _pair_weights(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (2, batch, batch) each: where two samples are of the same class, the pair weights
    [1 off the diagonal, 0]; where they are not, [0, 1 off the diagonal]."""
    key = (batch, torch.device(device))
    if key not in _PAIRS:
        off_diagonal = 1 - torch.eye(batch, device=device)
        zeros = torch.zeros_like(off_diagonal)
        _PAIRS[key] = (torch.stack([off_diagonal, zeros]), torch.stack([zeros, off_diagonal]))
    return _PAIRS[key]

"""MODA, modularization by activation-driven training: modules from a model trained to have
class-specific activations.

Training (kind ``moda``, :class:`MODATraining`): cross-entropy plus three terms over the ReLU
activations of every conv and hidden fully connected layer, each averaged over the layers:
α·(1 − affinity) + β·dispersion + γ·compactness. A sample's activation vector at a layer is the
ReLU output, for a conv layer its spatial mean per channel. *Affinity*: the mean cosine
similarity of the (L2-normalised) vectors of same-class sample pairs i < j in the batch;
*dispersion*: that of different-class pairs; *compactness*: the mean L1 norm of the vectors
divided by their length (the mean activation). A batch without a same-class (different-class)
pair contributes no affinity (dispersion) term.

Decomposition (approach ``moda``): a channel (conv) or unit (hidden Linear) belongs to class
c's module when its activation rate, the fraction of c's training images on which it is active,
reaches τ. Channels of coupled convs (residual additions) are read at several ReLUs; their
rates combine by ``residual_skip`` ("intersection": the least active site, MODA's choice;
"union": the most active; see :meth:`~dnnmod.modules.activations.ActivationStatistics.group_view`).
A module's score is its own class's logit of the masked model; the composed model for a
sub-task T is the union network (:func:`dnnmod.modules.union.union_network`): the OR of T's
module masks with only T's output rows, argmax over them.

Deviations from the paper:
- Training captures every ``nn.ReLU`` module the forward pass calls (in the zoo these are
  exactly the activation sites of the conv and hidden Linear groups; decomposition reads the
  sites proper, :func:`~dnnmod.modules.activations.activation_sites`).
- A layer that would keep nothing for a class keeps its most frequently active channel (a
  network cannot have an empty layer); the paper does not say what it does then.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dnnmod.approaches.base import Approach, Decomposition, RunContext
from dnnmod.hyperparameters import OneOf, Range
from dnnmod.modules.activations import REDUCTIONS, activation_statistics, capture_activations
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.masking import ensure_nonempty
from dnnmod.modules.metrics import SHARED_KRR
from dnnmod.training.objectives import (
    LayerLayout,
    Objective,
    layer_layout,
    pair_objective,
    reduction_dtype,
)


class MODATraining(Objective):
    """Cross-entropy + α·(1 − affinity) + β·dispersion + γ·compactness of ReLU activations."""

    name = "moda"
    defaults = {
        "alpha": 1.0,   # weight of the affinity term (same-class similarity, maximised)
        "beta": 1.0,    # weight of the dispersion term (different-class similarity, minimised)
        "gamma": 0.3,   # weight of the compactness term (mean activation, minimised)
    }

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        sites = [name for name, module in model.named_modules() if isinstance(module, nn.ReLU)]
        with capture_activations(model, sites) as captured:
            yield captured

    def loss(self, logits, labels, captured):
        cross_entropy = nn.functional.cross_entropy(logits, labels)
        sums, layout = activation_sums(list(captured.values()))
        weights = self.hyperparameters
        loss, terms = pair_objective(cross_entropy, sums, layout, labels, weights["alpha"],
                                     weights["beta"], weights["gamma"])
        affinity, dispersion = terms.means
        return loss, {"cross_entropy": cross_entropy.detach(),
                      "compactness": terms.compactness, "affinity": affinity,
                      "dispersion": dispersion}


def activation_sums(activations: list[torch.Tensor]) -> tuple[torch.Tensor, LayerLayout]:
    """Each sample's activation vectors side by side, a conv layer's as its spatial sums (each
    layer's area is divided out by :func:`~dnnmod.training.objectives.pair_objective`: the
    similarities do not see a per-layer scale), in the activations'
    :func:`~dnnmod.training.objectives.reduction_dtype`, and their layout; ``activations``:
    one (batch, C) or (batch, C, H, W) tensor per layer.

    One sum per layer. A segmented sum of all layers' maps laid side by side (``aten::
    segment_reduce``, one op) dispatches 11 fewer ops a step on simcnn, but on the CPU it made
    the step 25 % slower (the copy of every map, and a segmented sum slower than 13 sums), and
    on CUDA the maps are channels-last, where a channel's values do not form a segment."""
    layout = layer_layout([a.shape[1] for a in activations], activations[0].device,
                          [a.shape[2] * a.shape[3] if a.dim() == 4 else 1 for a in activations])
    dtype = reduction_dtype(activations[0])
    sums = torch.cat([a.sum((2, 3), dtype=dtype) if a.dim() == 4 else a.to(dtype)
                      for a in activations], dim=1)
    return sums, layout


class MODA(Approach):
    name = "moda"
    training = "moda"
    composes_by_union = True
    # Table I sets the MODA-trained model's test accuracy against the ST model's; modules are
    # composed only into sub-task union networks (model_modularizer.py), never fine-tuned.
    accuracy_protocol = "modular_model"
    # MODA reports no KRR (module size and overlap by parameters): the shared definition.
    krr_definition = f"{SHARED_KRR} (MODA reports none)"
    defaults = {
        "threshold": 0.9,                 # τ: least activation rate of a kept channel or unit
        "residual_skip": "intersection",  # how the sites of coupled convs combine
    }

    constraints = {"threshold": Range(0, 1, low_open=True), "residual_skip": OneOf(REDUCTIONS)}

    def decompose(self, context: RunContext) -> Decomposition:
        model, data, hyperparameters = context.model, context.data, context.hyperparameters
        statistics = activation_statistics(model, context.structure, data.train,
                                           classes=context.classes)
        rates = statistics.group_view("frequency", hyperparameters["residual_skip"])
        masks = ensure_nonempty({group: rate >= hyperparameters["threshold"]
                                 for group, rate in rates.items()}, rates)
        return Decomposition(masks, OwnLogitHead(context.classes, data.num_classes))

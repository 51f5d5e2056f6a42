"""Per-class kernel selection by mean activation magnitude: a dnnmod plug-in approach.

Class c's module keeps, in every conv channel group, the fraction ``keep`` of the group's
kernels whose mean activation over c's training images is largest, and drops the rest; it
scores an image by its own class's logit of the base model with only those kernels, and the
highest score wins. No training, no search: the baseline that activation-driven approaches
(MODA's activation rates, Pan & Rajan's concern identification) refine, and the kind of
magnitude criterion channel pruning has long used (e.g. Hu et al. 2016's average percentage of
zeros, Molchanov et al. 2017's mean activation), here applied per class.

A channel's activation is the output of the ReLU that follows its conv, averaged over the
feature map's positions; a group read at several ReLUs (the residual additions of a ResNet)
combines them by ``residual_sites`` (dnnmod's ``ActivationStatistics.group_view``). Hidden
Linear layers are kept whole: the approach selects kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dnnmod.approaches.base import Approach, Decomposition, RunContext
from dnnmod.hyperparameters import OneOf, Range
from dnnmod.modules.activations import REDUCTIONS, activation_statistics
from dnnmod.modules.heads import OwnLogitHead

__all__ = ["MeanActivation", "top_fraction_masks"]


class MeanActivation(Approach):
    """Keep, per class and per conv group, the kernels most active on the class's images."""

    name = "mean_activation"
    defaults = {
        "keep": 0.5,                 # fraction of every conv group's kernels a module keeps
        "residual_sites": "mean",    # how a group read at several ReLUs combines their means
    }
    constraints = {"keep": Range(0, 1, low_open=True), "residual_sites": OneOf(REDUCTIONS)}

    def decompose(self, context: RunContext) -> Decomposition:
        statistics = activation_statistics(context.model, context.structure,
                                           context.data.train, classes=context.classes)
        means = statistics.group_view("mean", context.hyperparameters["residual_sites"])
        masks = top_fraction_masks({group.name: means[group.name]
                                    for group in context.structure.conv_groups
                                    if group.name in means},
                                   context.hyperparameters["keep"])
        return Decomposition(masks=masks,
                             head=OwnLogitHead(context.classes, context.data.num_classes))


def top_fraction_masks(scores: Mapping[str, torch.Tensor], keep: float
                       ) -> dict[str, torch.Tensor]:
    """Group → (classes, channels) bool mask of each class's ``keep`` fraction (at least one)
    of the group's channels with the highest ``scores`` (classes, channels); ties go to the
    lower channel index, so the choice depends on the scores alone."""
    masks = {}
    for group, group_scores in scores.items():
        count = max(1, round(keep * group_scores.shape[1]))
        order = torch.argsort(group_scores, dim=1, descending=True, stable=True)
        mask = torch.zeros(group_scores.shape, dtype=torch.bool)
        mask.scatter_(1, order[:, :count].cpu(), True)
        masks[group] = mask
    return masks

"""Combination rules: how the scores of a composed model's modules become a predicted class.

A rule takes the modules' scores, (batch, M) (or (batch, M, k) for heads with k outputs per
module, e.g. Pan & Rajan's V_c/V_uc votes), and the class each module recognises, (M,), and
returns the predicted class of every sample, (batch,). A module set names its rule
(``ModuleSet.combination``) and a composed model takes one by name. Rules come from the
``dnnmod.combination_rules`` entry points (dnnmod's own ``argmax`` and ``voting``, and any other
package's: docs/plugins.md); in-process, a decorated function registers one::

    @combination_rule("vote")
    def vote(scores, classes): ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dnnmod.errors import ArtifactError
from dnnmod.plugins import GROUPS, PluginError, Registry, callable_object

CombinationRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

COMBINATIONS: Registry[CombinationRule] = Registry(GROUPS["combination_rules"],
                                                   "combination rule", callable_object)


def combination_rule(name: str) -> Callable[[CombinationRule], CombinationRule]:
    """Register the decorated function as the combination rule ``name`` in this process."""

    def register(rule: CombinationRule) -> CombinationRule:
        if name in COMBINATIONS:
            raise PluginError(f"combination rule {name!r} is registered twice")
        COMBINATIONS[name] = rule
        return rule

    return register


def get_combination(name: str) -> CombinationRule:
    """The rule registered as ``name``; ArtifactError listing the known ones otherwise."""
    if name not in COMBINATIONS:
        raise ArtifactError(f"unknown combination rule {name!r}; known: "
                            f"{', '.join(sorted(COMBINATIONS))}")
    return COMBINATIONS[name]


def combine_scores(name: str, scores: torch.Tensor,
                   classes: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Predicted classes, (batch,), of module ``scores`` combined by rule ``name``; module m
    recognises ``classes[m]``."""
    rule = get_combination(name)
    classes = torch.as_tensor(classes, dtype=torch.long, device=scores.device)
    if scores.dim() not in (2, 3) or scores.shape[1] != len(classes):
        raise ArtifactError(f"combination {name!r}: scores of shape {tuple(scores.shape)} for "
                            f"{len(classes)} modules; expected (batch, {len(classes)}[, k])")
    return rule(scores, classes)


def argmax(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The module with the highest score wins (CNNSplitter, GradSplitter, MwT, MODA)."""
    if scores.dim() != 2:
        raise ArtifactError(f"combination 'argmax' takes one score per module; got scores of "
                            f"shape {tuple(scores.shape)}")
    return classes[scores.argmax(dim=1)]


def voting(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Pan & Rajan's vote over (batch, M, 2) scores (V_c, V_uc): module m votes for its class
    when V_c > V_uc; one vote → that class; several → the voter with the highest V_c; none →
    the module with the highest V_c. Returns the class, never the voter's position (the
    authors' earlier code returned the position)."""
    if scores.dim() != 3 or scores.shape[2] != 2:
        raise ArtifactError(f"combination 'voting' takes (V_c, V_uc) per module, scores of "
                            f"shape (batch, M, 2); got {tuple(scores.shape)}")
    concerned, unconcerned = scores[..., 0], scores[..., 1]
    votes = concerned > unconcerned
    among_voters = torch.where(votes, concerned, torch.finfo(concerned.dtype).min)
    chosen = torch.where(votes.any(dim=1), among_voters.argmax(dim=1), concerned.argmax(dim=1))
    return classes[chosen]

"""What both E3 patching protocols (:mod:`dnnmod.reuse.patching`, min-max, and
:mod:`dnnmod.reuse.patching_moda`) share: the target-class module's score per image, how well
those scores rank the weak task's target-class images above the rest, and the weak and patched
models' metrics on the target class (TC)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from dnnmod.errors import ArtifactError


def module_output(scores: torch.Tensor) -> torch.Tensor:
    """One module's output per image from its scores, (images, 1) or (images, 1, 2): a head
    with one score gives it; a head with two, Pan & Rajan's concern votes (V_c, V_uc), gives the
    margin V_c - V_uc, positive where the module claims its class (our choice: Pan & Rajan have
    no patching experiment)."""
    if scores.dim() == 2:
        return scores[:, 0]
    if scores.dim() == 3 and scores.shape[2] == 2:
        return scores[:, 0, 0] - scores[:, 0, 1]
    raise ArtifactError(f"module scores of shape {tuple(scores.shape[1:])} per image: patching "
                        "takes one score, or two concern votes (V_c, V_uc), per module")


def strong_module_scores(strong_model, modules, image_sets: Sequence,
                         normalization: Mapping[str, Any]) -> list[torch.Tensor]:
    """One score per image of each ImageSet in ``image_sets`` (:func:`module_output`) from
    the one module in ``modules``, which sees the images normalised as its strong model was
    trained (``normalization``), not with the weak task's statistics. The sets go through
    one scoring call together, so the module's execution is set up once."""
    from dnnmod.modules.metrics import module_scores

    first = image_sets[0]
    device = first.labels.device
    together = replace(first, images=torch.cat([s.images for s in image_sets]),
                       labels=torch.cat([s.labels for s in image_sets]),
                       mean=torch.tensor(normalization["mean"], device=device),
                       std=torch.tensor(normalization["std"], device=device))
    scores = module_output(module_scores(strong_model, modules, together))
    return list(scores.split([len(s) for s in image_sets]))


def ranking_auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """ROC AUC of ``scores`` ranking the images where ``positives`` (bool) is set above the
    others: the chance that a positive outscores a negative, ties counting half, over all
    pairs (scikit-learn's ``roc_auc_score``, without importing it); NaN when either side is
    empty. E3 reports it for the TC module on the weak task's test images: how well the module
    tells the TC from the other classes, whatever a protocol's calibration then makes of it."""
    positive, negative = scores[positives], scores[~positives]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    above = int((positive[:, None] > negative[None, :]).sum())
    tied = int((positive[:, None] == negative[None, :]).sum())
    return (2 * above + tied) / (2 * len(positive) * len(negative))


def target_metrics(labels: torch.Tensor, predictions: torch.Tensor, tc_column: int
                   ) -> dict[str, float]:
    """TC precision, recall and F1 (binary, "is it the TC") and non-TC accuracy, in %."""
    # lazily: the workflow imports this module to plan E3
    from dnnmod.modules.metrics import binary_prf

    labels, predictions = labels.cpu().numpy(), predictions.cpu().numpy()
    precision, recall, f1 = binary_prf(labels == tc_column, predictions == tc_column)
    others = labels != tc_column
    non_tc = (predictions[others] == labels[others]).mean() if others.any() else float("nan")
    return {"precision": 100 * float(precision), "recall": 100 * float(recall),
            "f1": 100 * float(f1), "non_tc_accuracy": 100 * float(non_tc)}


def compare_predictions(labels: torch.Tensor, weak: torch.Tensor, patched: torch.Tensor,
                        tc_column: int) -> dict[str, float]:
    """:func:`target_metrics` of the weak and of the patched predictions, prefixed."""
    return {**{f"weak_{key}": value for key, value in
               target_metrics(labels, weak, tc_column).items()},
            **{f"patched_{key}": value for key, value in
               target_metrics(labels, patched, tc_column).items()}}

"""The metrics every approach is judged by, written once (specs: approaches.md, vocabulary).

Masks come in several granularities (conv channels, hidden Linear units, conv output
positions; see :mod:`dnnmod.modules.masking`); every metric below states how it reads each.

- composed accuracy: the module set's combined prediction on the test images, and its loss
  against the base model on the same images, in percentage points (``composed_loss_pp``);
- accuracy loss (``accuracy_loss_pp``, E2's headline): as the approach's paper states it
  (:data:`ACCURACY_PROTOCOLS`): the composed loss for the splitters; for MwT and MODA the
  standard-trained model's test accuracy minus the modular-trained model's own, since their
  papers never compose per-class modules by their own logits for this figure;
- KRR (kernel retention rate): kept conv kernels / conv kernels, mean over modules. A kernel
  (conv channel) counts as kept if any of its positions is active; a conv group without a
  mask counts as fully kept. Hidden Linear units are not kernels and do not enter KRR. This
  shared definition (``krr_shared``) counts each channel group once; ``krr`` is the
  definition of the approach's paper (:func:`layer_kernel_retention` for MwT and the
  splitters), named in the approach's file;
- unit retention: kept hidden Linear units / hidden Linear units, mean over modules; a linear
  group without a mask counts as fully kept (1.0 when no linear group is masked). None when
  the model has no hidden Linear layer (nothing to retain; JSON null);
- module size and FLOPs: of the physically extracted module (head included; see
  :mod:`dnnmod.modules.extract`: dropped channels and units are removed, inactive positions
  of kept channels are not), as fractions of the base model, mean over modules;
- overlap: mean pairwise Jaccard index of the modules' kept-kernel sets, kernels read as for
  KRR (channel view, unmasked conv groups kept by every module);
- per-module binary precision, recall and F1 for "is it my class";
- model–module Jaccard index (Pan & Rajan): active output elements of the module over the
  model's, over the masked groups.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.modules.extract import count_flops, count_parameters, extract_module
from dnnmod.modules.inference import accuracy as model_accuracy
from dnnmod.modules.inference import kept_channel_pass, run
from dnnmod.modules.masking import channel_view
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import ChannelGroup


def module_scores(model: nn.Module, modules: ModuleSet, images) -> torch.Tensor:
    """Scores of all modules on an ImageSet, (samples, modules): on a CPU module by module as
    kept-channel sub-networks where the set has channel masks of conv groups only, else in
    batched masked passes (:func:`~dnnmod.modules.inference.kept_channel_pass`)."""
    conv_groups = {group.name for group in modules.structure.conv_groups}
    channel_masks = all(name in conv_groups and mask.dim() == 2
                        for name, mask in modules.masks.items())
    kept_pass = kept_channel_pass(model, modules.structure) if channel_masks else None
    return run(model, images, structure=modules.structure, masks=modules.masks,
               head=modules.head.to(images.labels.device), kept_pass=kept_pass)


def composed_accuracy(modules: ModuleSet, scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy (%) of the composed prediction on samples of the set's classes."""
    return 100.0 * (modules.predict(scores) == labels).float().mean().item()


def top_k_accuracy(scores: torch.Tensor, classes: Sequence[int], labels: torch.Tensor,
                   k: int = 5) -> float:
    """Top-k accuracy (%) of ranking the classes by score: ``scores`` (samples, M), or (samples,
    M, 2) votes ranked by their first column (Pan & Rajan: by V_c); module m recognises
    ``classes[m]``; every label must be one of them. With k >= M every sample counts."""
    classes = [int(c) for c in classes]
    if k >= len(classes):
        return 100.0
    position = {label: index for index, label in enumerate(classes)}
    try:
        truth = [position[int(label)] for label in labels.tolist()]
    except KeyError as err:
        raise ConfigError(f"top-{k} accuracy: label {err.args[0]} is none of the classes "
                          f"{classes}") from None
    ranking = (scores[..., 0] if scores.dim() == 3 else scores).double().cpu().numpy()
    if not np.isfinite(ranking).all():
        raise ConfigError(f"top-{k} accuracy: the scores are not all finite")
    # scikit-learn's top_k_accuracy_score to the bit, without importing it (~1.5 s of CPU a
    # job): a stable ascending sort, reversed, so of tied scores the later class ranks first
    top = np.argsort(ranking, axis=1, kind="mergesort")[:, ::-1][:, :k]
    hits = (top == np.asarray(truth)[:, None]).any(axis=1)
    return 100.0 * float(hits.mean())


def binary_prf(truth, claimed) -> tuple[float, float, float]:
    """Precision, recall and F1 of the claims ``claimed`` against ``truth`` (bool tensors or
    NumPy arrays of one shape), each 0.0 where its denominator is 0: the same floats as
    scikit-learn's ``precision_recall_fscore_support(average="binary", zero_division=0)``
    (F1 by its formula, 2·tp / (true + predicted)), without importing it (~1.5 s of CPU a
    job). Counts are exact integers, so each quotient is the one correctly rounded double."""
    true_positives = int((truth & claimed).sum())
    predicted, actual = int(claimed.sum()), int(truth.sum())
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / actual if actual else 0.0
    f1 = 2 * true_positives / (actual + predicted) if actual + predicted else 0.0
    return precision, recall, f1


def binary_metrics(modules: ModuleSet, scores: torch.Tensor, labels: torch.Tensor
                   ) -> list[dict[str, float]]:
    """Precision, recall and F1 (%) of each module answering "is it my class?".

    A module with a thresholded head (e.g. a sigmoid score) claims a sample above its
    threshold; otherwise it claims the samples the composed prediction gives its class.
    """
    predicted = modules.predict(scores)
    rows = []
    for position, cls in enumerate(modules.classes):
        if modules.head.threshold is not None:
            claimed = scores[:, position] > modules.head.threshold
        else:
            claimed = predicted == cls
        precision, recall, f1 = binary_prf(labels == cls, claimed)
        rows.append({"class": cls, "precision": 100 * precision, "recall": 100 * recall,
                     "f1": 100 * f1})
    return rows


def _kept_channels(modules: ModuleSet, groups: Sequence[ChannelGroup]) -> torch.Tensor:
    """Bool (modules, channels of ``groups``): each module's kept channels (channel view),
    all of an unmasked group's."""
    kept = []
    for group in groups:
        mask = modules.masks.get(group.name)
        kept.append(torch.ones(len(modules), group.size, dtype=torch.bool) if mask is None
                    else channel_view(mask).cpu())
    return torch.cat(kept, dim=1)


def kernel_retention(modules: ModuleSet) -> list[float]:
    """KRR of each module: kept conv kernels / conv kernels, each channel group counted once."""
    kept = _kept_channels(modules, modules.structure.conv_groups).sum(dim=1)
    return (kept.float() / modules.structure.total_kernels).tolist()


def layer_kernel_retention(modules: ModuleSet, layers: Sequence[str] | None = None
                           ) -> list[float]:
    """KRR of each module counted per conv layer, as the papers that mask layers count it: each
    of ``layers`` (default: every conv layer of the model) adds its group's kept kernels and
    its group's size, so a group shared by coupled convs (a residual addition) counts once per
    layer, and a conv left out of ``layers`` (MwT's ungated first conv) not at all."""
    structure = modules.structure
    owners = {layer: group for group in structure.conv_groups for layer in group.convs}
    layers = list(owners) if layers is None else list(layers)
    unknown = [layer for layer in layers if layer not in owners]
    if unknown or not layers:
        raise ConfigError(f"KRR per conv layer: {unknown or 'no layers'} "
                          f"{'are no conv layers of the model' if unknown else 'given'}")
    groups = [owners[layer] for layer in layers]
    kept = _kept_channels(modules, groups).sum(dim=1)
    return (kept.float() / sum(group.size for group in groups)).tolist()


def unit_retention(modules: ModuleSet) -> list[float] | None:
    """Unit retention of each module: kept hidden Linear units / hidden Linear units; None
    when the model has no hidden Linear layer."""
    groups = modules.structure.linear_groups
    if not groups:
        return None
    kept = _kept_channels(modules, groups).sum(dim=1)
    return (kept.float() / modules.structure.total_units).tolist()


def kernel_overlap(modules: ModuleSet) -> float:
    """Mean pairwise Jaccard index of the modules' kept-kernel sets (0 for a single module)."""
    kept = _kept_channels(modules, modules.structure.conv_groups)
    pairs = list(itertools.combinations(range(len(modules)), 2))
    if not pairs:
        return 0.0
    jaccard = [((kept[a] & kept[b]).sum() / (kept[a] | kept[b]).sum()).item() for a, b in pairs]
    return sum(jaccard) / len(jaccard)


def model_module_jaccard(modules: ModuleSet) -> list[float]:
    """Jaccard index between the model and each module (Pan & Rajan's Table 1): the module's
    active elements over the model's, a module being a subset of its model. Elements are the
    output values per image of every masked group: (channel, h, w) positions of a conv group
    with a traced spatial shape (a channel mask keeps all positions of a kept channel),
    channels of one without, units of a linear group. Unmasked groups are left out, as they
    are the same in both."""
    kept, total = torch.zeros(len(modules)), 0
    for group in modules.structure.groups:
        mask = modules.masks.get(group.name)
        if mask is None:
            continue
        positions = math.prod(group.shape[1:]) if mask.dim() == 2 else 1
        kept += mask.flatten(1).sum(dim=1).cpu().float() * positions
        total += math.prod(group.shape)
    return (kept / total).tolist() if total else [1.0] * len(modules)


def deployed(network: nn.Module, reuse: Callable[[nn.Module], nn.Module] | None) -> nn.Module:
    """``network`` as its approach deploys it: ``reuse`` (the approach's
    :meth:`~dnnmod.approaches.base.Approach.reuse_network`, which may change its argument in
    place) applied to a copy; ``network`` itself without ``reuse``."""
    return network if reuse is None else reuse(copy.deepcopy(network))


def module_costs(model: nn.Module, modules: ModuleSet,
                 reuse: Callable[[nn.Module], nn.Module] | None = None
                 ) -> list[dict[str, float]]:
    """Parameters and FLOPs of each extracted module (with its head) relative to the base.
    What ``reuse`` removes (MwT's mask generators) counts neither in a module nor in the base
    model: MwT's modules are measured against the model without generators, the ST model's
    size, as its authors count them."""
    input_shape = tuple(modules.structure.input_shape)
    base = deployed(model, reuse)
    base_params, base_flops = count_parameters(base), count_flops(base, input_shape)
    rows = []
    for position in range(len(modules)):
        extracted = extract_module(model, modules.structure, modules.module_masks(position))
        head = modules.head.for_module(position)
        standalone = deployed(nn.Sequential(extracted, head), reuse)
        rows.append({
            "params": count_parameters(standalone),
            "size_fraction": count_parameters(standalone) / base_params,
            "flops_fraction": count_flops(standalone, input_shape) / base_flops,
        })
    return rows


def union_composition(model: nn.Module, modules: ModuleSet, test, base_accuracy: float,
                      reuse=None) -> dict[str, float]:
    """The whole set composed as MwT and MODA compose modules: one union network of all its
    modules (:func:`~dnnmod.modules.union.union_network`, passed through ``reuse``, the
    approach's :meth:`~dnnmod.approaches.base.Approach.reuse_network`: MwT's without its mask
    generators), on the test images of the set's classes. Its accuracy, the loss against
    ``base_accuracy`` (pp) and its parameters as a fraction of the base model's."""
    from dnnmod.modules.union import union_network

    network = union_network(model, modules, modules.classes)
    if reuse is not None:
        network = reuse(network)
    # T's images, labelled in the network's output order
    accuracy = model_accuracy(network, test.subset(modules.classes))
    return {"union_accuracy": accuracy, "union_loss_pp": base_accuracy - accuracy,
            "union_size": count_parameters(network) / count_parameters(deployed(model, reuse))}


#: How a paper states its approach's accuracy loss (``Approach.accuracy_protocol``).
ACCURACY_PROTOCOLS = {
    "composed": "the base model's test accuracy minus that of the modules composed as the "
                "approach composes them",
    "modular_model": "the standard-trained (ST) model's test accuracy minus the "
                     "modular-trained model's own; no modules are composed for this figure",
}
PER_LAYER_KRR = ("kept kernels over the model's, counted per conv layer (a group shared by "
                 "coupled convs once per layer)")
SHARED_KRR = ("kept conv kernels over the model's, each channel group counted once, a conv "
              "group without a mask (e.g. an ungated first conv) counted as kept")


def headline_accuracy_loss(protocol: str, base_accuracy: float, composed: float,
                           st_accuracy: float | None) -> float | None:
    """E2's headline accuracy loss (pp) under ``protocol`` (:data:`ACCURACY_PROTOCOLS`); None
    under ``modular_model`` when the ST accuracy is unknown."""
    if protocol not in ACCURACY_PROTOCOLS:
        raise ConfigError(f"accuracy protocol {protocol!r}: expected one of "
                          f"{sorted(ACCURACY_PROTOCOLS)}")
    if protocol == "composed":
        return base_accuracy - composed
    return None if st_accuracy is None else st_accuracy - base_accuracy


def evaluate(model: nn.Module, modules: ModuleSet, test, base_accuracy: float | None = None,
             with_costs: bool = True, union: bool = False, *, approach=None,
             st_accuracy: float | None = None) -> dict[str, Any]:
    """Every shared metric of a module set on the ImageSet ``test`` (base-model labels); with
    ``union``, also :func:`union_composition` (for approaches that compose by union network:
    the shared composition sets the modules side by side, and their own-class scores, each
    from a different sub-network, grow less comparable as the modules shrink).

    ``approach`` (an :class:`~dnnmod.approaches.base.Approach`; None: the shared definitions)
    names its paper's accuracy protocol and KRR definition, which give the headline
    ``accuracy_loss_pp`` and ``krr``; ``st_accuracy`` is the test accuracy of the ST model of
    the same architecture, dataset and seed (the ``modular_model`` protocol needs it)."""
    scores = module_scores(model, modules, test)
    if base_accuracy is None:
        base_accuracy = model_accuracy(model, test)
    accuracy = composed_accuracy(modules, scores, test.labels)
    binary = binary_metrics(modules, scores, test.labels)
    shared_krr = kernel_retention(modules)
    if approach is None:
        protocol, krr, krr_definition = "composed", shared_krr, SHARED_KRR
    else:
        protocol, krr_definition = approach.accuracy_protocol, approach.krr_definition
        krr = approach.paper_kernel_retention(model, modules)
    units = unit_retention(modules)
    result = {
        "accuracy_protocol": protocol, "st_accuracy": st_accuracy,
        "base_accuracy": base_accuracy, "composed_accuracy": accuracy,
        "composed_loss_pp": base_accuracy - accuracy,
        "accuracy_loss_pp": headline_accuracy_loss(protocol, base_accuracy, accuracy,
                                                   st_accuracy),
        "krr": sum(krr) / len(krr), "krr_shared": sum(shared_krr) / len(shared_krr),
        "krr_definition": krr_definition, "overlap": kernel_overlap(modules),
        "unit_retention": None if units is None else sum(units) / len(units),
        "mean_precision": sum(r["precision"] for r in binary) / len(binary),
        "mean_recall": sum(r["recall"] for r in binary) / len(binary),
        "mean_f1": sum(r["f1"] for r in binary) / len(binary),
        "modules": [{**row, "krr": k, "krr_shared": shared, "unit_retention": u}
                    for row, k, shared, u in zip(binary, krr, shared_krr,
                                                 units or [None] * len(krr), strict=True)],
    }
    if union:
        result.update(union_composition(model, modules, test, base_accuracy,
                                        None if approach is None else approach.reuse_network))
    if with_costs:
        costs = module_costs(model, modules,
                             None if approach is None else approach.reuse_network)
        result["module_size"] = sum(c["size_fraction"] for c in costs) / len(costs)
        result["flops_fraction"] = sum(c["flops_fraction"] for c in costs) / len(costs)
        for row, cost in zip(result["modules"], costs, strict=True):
            row.update(cost)
    return result


def metrics_record(model_meta: dict[str, Any], modules: ModuleSet,
                   result: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json record of a module set: what was decomposed, by which approach, at
    what cost, and the :func:`evaluate` result. E2 reads these records."""
    return {
        "approach": modules.approach, "training": model_meta["training"],
        "model": model_meta["model"], "arch": model_meta["arch"],
        "dataset": model_meta["dataset"], "seed": modules.provenance["seed"],
        "train_seconds": model_meta["wall_seconds"],
        "modularize_seconds": modules.provenance["wall_seconds"],
        "device": modules.provenance.get("device", ""), **result,
    }

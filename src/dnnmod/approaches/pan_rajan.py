"""Decomposition by concern identification (Pan & Rajan, ICSE 2022): a module per class from
where the trained model is active on that class, voting V_c against V_uc.

Steps, for the module of class c (all modules from the same two passes over the data):

- Concern identification (CI): run c's training images; an output element of a prunable layer,
  a (channel, h, w) position of a conv group or a unit of a hidden Linear group, is inactive
  when its ReLU output is 0 on every one of them. Inactive elements are switched off
  (position masks: conv weights are shared, so masks are per position, not per weight).
- Tangling identification (TI): images of the other classes at a 1:1 ratio, split evenly
  across them; an element they activate is switched back on. **Decision** (approaches.md):
  it is switched back on when it is active on at least a fraction ρ (``tangling_rate``) of
  those images, ρ = 0 meaning "on any of them".
- Concern modularization (MC): the output layer becomes two nodes,
  :class:`~dnnmod.modules.heads.ConcernVotesHead`: V_c keeps c's weights and bias, V_uc takes
  the means over the other classes. Dense backtracking (MC-BLN) then removes the
  penultimate nodes that only feed V_uc.
- Composition: the ``voting`` rule (:mod:`dnnmod.modules.combination`).

Deviations and decisions, each also in the report:
- The paper's Algorithm 2 and its prose disagree on the backtracking sign test; this follows
  the prose ("edges only connected to the unconcerned node"): a penultimate node k leaves
  module c when its edge to V_c is not excitatory (w_ck <= 0), its edge to V_uc is
  (u_k > 0), and that edge carries at least the fraction δ of the node's outgoing weight,
  u_k >= δ (|w_ck| + u_k).
- A penultimate node is an input of the logit layer: a hidden Linear unit, a conv channel
  (after global pooling) or a conv position (after flattening). The module format has one
  mask per channel group, so where the channel is coupled to others (the residual stage of a
  ResNet feeds the logit layer) removing the node would drop that channel from every coupled
  layer, not only from the logit layer's input, which the paper does not do (on the demo
  ResNet-20 it cost 9 pp of composed accuracy, against none for exact removal on VGG16 and
  SimCNN). By default backtracking is then skipped, and the provenance says so;
  ``backtrack_coupled: true`` applies it anyway.
- The same per-class sample serves TI for every module: k = ceil(mean class count / (N − 1))
  seeded images of each class, so a module sees (N − 1) k ≈ as many negative images as its
  own, split evenly (exactly 1:1 for balanced classes).
- A residual group's position counts as active when it is active at any of the ReLUs that
  read it (the union): masking it at its producers then leaves the computation on c's images
  unchanged. A group without one spatial shape takes channel masks (a channel is active when
  any of its positions is); with ρ > 0 such a channel's rate is that of its most active
  position.
- Channels inactive at every position are removed physically when a module is extracted
  (:mod:`dnnmod.modules.extract`); a layer that would keep nothing keeps its most active
  channel (a network cannot have an empty layer; the paper does not say).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dnnmod.approaches.base import Approach, Decomposition, RunContext
from dnnmod.errors import ConfigError
from dnnmod.hyperparameters import Range
from dnnmod.modules.activations import ActivationStatistics, activation_statistics
from dnnmod.modules.heads import ConcernVotesHead
from dnnmod.modules.inference import run
from dnnmod.modules.masking import ensure_nonempty, mask_shapes
from dnnmod.modules.metrics import (
    SHARED_KRR,
    composed_accuracy,
    kernel_retention,
    model_module_jaccard,
    module_scores,
    top_k_accuracy,
)
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import ChannelGroup, ModelStructure, probe


class PanRajan(Approach):
    name = "pan_rajan"
    # The paper measures modules by the model-module Jaccard index of active positions, not by
    # a KRR: the shared definition stands.
    krr_definition = f"{SHARED_KRR} (Pan & Rajan report none)"
    defaults = {
        "tangling": True,        # TI: switch back on what images of other classes activate
        "tangling_rate": 0.0,    # ρ: least share of those images (0: any one of them)
        "backtracking": True,    # MC-BLN: remove penultimate nodes that only feed V_uc
        "delta": 0.5,            # δ: least share of a removed node's weight going to V_uc
        # Also where the penultimate nodes are channels coupled to other layers (a ResNet's
        # last residual stage): removing one then drops the channel from all of them.
        "backtrack_coupled": False,
    }
    constraints = {"tangling_rate": Range(0, 1), "delta": Range(0, 1)}

    def decompose(self, context: RunContext) -> Decomposition:
        model, base_meta, data = context.model, context.base_meta, context.data
        hyperparameters = context.hyperparameters
        structure, classes, seed = context.structure, context.classes, context.seed
        if len(classes) < 2:
            raise ConfigError(f"pan_rajan: {base_meta.get('dataset')} has "
                              f"{len(classes)} class; V_uc needs at least two")
        concern = activation_statistics(model, structure, data.train, classes=classes,
                                        positions=True)
        active = {name: rate > 0 for name, rate in element_rates(concern, structure).items()}
        details: dict[str, Any] = {}
        if hyperparameters["tangling"]:
            negatives = tangling_sample(data.train, seed)
            sampled = activation_statistics(model, structure, negatives, classes=classes,
                                            positions=True)
            rates = negative_rates(element_rates(sampled, structure), sampled.counts)
            rho = hyperparameters["tangling_rate"]
            active = {name: mask | ((rates[name] > 0) & (rates[name] >= rho))
                      for name, mask in active.items()}
            details["tangling_images_per_class"] = int(sampled.counts.max())
        if hyperparameters["backtracking"]:
            active, details["backtracking"] = backtrack(
                model, structure, active, hyperparameters["delta"],
                coupled=hyperparameters["backtrack_coupled"])
        importance = element_rates(concern, structure)
        masks = ensure_nonempty(active, importance)
        kinds = {group.name: group.kind for group in structure.groups}
        provenance = {"batch_norm": any(group.norms for group in structure.groups),
                      # conv groups without one spatial shape: masked per channel, not position
                      "channel_masked_groups": [name for name, mask in masks.items()
                                                if mask.dim() == 2 and kinds[name] == "conv"],
                      **details}
        return Decomposition(masks, ConcernVotesHead(classes, data.num_classes), "voting",
                             provenance)


def element_rates(statistics: ActivationStatistics, structure: ModelStructure
                  ) -> dict[str, torch.Tensor]:
    """Group name → (K, ...) activation rate of each output element, shaped as the group's
    mask: (K, C, H, W) positions where every ReLU reading the group has the group's shape,
    else (K, C) channels (rate of the channel's most active position); units of linear
    groups. Several sites of one group combine by the union (max)."""
    sites_of: dict[str, list[torch.Tensor]] = {}
    for site, group in statistics.sites.items():
        sites_of.setdefault(group, []).append(statistics.frequency[site])
    rates = {}
    for group in structure.groups:
        if group.name not in sites_of:
            continue
        tensors = sites_of[group.name]
        positional = (len(mask_shapes(group)) > 1
                      and all(tuple(t.shape[1:]) == tuple(group.shape) for t in tensors))
        if not positional:
            tensors = [t.flatten(2).amax(dim=2) if t.dim() > 2 else t for t in tensors]
        rates[group.name] = torch.stack(tensors).amax(dim=0)
    return rates


def tangling_sample(images, seed: int):
    """The images TI observes: ceil(mean class count / (N − 1)) seeded images of each class
    (all of a class that has fewer)."""
    counts = torch.bincount(images.labels.cpu(), minlength=images.num_classes)
    per_class = math.ceil(counts.float().mean().item() / (images.num_classes - 1))
    generator = torch.Generator().manual_seed(seed)
    labels = images.labels.cpu()
    chosen = []
    for label in range(images.num_classes):
        index = (labels == label).nonzero().flatten()
        chosen.append(index[torch.randperm(len(index), generator=generator)[:per_class]])
    return images.take(torch.cat(chosen).sort().values.to(images.device))


def negative_rates(rates: Mapping[str, torch.Tensor], counts: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """Per module c, the rate over the sampled images of every class but c: (K, ...) from the
    per-class rates (K, ...) and image counts (K,)."""
    weights = counts.double()
    others = weights.sum() - weights  # images of the other classes, per module
    result = {}
    for name, rate in rates.items():
        flat = rate.flatten(1) * weights[:, None]
        result[name] = ((flat.sum(dim=0, keepdim=True) - flat) / others[:, None]).view_as(rate)
    return result


def backtrack(model: nn.Module, structure: ModelStructure, active: dict[str, torch.Tensor],
              delta: float, coupled: bool = False
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """MC-BLN on the penultimate layer: ``active`` with the nodes that only feed V_uc switched
    off per module, and what was done (for the provenance). Penultimate channels coupled to
    other layers are left alone unless ``coupled``."""
    layers = dict(model.named_modules())
    output = layers[structure.output_layer]
    feeding = _feeding_group(model, structure)
    if not isinstance(output, nn.Linear) or feeding is None or feeding.name not in active:
        return active, {"applied": False,
                        "reason": "the logit layer is not a Linear layer reading the "
                                  "activations of a group"}
    if output.in_features == feeding.size:
        node_kind = "unit" if feeding.kind == "linear" else "channel"
    elif active[feeding.name].dim() == 4 and output.in_features == math.prod(feeding.shape):
        node_kind = "position"
    else:
        return active, {"applied": False,
                        "reason": f"the logit layer reads {output.in_features} features, not "
                                  f"the {feeding.size} channels of group {feeding.name}"}
    if len(feeding.convs) > 1 and not coupled:
        return active, {"applied": False, "group": feeding.name,
                        "reason": f"the penultimate channels (group {feeding.name}) are coupled "
                                  f"to {len(feeding.convs)} layers; one mask per group would "
                                  "drop a removed node from all of them, not only from the "
                                  "logit layer's input (backtrack_coupled: true does it)"}
    weight = output.weight.detach().double().cpu()  # (N, F)
    classes = weight.shape[0]
    concerned = weight
    unconcerned = (weight.sum(dim=0, keepdim=True) - weight) / (classes - 1)
    removed = ((concerned <= 0) & (unconcerned > 0)
               & (unconcerned >= delta * (concerned.abs() + unconcerned)))  # (N, F)
    mask = active[feeding.name].clone()
    if node_kind == "position":
        mask &= ~removed.view(classes, *feeding.shape)
    else:
        keep = ~removed.view(classes, feeding.size, *([1] * (mask.dim() - 2)))
        mask &= keep
    details = {"applied": True, "group": feeding.name, "node": node_kind,
               "coupled_layers": list(feeding.convs) if len(feeding.convs) > 1 else [],
               "removed_nodes_mean": removed.sum(dim=1).double().mean().item(),
               "nodes": output.in_features}
    return {**active, feeding.name: mask}, details


def _feeding_group(model: nn.Module, structure: ModelStructure) -> ChannelGroup | None:
    """The group whose layer runs last before the logit layer (the penultimate layer)."""
    layers = dict(model.named_modules())
    owner = {layer: group for group in structure.groups
             for layer in (*group.convs, *group.norms)}
    calls: list[str] = []
    handles = [layers[name].register_forward_hook(
        lambda _module, _inputs, _output, name=name: calls.append(name))
        for name in (*owner, structure.output_layer)]
    probe(model, structure.input_shape, handles)
    before = calls[:calls.index(structure.output_layer)]
    return owner[before[-1]] if before else None


# Their Table 1: the decomposition's cost, measured per module set.


def decomposition_cost(model: nn.Module, model_meta: dict[str, Any], modules: ModuleSet,
                       test) -> dict[str, Any]:
    """Table 1 measures of one module set on the ImageSet ``test``, with what identifies it
    and the notes a reader needs (BatchNorm, channel-level masks, TI's rate ρ, backtracking
    skipped)."""
    logits = run(model, test)
    scores = module_scores(model, modules, test)
    classes = list(range(logits.shape[1]))
    model_top1 = top_k_accuracy(logits, classes, test.labels, 1)
    model_top5 = top_k_accuracy(logits, classes, test.labels, 5)
    composed_top1 = composed_accuracy(modules, scores, test.labels)
    composed_top5 = top_k_accuracy(scores, modules.classes, test.labels, 5)
    jaccard = model_module_jaccard(modules)
    krr = kernel_retention(modules)
    return {
        "approach": modules.approach, "model": model_meta["model"], "arch": model_meta["arch"],
        "dataset": model_meta["dataset"], "seed": modules.provenance["seed"],
        "model_top1": model_top1, "model_top5": model_top5,
        "composed_top1": composed_top1, "composed_top5": composed_top5,
        "top1_loss_pp": model_top1 - composed_top1, "top5_loss_pp": model_top5 - composed_top5,
        "jaccard": sum(jaccard) / len(jaccard), "krr": sum(krr) / len(krr),
        "modularize_seconds": modules.provenance["wall_seconds"],
        "device": modules.provenance.get("device", ""),
        "note": "; ".join(notes(modules.provenance)),
    }


def notes(provenance: dict[str, Any]) -> list[str]:
    """Where this run departs from the paper's setting, in words, from the provenance."""
    found = []
    if provenance.get("batch_norm"):
        found.append("BatchNorm model (the paper's have none): masks act after the norm")
    if provenance.get("channel_masked_groups"):
        found.append(f"{len(provenance['channel_masked_groups'])} conv group(s) without one "
                     "spatial shape masked per channel, not per position")
    hyperparameters = provenance.get("hyperparameters", {})
    if not hyperparameters.get("tangling", True):
        found.append("no tangling identification (CI alone)")
    elif hyperparameters.get("tangling_rate", 0):
        found.append(f"TI switches a position back on only when at least "
                     f"{hyperparameters['tangling_rate']:g} of the other classes' images "
                     "activate it (the paper: any one of them)")
    backtracking = provenance.get("backtracking")
    if isinstance(backtracking, dict) and not backtracking.get("applied", True):
        found.append(f"no dense backtracking: {backtracking.get('reason', '')}")
    return found

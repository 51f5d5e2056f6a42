"""Union networks: one extracted network for a sub-task T, as MwT and MODA compose modules.

For a sub-task T (a few of the base model's classes), the union network keeps a channel or
unit wherever any of T's modules keeps it (the OR of their masks), is physically extracted
(:func:`~dnnmod.modules.extract.extract_module`), and keeps only T's rows of the logit layer,
so its outputs are T's logits in T's order and its prediction is their argmax (MODA's
composition; MwT's union module before fine-tuning). It is never larger than the base model:
it holds a subset of the base model's channels and units.

:func:`union_classifier` is MwT's fine-tuned sub-task network (modularizer.py,
``generate_target_module``): the union network with all N logits, followed by a ReLU and a
freshly initialised Linear(N→|T|) head; every parameter is then trained
(:func:`~dnnmod.training.train.fine_tune`). Approach-specific changes (MwT removes its mask
generators) come in as ``reuse``, the approach's
:meth:`~dnnmod.approaches.base.Approach.reuse_network`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.modules.extract import extract_module
from dnnmod.modules.moduleset import ModuleSet


def union_masks(modules: ModuleSet, classes: Sequence[int]) -> dict[str, torch.Tensor]:
    """Group name → bool mask (one module's shape): the OR over the modules of ``classes``."""
    chosen = modules.subset(classes)
    return {name: (mask > 0).any(dim=0) for name, mask in chosen.masks.items()}


def _distinct(classes: Sequence[int]) -> list[int]:
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"union network: need distinct sub-task classes, got {classes}")
    return classes


def _output_layer(network: nn.Module, name: str) -> tuple[nn.Module, str, nn.Linear]:
    """The parent of logit layer ``name``, its attribute there, and the layer."""
    parent_name, _, attribute = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    return parent, attribute, getattr(parent, attribute)


def union_network(model: nn.Module, modules: ModuleSet, classes: Sequence[int]) -> nn.Module:
    """The extracted network of sub-task ``classes`` (base-model indices): OR of their modules'
    masks, logit layer restricted to their rows in the given order. Eval mode; ``model`` is
    left untouched."""
    classes = _distinct(classes)
    network = extract_module(model, modules.structure, union_masks(modules, classes))
    parent, attribute, logits = _output_layer(network, modules.structure.output_layer)
    restricted = nn.Linear(logits.in_features, len(classes), bias=logits.bias is not None,
                           device=logits.weight.device, dtype=logits.weight.dtype)
    with torch.no_grad():
        restricted.weight.copy_(logits.weight[classes])
        if logits.bias is not None:
            restricted.bias.copy_(logits.bias[classes])
    setattr(parent, attribute, restricted)
    return network.eval()


def union_classifier(model: nn.Module, modules: ModuleSet, classes: Sequence[int],
                     reuse: Callable[[nn.Module], nn.Module] | None = None) -> nn.Sequential:
    """MwT's sub-task network for ``classes``: ``union`` (the OR of their modules' masks,
    extracted with all N logits, passed through ``reuse``), then ``relu`` and ``head``, a
    Linear(N→|T|) with PyTorch's default initialisation (drawn from the global generator), whose
    outputs are T's classes in the given order. Eval mode; ``model`` is left untouched."""
    classes = _distinct(classes)
    network = extract_module(model, modules.structure, union_masks(modules, classes))
    if reuse is not None:
        network = reuse(network)
    logits = _output_layer(network, modules.structure.output_layer)[2]
    head = nn.Linear(logits.out_features, len(classes), device=logits.weight.device,
                     dtype=logits.weight.dtype)
    return nn.Sequential(OrderedDict(union=network, relu=nn.ReLU(), head=head)).eval()

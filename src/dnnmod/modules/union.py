"""Union networks: one extracted network for a sub-task T, as MwT and MODA compose modules.

For a sub-task T (a few of the base model's classes), the union network keeps a channel or
unit wherever any of T's modules keeps it (the OR of their masks), is physically extracted
(:func:`~dnnmod.modules.extract.extract_module`), and keeps only T's rows of the logit layer,
so its outputs are T's logits in T's order and its prediction is their argmax. It is never
larger than the base model: it holds a subset of the base model's channels and units.

:func:`fine_tune_head` retrains the union network's logit layer on T's training images (MwT's
sub-task reuse with fine-tuning): the layers below it stay fixed, so their outputs are computed
once through the shared inference path and the head trains on those features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.modules.extract import extract_module
from dnnmod.modules.heads import fit_linear_layer
from dnnmod.modules.inference import run
from dnnmod.modules.moduleset import ModuleSet


def union_masks(modules: ModuleSet, classes: Sequence[int]) -> dict[str, torch.Tensor]:
    """Group name → bool mask (one module's shape): the OR over the modules of ``classes``."""
    chosen = modules.subset(classes)
    return {name: (mask > 0).any(dim=0) for name, mask in chosen.masks.items()}


def union_network(model: nn.Module, modules: ModuleSet, classes: Sequence[int]) -> nn.Module:
    """The extracted network of sub-task ``classes`` (base-model indices): OR of their modules'
    masks, logit layer restricted to their rows in the given order. Eval mode; ``model`` is
    left untouched."""
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"union network: need distinct sub-task classes, got {classes}")
    network = extract_module(model, modules.structure, union_masks(modules, classes))
    parent_name, _, attribute = modules.structure.output_layer.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    logits: nn.Linear = getattr(parent, attribute)
    restricted = nn.Linear(logits.in_features, len(classes), bias=logits.bias is not None,
                           device=logits.weight.device, dtype=logits.weight.dtype)
    with torch.no_grad():
        restricted.weight.copy_(logits.weight[classes])
        if logits.bias is not None:
            restricted.bias.copy_(logits.bias[classes])
    setattr(parent, attribute, restricted)
    return network.eval()


def fine_tune_head(network: nn.Module, output_layer: str, train_images, *, epochs: int = 10,
                   lr: float = 0.01, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Retrain ``network``'s logit layer ``output_layer`` (a Linear) in place on
    ``train_images`` (an ImageSet whose labels index the layer's outputs, e.g. a
    ``subset(T)`` of the training split) for ``epochs`` epochs with Adam; the weights of the
    last epoch are kept (no selection, so nothing is chosen on test images)."""
    parent_name, _, attribute = output_layer.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    head: nn.Linear = getattr(parent, attribute)
    setattr(parent, attribute, nn.Identity())
    try:
        features = run(network, train_images)
    finally:
        setattr(parent, attribute, head)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    fit_linear_layer(head, features, train_images.labels, optimizer, epochs=epochs,
                     batch_size=batch_size, seed=seed)
    return network.eval()

"""Masked execution: run a base model as M modules at once, one channel mask per module.

A module keeps a subset of each channel group's kernels. Running it as the *masked* base
model means zeroing the dropped channels wherever the group's channels are produced: at the
output of every conv and every norm of the group. Zeroing after the norm matters: a BatchNorm
maps a zero input to its shift, so masking the conv alone would leak. With every producer
masked, a dropped channel is zero wherever a later layer reads it, which is exactly what
physically removing it computes (see :mod:`dnnmod.modules.extract`).

M modules share the frozen weights, so they run in one batched pass: the input batch is
repeated M times along the batch dimension and each repetition gets its module's masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from dnnmod.errors import ArtifactError
from dnnmod.modules.structure import ModelStructure


def check_masks(structure: ModelStructure, masks: Mapping[str, torch.Tensor]) -> int:
    """Validate ``masks`` (group name → (M, size) tensor) and return M, the module count."""
    expected = {group.name: group.size for group in structure.groups}
    if set(masks) != set(expected):
        missing, extra = sorted(set(expected) - set(masks)), sorted(set(masks) - set(expected))
        raise ArtifactError(f"channel masks do not match the model's groups "
                            f"(missing {missing[:5]}, unexpected {extra[:5]})")
    counts = {mask.shape[0] for mask in masks.values()}
    if len(counts) != 1:
        raise ArtifactError(f"channel masks disagree on the number of modules: {sorted(counts)}")
    for name, mask in masks.items():
        if mask.dim() != 2 or mask.shape[1] != expected[name]:
            raise ArtifactError(f"mask of group {name}: shape {tuple(mask.shape)}, expected "
                                f"(modules, {expected[name]})")
    return counts.pop()


@contextlib.contextmanager
def masked(model: nn.Module, structure: ModelStructure,
           masks: Mapping[str, torch.Tensor]) -> Iterator[int]:
    """Within the block, ``model`` computes M masked copies of itself on an M-times-repeated
    batch. Masks may be float and carry gradients (GradSplitter learns them this way).
    Yields M.
    """
    modules_count = check_masks(structure, masks)
    layers = dict(model.named_modules())
    handles = []

    def hook_for(mask: torch.Tensor):
        def apply(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            batch = output.shape[0] // modules_count
            shaped = mask.to(output.dtype).view(modules_count, 1, -1,
                                                *([1] * (output.dim() - 2)))
            return (output.view(modules_count, batch, *output.shape[1:]) * shaped).view_as(output)
        return apply

    try:
        for group in structure.groups:
            hook = hook_for(masks[group.name])
            for name in (*group.convs, *group.norms):
                handles.append(layers[name].register_forward_hook(hook))
        yield modules_count
    finally:
        for handle in handles:
            handle.remove()


def masked_logits(model: nn.Module, structure: ModelStructure,
                  masks: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Base-model outputs of every module on ``x``: shape (M, batch, num_classes)."""
    with masked(model, structure, masks) as modules_count:
        out = model(x.repeat(modules_count, *([1] * (x.dim() - 1))))
    return out.view(modules_count, x.shape[0], *out.shape[1:])


def kept_kernels(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Number of kept kernels per module, shape (M,)."""
    return sum((mask > 0).sum(dim=1) for mask in masks.values())


def ensure_nonempty(masks: Mapping[str, torch.Tensor],
                    importance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Binary masks where no module ends with an empty group: an empty group keeps its most
    important kernel (``importance``: same shapes as ``masks``), as GradSplitter prescribes."""
    fixed = {}
    for name, mask in masks.items():
        binary = mask > 0
        empty = ~binary.any(dim=1)
        if empty.any():
            best = importance[name].argmax(dim=1)
            binary = binary.clone()
            binary[empty, best[empty]] = True
        fixed[name] = binary
    return fixed

"""Masked execution: run a base model as M modules at once, one set of masks per module.

A mask dict maps a group name (see :mod:`dnnmod.modules.structure`) to a tensor with one row
per module, of one of two granularities:

- a *channel mask* (M, C): the kept channels of a conv group, or the kept units of a linear
  group;
- a *position mask* (M, C, H, W), conv groups only: the active output positions, (C, H, W) being
  the group's traced ``shape``. Such a group takes position masks only if all its layers
  produce that one shape (see :class:`~dnnmod.modules.structure.ChannelGroup`).

A group absent from the dict is kept whole. Bool and float masks are accepted; float masks may
carry gradients (GradSplitter learns its channel masks this way).

Running a module as the *masked* base model means zeroing what it drops wherever the group's
values are produced: at the output of every producer layer (conv or Linear) and every norm of
the group. Zeroing after the norm matters: a BatchNorm maps a zero input to its shift, so
masking the conv alone would leak. A norm that reads a concatenation normalises the channels
of several groups; each group masks its own slice of the norm's output (the group's
``norm_offsets``) and leaves the others as they are. With every producer and norm masked, a
dropped channel is zero wherever a later layer reads it, which is exactly what physically
removing it computes (see :mod:`dnnmod.modules.extract`).

M modules share the frozen weights, so they run in one batched pass: the input batch is
repeated M times along the batch dimension and each repetition gets its module's masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from dnnmod.errors import ArtifactError
from dnnmod.modules.structure import ChannelGroup, ModelStructure


def mask_shapes(group: ChannelGroup) -> list[tuple[int, ...]]:
    """The per-module mask shapes ``group`` accepts: (C,) and, for a conv group with a traced
    spatial shape, (C, H, W)."""
    shapes = [(group.size,)]
    if group.kind == "conv" and len(group.shape) == 3:
        shapes.append(tuple(group.shape))
    return shapes


def check_masks(structure: ModelStructure, masks: Mapping[str, torch.Tensor]) -> int:
    """Validate ``masks`` (group name → (M, C) or (M, C, H, W) tensor; absent groups are kept
    whole) and return M, the module count."""
    groups = {group.name: group for group in structure.groups}
    unknown = sorted(set(masks) - set(groups))
    if unknown:
        raise ArtifactError(f"masks name unknown group(s) {unknown[:5]}; the model's groups "
                            f"are {list(groups)[:5]}{' ...' if len(groups) > 5 else ''}")
    if not masks:
        raise ArtifactError("no masks: at least one group needs one (it gives the module count)")
    for name, mask in masks.items():
        accepted = mask_shapes(groups[name])
        if mask.dim() < 2 or tuple(mask.shape[1:]) not in accepted:
            expected = " or ".join(str(("modules", *shape)) for shape in accepted)
            raise ArtifactError(f"mask of {groups[name].kind} group {name}: shape "
                                f"{tuple(mask.shape)}, expected {expected}")
    counts = {mask.shape[0] for mask in masks.values()}
    if len(counts) != 1:
        raise ArtifactError(f"masks disagree on the number of modules: {sorted(counts)}")
    return counts.pop()


def channel_view(mask: torch.Tensor) -> torch.Tensor:
    """Bool (M, C): a channel is kept if any of its positions is active."""
    kept = mask > 0
    return kept.flatten(2).any(dim=2) if kept.dim() > 2 else kept


@contextlib.contextmanager
def masked(model: nn.Module, structure: ModelStructure,
           masks: Mapping[str, torch.Tensor]) -> Iterator[int]:
    """Within the block, ``model`` computes M masked copies of itself on an M-times-repeated
    batch. Masks may be float and carry gradients. Yields M."""
    modules_count = check_masks(structure, masks)
    layers = dict(model.named_modules())
    handles = []

    def hook_for(group_name: str, mask: torch.Tensor, offset: int):
        def apply(layer, _inputs, output: torch.Tensor) -> torch.Tensor:
            if mask.dim() > 2 and tuple(output.shape[1:]) != tuple(mask.shape[1:]):
                raise ArtifactError(
                    f"position mask of group {group_name} is for outputs "
                    f"{tuple(mask.shape[1:])}, but {type(layer).__name__} produced "
                    f"{tuple(output.shape[1:])} (an input size other than the traced one?)")
            layer_mask = mask
            if output.shape[1] != mask.shape[1]:
                # A norm over a concatenation: the group's channel mask covers its slice only
                # (groups read by such norms take channel masks only).
                layer_mask = torch.cat([
                    mask.new_ones(modules_count, offset), mask,
                    mask.new_ones(modules_count, output.shape[1] - offset - mask.shape[1]),
                ], dim=1)
            batch = output.shape[0] // modules_count
            # (M, 1, C, [H, W], 1...): broadcast over the batch and any dimension not masked.
            shaped = layer_mask.to(output.dtype).view(
                modules_count, 1, *layer_mask.shape[1:],
                *([1] * (output.dim() - layer_mask.dim())))
            return (output.view(modules_count, batch, *output.shape[1:]) * shaped).view_as(output)
        return apply

    try:
        for group in structure.groups:
            if group.name not in masks:
                continue
            mask = masks[group.name]
            for name in group.convs:
                handles.append(layers[name].register_forward_hook(hook_for(group.name, mask, 0)))
            for name, offset in zip(group.norms, group.norm_offsets, strict=True):
                handles.append(layers[name].register_forward_hook(
                    hook_for(group.name, mask, offset)))
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
    """Number of kept channels per module over the given masks (a channel with any active
    position counts), shape (M,). Pass conv-group masks to count kernels."""
    return sum(channel_view(mask).sum(dim=1) for mask in masks.values())


def ensure_nonempty(masks: Mapping[str, torch.Tensor],
                    importance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool masks where no module ends with an empty group, as GradSplitter prescribes.

    A group is empty for a module when no channel (no position, for a position mask) is kept;
    it then keeps its most important channel whole. ``importance`` has the shapes of ``masks``;
    a channel's importance in a position mask is the sum over its positions.
    """
    fixed = {}
    for name, mask in masks.items():
        binary = mask > 0
        empty = ~binary.flatten(1).any(dim=1)
        if empty.any():
            scores = importance[name]
            best = (scores.flatten(2).sum(dim=2) if scores.dim() > 2 else scores).argmax(dim=1)
            binary = binary.clone()
            binary[empty, best[empty]] = True
        fixed[name] = binary
    return fixed

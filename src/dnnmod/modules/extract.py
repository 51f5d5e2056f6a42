"""Physical extraction: turn a module's masks into a standalone, smaller network.

A module keeps a subset of each group's channels or units, possibly down to single output
positions (see :mod:`dnnmod.modules.masking`). :func:`extract_module` removes from a copy of the
base model what can be removed physically, with Torch-Pruning's dependency graph:

- whole conv channels that are dropped, or inactive at every position of a position mask;
- whole hidden Linear units that are dropped.

The dependency graph also trims everything that reads them: BatchNorm tensors, the coupled
layers of residual additions and concatenations, depthwise convs, the next layers' input
channels and the first Linear layer's input columns. What cannot be removed, the inactive
positions of channels that stay, is kept as a :class:`PositionMask` buffer attached to each of
the group's producer layers and norms, applied by a forward hook (:func:`apply_position_mask`,
a plain function, so deep copies, state dicts, ``.to()`` and :class:`FusedModules` carry it).
The result computes what the masked base model computes
(:func:`dnnmod.modules.masking.masked_logits`): a dropped channel is zero wherever a later layer
reads it there, and absent here; an inactive position is zero in both.

To run many modules as one network, :func:`pad_and_extract` extracts them at a common shape
(padding channels that output exactly zero) and :class:`FusedModules` runs them together with
``torch.func.vmap``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from dnnmod.errors import ArtifactError
from dnnmod.modules.masking import channel_view, check_masks
from dnnmod.modules.structure import ModelStructure, eval_mode

#: attribute name of the :class:`PositionMask` on a producer layer of an extracted module
POSITION_MASK = "position_mask"
_PRUNE_OUT_CHANNELS = {"conv": tp.prune_conv_out_channels,
                       "linear": tp.prune_linear_out_channels}


class PositionMask(nn.Module):
    """The active output positions (C, H, W) of one layer of an extracted module."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return output * self.mask.to(output.dtype)


def apply_position_mask(layer: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: ``layer``'s output times its :class:`PositionMask`."""
    return getattr(layer, POSITION_MASK)(output)


def check_keep(structure: ModelStructure,
               keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate ``keep`` (group name → one module's mask: (C,) kept channels or units, or
    (C, H, W) active positions; absent groups are kept whole) and return it as bool tensors
    on the CPU. Raises :class:`ArtifactError` on wrong names or shapes, or on a group that
    keeps nothing (a network cannot have an empty layer)."""
    checked = {name: torch.as_tensor(mask).detach().cpu() for name, mask in keep.items()}
    check_masks(structure, {name: mask[None] for name, mask in checked.items()})
    checked = {name: mask.bool() for name, mask in checked.items()}
    for name, mask in checked.items():
        if not mask.any():
            raise ArtifactError(f"group {name} keeps no channel; a module needs at least one")
    return checked


def extract_module(model: nn.Module, structure: ModelStructure,
                   keep: Mapping[str, torch.Tensor],
                   input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A new network: ``model`` without what ``keep`` drops, in eval mode.

    Args:
        model: the base model; it is copied and left untouched.
        structure: the base model's channel groups.
        keep: group name → (C,) bool vector of kept channels or units, or (C, H, W) bool
            active positions (conv groups with a traced spatial shape); every group listed
            keeps something, groups not listed are kept whole.
        input_shape: example input shape for tracing; defaults to ``structure.input_shape``.

    Returns:
        A module with the base model's output size whose eval-mode outputs equal the masked
        base model's, ``masked_logits(model, structure, {g: keep[g][None]}, x)[0]``.
    """
    checked = check_keep(structure, keep)
    channels = {name: channel_view(mask[None])[0] for name, mask in checked.items()}
    module = copy.deepcopy(model).eval()
    _prune(module, structure, channels, input_shape)
    remaining = {name: mask[channels[name]] for name, mask in checked.items() if mask.dim() > 1}
    _attach_position_masks(module, structure, {name: mask for name, mask in remaining.items()
                                               if not mask.all()})
    return module


def _prune(module: nn.Module, structure: ModelStructure, channels: Mapping[str, torch.Tensor],
           input_shape: tuple[int, ...] | None) -> None:
    """Keep only the channels (units) ``channels`` marks per group in ``module`` (a copy of
    the base model in eval mode), in place."""
    layers = dict(module.named_modules())
    reference = next(module.parameters(), None)
    example = torch.randn(
        tuple(input_shape or structure.input_shape),
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None else None,
    )
    # The dependency graph traces autograd's graph: gradients stay enabled, and an input that
    # requires grad keeps the graph even when every weight is frozen.
    example.requires_grad_(True)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(module, example, verbose=False)
    # Pruning replaces parameters with new trainable ones; a frozen base stays frozen.
    trainable = {name: parameter.requires_grad for name, parameter in module.named_parameters()}
    for group in structure.groups:
        if group.name not in channels:
            continue
        dropped = (~channels[group.name]).nonzero().flatten().tolist()
        if dropped:
            graph.get_pruning_group(layers[group.name], _PRUNE_OUT_CHANNELS[group.kind],
                                    dropped).prune()
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(trainable[name])


def _attach_position_masks(module: nn.Module, structure: ModelStructure,
                           masks: Mapping[str, torch.Tensor]) -> None:
    """Give every producer layer and norm of each group in ``masks`` (group name → (C', H, W)
    over the channels left in ``module``) its position mask."""
    layers = dict(module.named_modules())
    device = next(module.parameters()).device
    for group in structure.groups:
        if group.name not in masks:
            continue
        for name in (*group.convs, *group.norms):
            layer = layers[name]
            # One tensor per layer: tensors shared between modules are listed once by
            # named_buffers, so FusedModules would not substitute the others.
            layer.add_module(POSITION_MASK,
                             PositionMask(masks[group.name].to(device, copy=True)))
            layer.register_forward_hook(apply_position_mask)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    return sum(parameter.numel() for parameter in module.parameters())


#: the layers that do multiply-accumulate work, as torch.utils.flop_counter counts them
_MAC_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def layer_flops(module: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """FLOPs of one eval-mode forward pass of one input, per layer (dotted name; a layer run
    twice counts twice), for the layers that do multiply-accumulate work.

    Counted as :class:`torch.utils.flop_counter.FlopCounterMode` counts them, two per
    multiply-accumulate: a convolution (transposed ones too), ``2 · out positions · C_out ·
    C_in / groups · kernel size`` per image, a Linear layer ``2 · in · out`` per output row;
    biases, norms, activations and pooling count nothing. Read from the shapes a forward pass
    produces, by hooks, because FlopCounterMode's dispatch imports ``torch._dynamo``, about
    1.5 s of every job that counts. ``input_shape`` is a full model input shape, such as
    ``ModelStructure.input_shape``; its batch dimension is replaced by 1.
    """
    counts: dict[str, int] = {}

    def count(name: str, layer: nn.Module, inputs, output: torch.Tensor) -> None:
        if isinstance(layer, nn.Linear):
            flops = 2 * output.numel() * layer.in_features
        else:  # a transposed conv does its work at the input's positions
            positions = (inputs[0] if layer.transposed else output)[0, 0].numel()
            flops = 2 * positions * layer.weight.shape[:2].numel() * \
                layer.weight.shape[2:].numel() * output.shape[0]
        counts[name] = counts.get(name, 0) + flops

    reference = next(module.parameters(), None)
    x = torch.zeros((1, *input_shape[1:]),
                    device=reference.device if reference is not None else None,
                    dtype=reference.dtype if reference is not None else None)
    hooks = [layer.register_forward_hook(lambda layer, i, o, name=name: count(name, layer, i, o))
             for name, layer in module.named_modules() if isinstance(layer, _MAC_LAYERS)]
    try:
        with eval_mode(module), torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one eval-mode forward pass of one input (:func:`layer_flops`, summed)."""
    return sum(layer_flops(module, input_shape).values())


def pad_and_extract(model: nn.Module, structure: ModelStructure,
                    keeps: Sequence[Mapping[str, torch.Tensor]]) -> list[nn.Module]:
    """Extract every module of ``keeps`` (masks as for :func:`extract_module`) at one common
    shape, for :class:`FusedModules`.

    Per group, every module gets as many channels (units) as the module that keeps most: its
    own kept channels plus padding channels taken from its dropped ones (lowest indices
    first). Padding channels are neutralised (the weights and biases of their producer layers
    and their BatchNorm affine parameters set to zero, in a norm over a concatenation those
    of the group's slice), so they output exactly zero, as a dropped
    channel does in the masked model, and each module still computes what
    :func:`extract_module` would give it. Where any module has a position mask for a group,
    every module gets one there (all positions of its kept channels active for a channel
    mask, none of its padding channels), so the modules' tensors keep one shape.
    """
    checked = [check_keep(structure, keep) for keep in keeps]
    if not checked:
        raise ArtifactError("no modules to extract")
    groups = [group for group in structure.groups if any(group.name in k for k in checked)]
    # A module that leaves a group unmasked, where another masks it, keeps it whole.
    masks = [{group.name: keep.get(group.name, torch.ones(group.size, dtype=torch.bool))
              for group in groups} for keep in checked]
    channels = [{name: channel_view(mask[None])[0] for name, mask in keep.items()}
                for keep in masks]
    padded = {group.name: padded_channels([own[group.name] for own in channels])
              for group in groups}
    positional = {name for keep in masks for name, mask in keep.items() if mask.dim() > 1}
    modules = []
    for index, (keep, own_channels) in enumerate(zip(masks, channels, strict=True)):
        module_channels, paddings, position_masks = {}, {}, {}
        for group in groups:
            kept = padded[group.name][index]
            module_channels[group.name] = kept
            paddings[group.name] = (kept & ~own_channels[group.name]).nonzero().flatten()
            if group.name in positional:
                mask = keep[group.name]
                positions = mask if mask.dim() > 1 else mask[:, None, None].expand(group.shape)
                # Padding channels are dropped ones, inactive at every position.
                position_masks[group.name] = positions[kept]
        module = copy.deepcopy(model).eval()
        # Neutralised before pruning, at the base model's channel indices: pruning keeps the
        # values of the channels that stay.
        _neutralise(module, structure, paddings)
        _prune(module, structure, module_channels, None)
        _attach_position_masks(module, structure, position_masks)
        modules.append(module)
    return modules


def padded_channels(channels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The channels :func:`pad_and_extract` extracts from one group for each module: its
    kept channels (``channels``, one bool (C,) vector per module) plus as many of its dropped
    ones, lowest indices first, as the module keeping most keeps."""
    width = max(int(own.sum()) for own in channels)
    padded = []
    for own in channels:
        kept = own.clone()
        kept[(~own).nonzero().flatten()[: width - int(own.sum())]] = True
        padded.append(kept)
    return padded


@torch.no_grad()
def _neutralise(module: nn.Module, structure: ModelStructure,
                channels: Mapping[str, torch.Tensor]) -> None:
    """Zero the weights and biases of ``channels`` (group name → channel indices of the
    unpruned ``module``) in every producer layer and norm of their groups, and the norms'
    running means, so that a norm without affine parameters outputs zero there too."""
    layers = dict(module.named_modules())
    for group in structure.groups:
        indices = channels.get(group.name)
        if indices is None or indices.numel() == 0:
            continue
        offsets = (0,) * len(group.convs) + group.norm_offsets
        for name, offset in zip((*group.convs, *group.norms), offsets, strict=True):
            layer = layers[name]
            for tensor in (layer.weight, layer.bias, getattr(layer, "running_mean", None)):
                if tensor is not None:
                    tensor[(indices + offset).to(tensor.device)] = 0


class FusedModules(nn.Module):
    """M same-shaped modules (from :func:`pad_and_extract`) run as one network.

    Their parameters and buffers are stacked along a new leading dimension and one
    ``torch.func.vmap`` over ``torch.func.functional_call`` runs all modules on the same input
    batch, so each conv runs once as a grouped conv instead of M times. Inference only:
    the modules always use eval semantics (BatchNorm running statistics, no dropout).

    ``forward(x)`` returns (M, batch, num_classes); ``forward(x, per_module=True)`` takes one
    input per module, x of shape (M, batch, ...).
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        if not modules:
            raise ArtifactError("FusedModules needs at least one module")
        shapes = [{name: tuple(t.shape) for name, t in module.state_dict().items()}
                  for module in modules]
        if any(shape != shapes[0] for shape in shapes[1:]):
            raise ArtifactError("FusedModules needs modules of identical parameter shapes; "
                                "extract them with pad_and_extract")
        parameters, buffers = torch.func.stack_module_state([m.eval() for m in modules])
        # The skeleton only provides the forward code: functional_call substitutes every
        # tensor, so it lives on the meta device and is kept out of the module tree (moving
        # or training the fused module must not touch it).
        self._skeleton = (copy.deepcopy(modules[0]).to("meta").eval(),)
        self._parameter_names = tuple(parameters)
        self._buffer_names = tuple(buffers)
        # Stacked tensors are registered as buffers so ``.to(device)`` moves them; indexed
        # names because buffer names cannot contain dots.
        for index, name in enumerate(self._parameter_names):
            self.register_buffer(f"parameter_{index}", parameters[name].detach())
        for index, name in enumerate(self._buffer_names):
            self.register_buffer(f"buffer_{index}", buffers[name])
        self.modules_count = len(modules)
        self.train(False)

    def train(self, mode: bool = True) -> FusedModules:
        if mode:
            raise RuntimeError("FusedModules runs modules for inference only (eval mode)")
        return super().train(False)

    def forward(self, x: torch.Tensor, per_module: bool = False) -> torch.Tensor:
        parameters = {name: getattr(self, f"parameter_{index}")
                      for index, name in enumerate(self._parameter_names)}
        buffers = {name: getattr(self, f"buffer_{index}")
                   for index, name in enumerate(self._buffer_names)}
        skeleton = self._skeleton[0]

        def run(module_parameters, module_buffers, inputs):
            return torch.func.functional_call(skeleton, (module_parameters, module_buffers),
                                              (inputs,))

        return torch.func.vmap(run, in_dims=(0, 0, 0 if per_module else None))(
            parameters, buffers, x)

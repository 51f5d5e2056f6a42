"""Physical extraction: turn a module's kernel sets into a standalone, smaller network.

A module keeps a subset of each channel group's kernels (see :mod:`dnnmod.modules.structure`).
:func:`extract_module` removes the other channels from a copy of the base model with
Torch-Pruning's dependency graph, which also trims everything that reads them: BatchNorm
tensors, the coupled convs of residual additions and concatenations, depthwise convs, the next
layers' input channels and the first Linear layer's input columns. The result computes what
the masked base model computes (:func:`dnnmod.modules.masking.masked_logits`): a dropped channel is
zero wherever a later layer reads it there, and absent here.

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
from torch.utils.flop_counter import FlopCounterMode

from dnnmod.errors import ArtifactError
from dnnmod.modules.masking import check_masks
from dnnmod.modules.structure import ModelStructure


def check_keep(structure: ModelStructure,
               keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate ``keep`` (group name → (size,) vector of kept channels) and return it as bool
    vectors on the CPU. Raises :class:`ArtifactError` on wrong names or sizes, or on a group
    that keeps no channel (a network cannot have an empty layer)."""
    vectors = {name: torch.as_tensor(vector).detach().cpu() for name, vector in keep.items()}
    for name, vector in vectors.items():
        if vector.dim() != 1:
            raise ArtifactError(f"kept channels of group {name}: shape {tuple(vector.shape)}, "
                                "expected a vector")
    check_masks(structure, {name: vector[None] for name, vector in vectors.items()})
    checked = {name: vector.bool() for name, vector in vectors.items()}
    for name, vector in checked.items():
        if not vector.any():
            raise ArtifactError(f"group {name} keeps no channel; a module needs at least one")
    return checked


def extract_module(model: nn.Module, structure: ModelStructure,
                   keep: Mapping[str, torch.Tensor],
                   input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A new network: ``model`` without the channels that ``keep`` drops, in eval mode.

    Args:
        model: the base model; it is copied and left untouched.
        structure: the base model's channel groups.
        keep: group name → bool vector (size,) of kept channels; every group keeps >= 1.
        input_shape: example input shape for tracing; defaults to ``structure.input_shape``.

    Returns:
        A module with the base model's output size whose eval-mode outputs equal the masked
        base model's, ``masked_logits(model, structure, {g: keep[g][None]}, x)[0]``.
    """
    return _pruned_copy(model, structure, check_keep(structure, keep), input_shape)


def _pruned_copy(model: nn.Module, structure: ModelStructure, keep: Mapping[str, torch.Tensor],
                 input_shape: tuple[int, ...] | None) -> nn.Module:
    module = copy.deepcopy(model).eval()
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
        dropped = (~keep[group.name]).nonzero().flatten().tolist()
        if dropped:
            graph.get_pruning_group(layers[group.name], tp.prune_conv_out_channels,
                                    dropped).prune()
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(trainable[name])
    return module.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    return sum(parameter.numel() for parameter in module.parameters())


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one eval-mode forward pass of one input.

    ``input_shape`` is a full model input shape, such as ``ModelStructure.input_shape``; its
    batch dimension is replaced by 1.
    """
    reference = next(module.parameters(), None)
    x = torch.zeros((1, *input_shape[1:]),
                    device=reference.device if reference is not None else None,
                    dtype=reference.dtype if reference is not None else None)
    training = module.training
    module.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(x)
    finally:
        module.train(training)
    return counter.get_total_flops()


def pad_and_extract(model: nn.Module, structure: ModelStructure,
                    keeps: Sequence[Mapping[str, torch.Tensor]]) -> list[nn.Module]:
    """Extract every module of ``keeps`` at one common shape, for :class:`FusedModules`.

    Per group, every module gets as many channels as the module that keeps most: its own kept
    channels plus padding channels taken from its dropped ones (lowest indices first). Padding
    channels are neutralised (their conv kernels, conv biases and BatchNorm affine parameters
    set to zero), so they output exactly zero, as a dropped channel does in the masked model,
    and each module still computes what :func:`extract_module` would give it.
    """
    checked = [check_keep(structure, keep) for keep in keeps]
    if not checked:
        raise ArtifactError("no modules to extract")
    widths = {group.name: max(int(keep[group.name].sum()) for keep in checked)
              for group in structure.groups}
    modules = []
    for keep in checked:
        padded_keep, padding_positions = {}, {}
        for group in structure.groups:
            own = keep[group.name]
            padding = (~own).nonzero().flatten()[: widths[group.name] - int(own.sum())]
            padded = own.clone()
            padded[padding] = True
            padded_keep[group.name] = padded
            # Torch-Pruning keeps the remaining channels in order, so a channel's position in
            # the pruned layer is its rank among the channels that stay.
            rank = padded.long().cumsum(0) - 1
            padding_positions[group.name] = rank[padding]
        module = _pruned_copy(model, structure, padded_keep, None)
        _neutralise(module, structure, padding_positions)
        modules.append(module)
    return modules


@torch.no_grad()
def _neutralise(module: nn.Module, structure: ModelStructure,
                positions: Mapping[str, torch.Tensor]) -> None:
    layers = dict(module.named_modules())
    for group in structure.groups:
        channels = positions[group.name]
        if channels.numel() == 0:
            continue
        for name in (*group.convs, *group.norms):
            layer = layers[name]
            for tensor in (layer.weight, layer.bias):
                if tensor is not None:
                    tensor[channels.to(tensor.device)] = 0


class FusedModules(nn.Module):
    """M same-shaped modules (from :func:`pad_and_extract`) run as one network.

    Their parameters and buffers are stacked along a new leading dimension and one
    ``torch.func.vmap`` over ``torch.func.functional_call`` runs all modules on the same input
    batch, so each conv runs once as a grouped conv instead of M times. Inference only:
    the modules always use eval semantics (BatchNorm running statistics, no dropout).

    ``forward(x)`` returns (M, batch, num_classes).
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parameters = {name: getattr(self, f"parameter_{index}")
                      for index, name in enumerate(self._parameter_names)}
        buffers = {name: getattr(self, f"buffer_{index}")
                   for index, name in enumerate(self._buffer_names)}
        skeleton = self._skeleton[0]

        def run(module_parameters, module_buffers, inputs):
            return torch.func.functional_call(skeleton, (module_parameters, module_buffers),
                                              (inputs,))

        return torch.func.vmap(run, in_dims=(0, 0, None))(parameters, buffers, x)

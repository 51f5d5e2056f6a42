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

That pass computes every dropped channel, only to zero it. :class:`KeptChannelPass` runs each
module as its kept-channel sub-network instead (about r² of the multiplications for a module
keeping a fraction r of its channels), with the same logits (it checks itself) but no mask
gradients: module scoring, CNNSplitter's search and GradSplitter's head phases and validation
use it on a CPU, GradSplitter's mask steps the masked pass.

GradSplitter's authors mask elsewhere: once per layer, on the output of the ReLU that follows
each conv + BatchNorm (before pooling and before a residual addition). :func:`masked`'s
``sites`` places the masks there. For binary masks the forward pass zeroes the same channels
wherever the group's values are read only through its ReLUs (:func:`check_sites_cover`), but
the mask gradients differ: at a ReLU's output a dropped channel's mask still gets Σ g·relu(z),
so a learned mask can bring it back; at the producers and norms it gets none where a ReLU
follows.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.modules.structure import ChannelGroup, ModelStructure, eval_mode, probe


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
def masked(model: nn.Module, structure: ModelStructure, masks: Mapping[str, torch.Tensor],
           sites: Mapping[str, str] | None = None) -> Iterator[int]:
    """Within the block, ``model`` computes M masked copies of itself on an M-times-repeated
    batch. Masks may be float and carry gradients. Yields M.

    ``sites`` (None, or ReLU module name → the group it carries, as
    :func:`~dnnmod.modules.activations.activation_sites` finds them): None masks every
    producer and norm of a group; a mapping masks the output of each of the group's ReLUs
    instead, once per ReLU (GradSplitter's placement)."""
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
        if sites is not None:
            uncovered = sorted(set(masks) - set(sites.values()))
            if uncovered:
                raise ArtifactError(f"no ReLU carries group(s) {uncovered[:5]}: masks at "
                                    f"activation sites need one per masked group")
            for name, group_name in sites.items():
                if group_name in masks:
                    handles.append(layers[name].register_forward_hook(
                        hook_for(group_name, masks[group_name], 0)))
        else:
            for group in structure.groups:
                if group.name not in masks:
                    continue
                mask = masks[group.name]
                for name in group.convs:
                    handles.append(layers[name].register_forward_hook(
                        hook_for(group.name, mask, 0)))
                for name, offset in zip(group.norms, group.norm_offsets, strict=True):
                    handles.append(layers[name].register_forward_hook(
                        hook_for(group.name, mask, offset)))
        yield modules_count
    finally:
        for handle in handles:
            handle.remove()


def masked_logits(model: nn.Module, structure: ModelStructure,
                  masks: Mapping[str, torch.Tensor], x: torch.Tensor,
                  sites: Mapping[str, str] | None = None) -> torch.Tensor:
    """Base-model outputs of every module on ``x``: shape (M, batch, num_classes); ``sites``
    as in :func:`masked`."""
    with masked(model, structure, masks, sites) as modules_count:
        out = model(x.repeat(modules_count, *([1] * (x.dim() - 1))))
    return out.view(modules_count, x.shape[0], *out.shape[1:])


def check_sites_cover(model: nn.Module, structure: ModelStructure, sites: Mapping[str, str],
                      groups: list[str]) -> None:
    """Raise a ConfigError unless binary channel masks of ``groups`` placed at ``sites`` (see
    :func:`masked`) give the logits of the same masks at the producers and norms: that is,
    unless every layer reads those groups' channels only through their ReLUs. Probed on two
    random inputs with a random half of each group's channels dropped."""
    uncovered = [name for name in groups if name not in set(sites.values())]
    if uncovered:
        raise ConfigError(f"{type(model).__name__}: no nn.ReLU follows the group(s) "
                          f"{uncovered[:5]}, so their masks have no activation site")
    generator = torch.Generator().manual_seed(0)
    reference = next(model.parameters())
    sizes = {group.name: group.size for group in structure.groups}
    masks = {name: (torch.rand(1, sizes[name], generator=generator) < 0.5).to(reference)
             for name in groups}
    x = torch.randn((2, *structure.input_shape[1:]), generator=generator).to(reference)
    with torch.no_grad(), eval_mode(model):
        at_outputs = masked_logits(model, structure, masks, x)
        at_sites = masked_logits(model, structure, masks, x, sites)
    if not torch.allclose(at_sites, at_outputs, rtol=1e-5,
                          atol=1e-5 * float(at_outputs.abs().max())):
        raise ConfigError(f"{type(model).__name__} reads the channels of some of the groups "
                          f"{groups[:5]} other than through their ReLUs, so masks at the ReLUs "
                          f"do not compute the module that extraction keeps")


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



#: tensors of a layer indexed by its output channels (units) and by its input channels
_OUT_TENSORS = ("weight", "bias", "running_mean", "running_var")
_IN_TENSORS = ("weight",)
_BATCH_NORM = nn.modules.batchnorm._BatchNorm


class KeptChannelPass:
    """M masked modules of a frozen model, run one at a time as kept-channel sub-networks.

    Each layer reads only the channels its module keeps and produces only those, so a module
    keeping a fraction r of every group costs about r² of the masked model's multiplications.
    A BatchNorm that reads a conv's output directly is folded into that conv (eval mode: an
    affine map per channel), and conv weights are channels-last, which oneDNN runs faster on
    a CPU. It computes logits only, no mask gradients: a dropped channel is not computed, so
    nothing could give its mask a gradient (GradSplitter's mask steps take the masked pass).

    The logits equal the masked model's (:func:`masked_logits`) within float tolerance.
    :meth:`build` checks this by a float64 probe against the masked model and returns None
    where they differ or where a sub-network cannot be sliced (grouped convs, norms over
    concatenations, flattened feature maps); callers then use :func:`masked_logits`, as for
    position masks, which this pass does not take.
    """

    def __init__(self, model: nn.Module, structure: ModelStructure,
                 slicing: dict[tuple[str, int], list[tuple[str, list[int]]]]) -> None:
        self.structure, self.masked_model = structure, model
        self.groups = {group for readers in slicing.values() for group, _ in readers}
        self.model = copy.deepcopy(model).eval()  # its BatchNorms are folded away below
        folded = batch_norm_folding(self.model, structure)
        self.base = {name: _layout(name, tensor.detach()) for name, tensor in
                     (*self.model.named_parameters(), *self.model.named_buffers())}
        self.base.update(folded.tensors)
        # (tensor name, dim) → [(group, index of each group channel)], for tensors still there
        self.slicing = {key: readers for key, readers in slicing.items() if key[0] in self.base}
        for conv in {name.rpartition(".")[0] for name in folded.tensors}:
            # a folding conv's bias follows its output channels
            if (f"{conv}.weight", 0) in slicing:
                self.slicing[(f"{conv}.bias", 0)] = slicing[(f"{conv}.weight", 0)]
        self._sliced: dict[int, tuple[bytes, dict[str, torch.Tensor]]] = {}

    @classmethod
    def build(cls, model: nn.Module, structure: ModelStructure,
              groups: list[str] | None = None) -> KeptChannelPass | None:
        """The pass for channel masks of ``groups`` (default: all), or None where the model
        does not allow it (see the class docstring)."""
        slicing = _slicing_plan(model, structure, groups)
        if slicing is None:
            return None
        # The probe runs in float64, so that float32 rounding is not mistaken for a difference.
        probe = cls(copy.deepcopy(model).double(), structure, slicing)
        if not probe._agrees_with_masked_model(groups):
            return None
        return cls(model, structure, slicing)

    def _parameters(self, module: int, kept: Mapping[str, torch.Tensor]) -> dict:
        """The model's tensors sliced to ``module``'s kept channels (cached while they stay)."""
        key = b"".join(kept[name].cpu().numpy().tobytes() for name in sorted(kept))
        cached = self._sliced.get(module)
        if cached is not None and cached[0] == key:
            return cached[1]
        tensors = dict(self.base)
        for (name, dim), readers in self.slicing.items():
            keep = torch.ones(tensors[name].shape[dim], dtype=torch.bool,
                              device=tensors[name].device)
            for group, index in readers:
                if group in kept:  # a group without masks is kept whole
                    keep[index] = keep[index] & kept[group]
            if not keep.all():
                tensors[name] = _layout(name, tensors[name].index_select(
                    dim, keep.nonzero().flatten()))
        self._sliced[module] = (key, tensors)
        return tensors

    def logits(self, masks: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Base-model outputs of every module on ``x``, shape (M, batch, num_classes), for
        binary channel masks (group name → (M, C), 1 kept, 0 dropped)."""
        modules_count = check_masks(self.structure, masks)
        unsliced = sorted(set(masks) - self.groups)
        if unsliced:
            raise ValueError(f"masks of groups {unsliced[:5]}, which this pass was not built "
                             f"for (built for {sorted(self.groups)[:5]})")
        if any(mask.dim() != 2 for mask in masks.values()):
            raise ValueError("a kept-channel pass takes channel masks (M, C), not position "
                             "masks")
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        outputs = []
        for module in range(modules_count):
            kept = {name: mask[module] > 0 for name, mask in masks.items()}
            if not all(keep.any() for keep in kept.values()):
                # An empty group leaves nothing to slice: this module runs masked.
                outputs.append(masked_logits(self.masked_model, self.structure, {
                    name: mask[module:module + 1] for name, mask in masks.items()}, x)[0])
                continue
            outputs.append(torch.func.functional_call(
                self.model, self._parameters(module, kept), (x,)))
        return torch.stack(outputs)

    def _agrees_with_masked_model(self, groups: list[str] | None) -> bool:
        """Whether the logits of a probe (2 random inputs, a random half of each group's
        channels dropped) match the masked model's."""
        model = self.masked_model
        names = groups or [group.name for group in self.structure.groups]
        sizes = {group.name: group.size for group in self.structure.groups}
        generator = torch.Generator().manual_seed(0)
        reference = next(model.parameters())
        x = torch.randn((2, *self.structure.input_shape[1:]), generator=generator).to(reference)
        masks = {}
        for name in names:
            mask = (torch.rand(1, sizes[name], generator=generator) < 0.5).double()
            mask[0, 0] = 1.0
            masks[name] = mask.to(reference.device)
        with torch.no_grad():
            dense = masked_logits(model, self.structure, masks, x)
            sliced = self.logits(masks, x)
        return torch.allclose(dense, sliced, rtol=1e-9, atol=1e-9 * dense.abs().max())


def _layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Conv weights channels-last; other tensors as they are."""
    if name.endswith("weight") and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


@dataclass
class BatchNormFolding:
    """What :func:`batch_norm_folding` folded: the convs' new tensors, for the caller to use."""

    tensors: dict[str, torch.Tensor]  # the folding convs' new weights and biases
    norms: set[str]  # the folded norms, now nn.Identity


def batch_norm_folding(model: nn.Module, structure: ModelStructure) -> BatchNormFolding:
    """Fold every eval-mode BatchNorm of a group that reads the output of a conv of the same
    group directly (found by a traced pass) into that conv: the norm becomes Identity in
    ``model`` and the conv's folded tensors, weight a·W and bias a·b + shift (a = γ/√(var + ε),
    shift = β − a·mean), are returned for the caller to write or use (a conv without a bias
    gets a zero one to hold it)."""
    layers = dict(model.named_modules())
    group_of_norm = {norm: group for group in structure.groups for norm in group.norms}
    produced: dict[int, str] = {}
    outputs: list[torch.Tensor] = []  # alive until the pass ends, so ids stay unique
    pairs: dict[str, str] = {}  # norm → conv

    def record(name: str):
        def hook(_layer, _inputs, output):
            outputs.append(output)
            produced[id(output)] = name
        return hook

    def match(name: str):
        def hook(_layer, inputs):
            conv = produced.get(id(inputs[0]))
            if conv is not None and conv in group_of_norm[name].convs:
                pairs.setdefault(name, conv)
        return hook

    handles = [layers[name].register_forward_hook(record(name)) for group in structure.groups
               for name in group.convs if isinstance(layers[name], nn.Conv2d)]
    handles += [layers[name].register_forward_pre_hook(match(name)) for name in group_of_norm
                if isinstance(layers[name], _BATCH_NORM)
                and layers[name].running_mean is not None]
    probe(model, structure.input_shape, handles)
    convs = [conv for conv in pairs.values()]
    pairs = {norm: conv for norm, conv in pairs.items() if convs.count(conv) == 1}
    folded = BatchNormFolding({}, set())
    for norm_name, conv_name in pairs.items():
        norm, conv = layers[norm_name], layers[conv_name]
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -scale * norm.running_mean
            if norm.bias is not None:
                shift = shift + norm.bias
            bias = shift if conv.bias is None else scale * conv.bias + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros_like(bias), requires_grad=False)
        folded.tensors[f"{conv_name}.weight"] = _layout(
            "weight", conv.weight.detach() * scale.view(-1, 1, 1, 1))
        folded.tensors[f"{conv_name}.bias"] = bias.detach()
        folded.norms.add(norm_name)
        parent, _, child = norm_name.rpartition(".")
        setattr(layers[parent] if parent else model, child, nn.Identity())
    return folded


def _slicing_plan(model: nn.Module, structure: ModelStructure, groups: list[str] | None
                  ) -> dict[tuple[str, int], list[tuple[str, list[int]]]] | None:
    """For every tensor dimension indexed by a group's channels: the group and the index of
    each of its channels there, read off Torch-Pruning's dependency graph; None where a
    sub-network cannot be sliced this way."""
    import torch_pruning as tp

    chosen = [group for group in structure.groups if groups is None or group.name in groups]
    layers = dict(model.named_modules())
    if any(layers[norm].num_features != group.size for group in chosen for norm in group.norms):
        return None  # a norm over a concatenation: its output is more than the group's
    names = {layer: name for name, layer in layers.items()}
    if any(isinstance(layer, nn.Conv2d) and layer.groups > 1 for layer in layers.values()):
        return None
    reference = next(model.parameters())
    example = torch.randn(tuple(structure.input_shape), device=reference.device,
                          dtype=reference.dtype, requires_grad=True)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example, verbose=False)
    pruning = {"conv": tp.prune_conv_out_channels, "linear": tp.prune_linear_out_channels}
    plan: dict[tuple[str, int], list[tuple[str, list[int]]]] = {}
    for group in chosen:
        for dependency, indices in graph.get_pruning_group(
                layers[group.name], pruning[group.kind], list(range(group.size))):
            layer = dependency.target.module
            if layer not in names or not isinstance(layer, (nn.Conv2d, nn.Linear, _BATCH_NORM)):
                continue  # Torch-Pruning's own nodes (additions, reshapes): nothing to slice
            indices = [int(index) for index in indices]
            if len(indices) != group.size:
                return None  # a flattened feature map: several inputs per channel
            out = graph.is_out_channel_pruning_fn(dependency.handler)
            for tensor in (_OUT_TENSORS if out else _IN_TENSORS):
                if getattr(layer, tensor, None) is not None:
                    key = (f"{names[layer]}.{tensor}", 0 if out else 1)
                    if (group.name, indices) not in plan.setdefault(key, []):
                        plan[key].append((group.name, indices))
    return plan

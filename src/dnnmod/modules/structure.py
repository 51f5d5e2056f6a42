"""The one description of a model's prunable units, derived by tracing a forward pass.

A *channel group* is a set of layers whose outputs must be kept or dropped together, one
channel (or unit) at a time. Two kinds:

- ``conv``: conv layers whose output channels are shared: convs whose outputs meet in a
  residual addition, and depthwise convs, which carry the channels of the conv that feeds them;
- ``linear``: a hidden Linear layer (any Linear the forward pass calls except the logit layer)
  and whatever shares its units, e.g. a BatchNorm1d.

Torch-Pruning's dependency graph finds these couplings, so the description also holds for
models outside the zoo. Each group also records its output shape per image at the traced
input size, which position masks (one flag per channel and spatial position) refer to.

A BatchNorm that reads a concatenation normalises the channels of several groups: each of
them records the slice of the norm's channels that is its own (``norm_offsets``).

Tracing refuses, with a :class:`~dnnmod.errors.ConfigError` naming the layer, the constructs
whose channels cannot be kept or dropped one at a time with the masked model computing what
the extracted one does: grouped convolutions other than depthwise ones (a pruned group must
keep its channel count divisible by the conv's groups), normalisation layers other than
BatchNorm over channels (GroupNorm, LayerNorm, InstanceNorm, LocalResponseNorm: a dropped
channel changes the statistics of the kept ones, or its zero comes out as the norm's shift),
models that do not return one tensor of logits, and every operation between layers that
channel groups cannot follow (:mod:`dnnmod.modules.channel_flow`): one that slices, splits,
regroups, reduces or mixes channels, combines them with a per-channel tensor no prunable
layer produces, or turns a dropped channel's zero into a value a later layer reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from dnnmod.errors import ArtifactError, ConfigError, UnknownNameError
from dnnmod.modules.channel_flow import ChannelFlow, dropped_channel_hooks

GROUP_KINDS = ("conv", "linear")
_NORM = nn.modules.batchnorm._BatchNorm
#: normalisations whose output channel does not depend on its own input channel alone, or that
#: are not masked with the channels they normalise; tracing refuses them
_UNSUPPORTED_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                      nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels (or units) shared by coupled layers; one kept set for all of them.

    Attributes:
        name: dotted name of the group's first producer layer in forward order.
        size: number of channels (kernels) or units in the group.
        convs: the *producer layers*, every layer whose outputs are the group's channels, in
            forward order: Conv2d layers for a ``conv`` group, Linear layers for a ``linear``
            group (the field keeps its version-1 name).
        norms: the BatchNorm layers on those channels.
        kind: ``conv`` or ``linear``.
        shape: the group's output shape per image: (C, H, W) for a conv group at the traced
            input size, (C,) for a linear group. (C,) also for a conv group whose layers do
            not share one output shape (a strided depthwise conv joining its input's group, a
            norm over a concatenation of several groups) and for groups read from version-1
            files, which did not record shapes: such groups take channel masks only.
        norm_offsets: for each norm of ``norms``, the norm channel that is the group's first:
            the group's channels are the norm's ``offset .. offset + size - 1``. Nonzero only
            for a norm that reads a concatenation; empty (as in files written before offsets
            were recorded) means 0 for every norm.
    """

    name: str
    size: int
    convs: tuple[str, ...]
    norms: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]
    norm_offsets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.norm_offsets:
            object.__setattr__(self, "norm_offsets", (0,) * len(self.norms))
        if len(self.norm_offsets) != len(self.norms):
            raise ArtifactError(f"group {self.name}: {len(self.norm_offsets)} norm offsets for "
                                f"{len(self.norms)} norms")


@dataclass(frozen=True)
class ModelStructure:
    """A model's channel groups, its logit layer and the input shape it was traced with.

    Attributes:
        groups: channel groups in forward order of their first producer layers.
        output_layer: dotted name of the layer producing logits, a Linear or a Conv2d (not
            prunable).
        input_shape: shape of the example input used for tracing.
    """

    groups: tuple[ChannelGroup, ...]
    output_layer: str
    input_shape: tuple[int, ...]

    def group_of(self, layer_name: str) -> ChannelGroup:
        """The group whose channels (or units) the layer ``layer_name`` produces."""
        for group in self.groups:
            if layer_name in group.convs:
                return group
        raise UnknownNameError(
            "prunable layer", layer_name, [layer for group in self.groups for layer in group.convs]
        )

    @property
    def conv_groups(self) -> tuple[ChannelGroup, ...]:
        """The groups of conv channels, in forward order."""
        return tuple(group for group in self.groups if group.kind == "conv")

    @property
    def linear_groups(self) -> tuple[ChannelGroup, ...]:
        """The groups of hidden Linear units, in forward order."""
        return tuple(group for group in self.groups if group.kind == "linear")

    @property
    def total_kernels(self) -> int:
        """Number of prunable conv kernels: the sum of the conv group sizes."""
        return sum(group.size for group in self.conv_groups)

    @property
    def total_units(self) -> int:
        """Number of prunable hidden Linear units: the sum of the linear group sizes."""
        return sum(group.size for group in self.linear_groups)

    def to_json(self) -> dict:
        """A JSON-serialisable dict that :meth:`from_json` reads back."""
        return {
            "groups": [
                {
                    "name": group.name,
                    "kind": group.kind,
                    "size": group.size,
                    "shape": list(group.shape),
                    "convs": list(group.convs),
                    "norms": list(group.norms),
                    "norm_offsets": list(group.norm_offsets),
                }
                for group in self.groups
            ],
            "output_layer": self.output_layer,
            "input_shape": list(self.input_shape),
        }

    @classmethod
    def from_json(cls, data: dict) -> ModelStructure:
        """The structure that :meth:`to_json` wrote; also version-1 structures, whose groups
        have no kind (all conv) and no shape (recorded as (size,): channel masks only)."""
        try:
            groups = tuple(
                ChannelGroup(
                    name=group["name"],
                    size=int(group["size"]),
                    convs=tuple(group["convs"]),
                    norms=tuple(group["norms"]),
                    kind=group.get("kind", "conv"),
                    shape=tuple(int(d) for d in group.get("shape", [group["size"]])),
                    norm_offsets=tuple(int(o) for o in group.get("norm_offsets", ())),
                )
                for group in data["groups"]
            )
            structure = cls(
                groups=groups,
                output_layer=data["output_layer"],
                input_shape=tuple(data["input_shape"]),
            )
        except KeyError as missing:
            raise ArtifactError(f"model structure lacks key {missing.args[0]!r}") from None
        for group in groups:
            if group.kind not in GROUP_KINDS:
                raise ArtifactError(f"group {group.name}: unknown kind {group.kind!r}; known: "
                                    f"{GROUP_KINDS}")
            if group.shape[0] != group.size:
                raise ArtifactError(f"group {group.name}: shape {group.shape} does not start "
                                    f"with its size {group.size}")
        return structure


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode within the block; afterwards every layer gets its own mode back
    (a model may hold layers in another mode than itself, such as a frozen BatchNorm)."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield model.eval()
    finally:
        for module, training in modes.items():
            module.training = training


def probe(model: nn.Module, input_shape: Sequence[int], handles: Sequence = ()) -> None:
    """One forward pass of a zero image (``input_shape`` without its batch size) through
    ``model`` in eval mode without gradients, for the hooks of ``handles``: they are removed
    afterwards, also when the pass fails."""
    reference = next(model.parameters())
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_shape[1:]), device=reference.device,
                              dtype=reference.dtype))
    finally:
        for handle in handles:
            handle.remove()


def trace_structure(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)
) -> ModelStructure:
    """Channel groups of ``model``'s Conv2d layers and hidden Linear layers, found by tracing
    a forward pass of an example input of ``input_shape``.

    The logit layer is ``model.output_layer_name`` where the model declares it, otherwise the
    last ``nn.Linear`` the forward pass calls, or, in a model without Linear layers, the last
    ``nn.Conv2d`` (a conv classifier such as SqueezeNet's, whose logit channels are then pooled).
    Layers the forward pass does not call are not part of any group, nor are Linear layers
    whose outputs are not (batch, features) matrices (their "units" are not a model's hidden
    units) or whose units are coupled to conv channels (they belong to that conv group's
    channels), nor are Linear layers that declare ``forms_group = False`` (auxiliary layers
    such as MwT's mask generators, pruned with the groups they read and feed but holding no
    units of the model). The model's parameters and training modes are left as they were.

    Raises:
        ConfigError: naming the layer and the construct, for a model whose channels cannot
            be grouped (see the module docstring), whose logit layer cannot be told, or whose
            logit layer shares its outputs with prunable layers.
    """
    model_name = type(model).__name__
    names = {module: name for name, module in model.named_modules()}
    forward_order: list[nn.Module] = []
    output_shapes: dict[nn.Module, set[tuple[int, ...]]] = {}

    def record_call(module: nn.Module, inputs, output) -> None:
        if module not in forward_order:
            forward_order.append(module)
        output_shapes.setdefault(module, set()).add(tuple(output.shape[1:]))

    hooks = [
        module.register_forward_hook(record_call)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear, _NORM, *_UNSUPPORTED_NORMS))
    ]
    flow = ChannelFlow(model)
    hooks += flow.hooks(model)
    training_modes = {module: module.training for module in model.modules()}
    reference = next(model.parameters(), None)
    example = torch.randn(
        input_shape,
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None else None,
    )
    try:
        model.eval()
        # Order and shapes come from a plain pass: the dependency graph's own passes include
        # probes with other input layouts.
        try:
            with torch.no_grad(), flow:
                logits = model(example)
        finally:
            for hook in hooks:
                hook.remove()
        if not isinstance(logits, torch.Tensor):
            raise ConfigError(
                f"{model_name}: the forward pass returns a {type(logits).__name__}, not one "
                "tensor of logits; wrap the model so that it returns its logits alone")
        _refuse_unsupported(model_name, names, forward_order)
        output_layer = _output_layer(model, names, forward_order, logits)
        _refuse_unfollowed(model_name, flow, output_layer)
        called_convs = [module for module in forward_order
                        if isinstance(module, nn.Conv2d) and names[module] != output_layer]
        if not called_convs:
            raise ConfigError(f"{model_name}: no prunable conv layers found")
        # The dependency graph traces autograd's graph, so gradients stay enabled (nothing
        # calls backward); an input that requires grad keeps the graph even when all weights
        # are frozen.
        example.requires_grad_(True)
        with torch.enable_grad():
            try:
                graph = tp.DependencyGraph().build_dependency(model, example, verbose=False)
            except Exception as error:  # Torch-Pruning's own failures: a construct it lacks
                raise ConfigError(
                    f"{model_name}: Torch-Pruning cannot trace the model's dependency graph "
                    f"({type(error).__name__}: {error}), so its channels cannot be grouped"
                ) from error
    finally:
        for module, training in training_modes.items():
            module.training = training

    hidden_linears = [
        module for module in forward_order
        if isinstance(module, nn.Linear) and names[module] != output_layer
        and output_shapes[module] == {(module.out_features,)}
        and getattr(module, "forms_group", True)
    ]
    position = {module: index for index, module in enumerate(forward_order)}
    registration_order = {module: index for index, module in enumerate(names)}

    groups: list[tuple[int, ChannelGroup]] = []
    grouped: set[nn.Module] = set()
    # Convs first: a Linear whose units are coupled to conv channels joins (and is pruned
    # with) that conv group instead of forming a linear group.
    for kind, layers, pruning_fn, layer_type in (
        ("conv", called_convs, tp.prune_conv_out_channels, nn.Conv2d),
        ("linear", hidden_linears, tp.prune_linear_out_channels, nn.Linear),
    ):
        for layer in layers:
            if layer in grouped:
                continue
            size = layer.out_channels if kind == "conv" else layer.out_features
            producers, norm_channels = [], {}
            # Every channel, not one: where the group's channels are split among consumers,
            # each consumer is reached only by the channels it reads.
            for dependency, indices in graph.get_pruning_group(layer, pruning_fn,
                                                                list(range(size))):
                member = dependency.target.module
                if not graph.is_out_channel_pruning_fn(dependency.handler):
                    continue
                if names.get(member) == output_layer:
                    raise ConfigError(
                        f"{model_name}: the output layer {output_layer!r} shares its outputs "
                        f"with layer {names[layer]!r} (e.g. a residual addition onto the "
                        "logits); dropping that layer's channels would drop logits")
                grouped.add(member)
                if isinstance(member, layer_type) and member not in producers:
                    producers.append(member)
                elif isinstance(member, _NORM):
                    norm_channels.setdefault(member, []).append([int(i) for i in indices])
            producers.sort(key=position.__getitem__)
            norms = sorted(norm_channels, key=registration_order.__getitem__)
            size = _common_size(model, names, producers)
            shapes = set().union(*(output_shapes.get(m, set()) for m in (*producers, *norms)))
            groups.append((position[producers[0]], ChannelGroup(
                name=names[producers[0]],
                size=size,
                convs=tuple(names[member] for member in producers),
                norms=tuple(names[member] for member in norms),
                kind=kind,
                shape=shapes.pop() if len(shapes) == 1 else (size,),
                norm_offsets=tuple(_slice_offset(model_name, names[norm], names[producers[0]],
                                                 norm_channels[norm], size) for norm in norms),
            )))
    groups.sort(key=lambda entry: entry[0])
    structure = ModelStructure(tuple(group for _, group in groups), output_layer,
                               tuple(input_shape))
    handles, readers = dropped_channel_hooks(
        model, [name for group in structure.groups for name in (*group.convs, *group.norms)],
        flow.readers, {names[member] for member in grouped if member in names})
    probe(model, input_shape, handles)
    if readers:
        raise ConfigError(
            f"{model_name}: layer {readers[0]!r} reads nonzero values in dropped channels: an "
            "operation between the layers that produce them and this one (e.g. a sigmoid, "
            "or adding a constant) turns a dropped channel's zero into a value, which the "
            "extracted module, lacking the channel, does not read; such models are not "
            "supported")
    return structure


def _refuse_unsupported(model_name: str, names: dict[nn.Module, str],
                        forward_order: list[nn.Module]) -> None:
    """Raise ConfigError on the first construct that channel groups cannot describe."""
    for module in forward_order:
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not (
                module.groups == module.in_channels == module.out_channels):
            raise ConfigError(
                f"{model_name}: layer {names[module]!r} is a grouped convolution (groups="
                f"{module.groups}, {module.in_channels} → {module.out_channels} channels); "
                "only depthwise convolutions (groups = in = out channels) are supported: "
                "dropping single channels would leave its groups of unequal size")
        if isinstance(module, _UNSUPPORTED_NORMS):
            raise ConfigError(
                f"{model_name}: layer {names[module]!r} is a {type(module).__name__}; only "
                "BatchNorm layers are supported over prunable channels: this normalisation "
                "mixes channels or turns a dropped channel's zero into its shift, so the "
                "masked model would differ from the extracted one")


def _refuse_unfollowed(model_name: str, flow: ChannelFlow, output_layer: str) -> None:
    """Raise ConfigError on the first operation ``flow`` found that channel groups cannot
    follow, except on the logits alone (a softmax over them is the model's own business)."""
    for refusal in flow.refusals:
        if refusal.sources - {output_layer}:
            raise ConfigError(
                f"{model_name}: layer {refusal.layer or '(the model itself)'!r} runs "
                f"{refusal.construct}; channel groups cannot follow channels through it, so "
                "such models are not supported")


def _slice_offset(model_name: str, norm: str, group: str, readings: list[list[int]],
                  size: int) -> int:
    """The norm channel holding the group's first channel, given the norm channels that hold
    its channels (one list per path from the group to the norm)."""
    offset = readings[0][0]
    if any(reading != list(range(offset, offset + size)) for reading in readings):
        raise ConfigError(
            f"{model_name}: BatchNorm {norm!r} reads the {size} channels of group {group!r} "
            f"as norm channels {readings[0][:8]}...: not one slice in order (channels "
            "permuted, repeated or partly read), which channel groups cannot describe")
    return offset


def _common_size(model: nn.Module, names: dict[nn.Module, str],
                 producers: list[nn.Module]) -> int:
    sizes = {m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in producers}
    if len(sizes) != 1:
        raise ConfigError(
            f"{type(model).__name__}: coupled layers {[names[m] for m in producers]} "
            f"have different output sizes {sorted(sizes)}: each is coupled with part of "
            "another's channels (a residual addition, depthwise conv or gating over a "
            "concatenation, a dense block's concatenation flattened into features), which "
            "channel groups cannot describe")
    return sizes.pop()


def _output_layer(model: nn.Module, names: dict[nn.Module, str],
                  forward_order: list[nn.Module], logits) -> str:
    declared = getattr(model, "output_layer_name", None)
    if declared is not None:
        return declared
    linears = [module for module in forward_order if isinstance(module, nn.Linear)]
    if linears:
        return names[linears[-1]]
    convs = [module for module in forward_order if isinstance(module, nn.Conv2d)]
    last = convs[-1] if convs else None
    if last is None or not isinstance(logits, torch.Tensor) \
            or tuple(logits.shape[1:]) != (last.out_channels,):
        raise ConfigError(
            f"{type(model).__name__}: no Linear layer, and no conv producing the model's "
            f"{tuple(logits.shape[1:]) if isinstance(logits, torch.Tensor) else ''} logits "
            "per image as its channels; name the logit layer in the model's "
            "output_layer_name")
    return names[last]

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from dnnmod.errors import ArtifactError, ConfigError, UnknownNameError

GROUP_KINDS = ("conv", "linear")
_NORM = nn.modules.batchnorm._BatchNorm


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
            input size, (C,) for a linear group. (C,) also for a conv group whose producers do
            not share one spatial size (a strided depthwise conv joining its input's group) and
            for groups read from version-1 files, which did not record shapes: such groups take
            channel masks only.
    """

    name: str
    size: int
    convs: tuple[str, ...]
    norms: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelStructure:
    """A model's channel groups, its logit layer and the input shape it was traced with.

    Attributes:
        groups: channel groups in forward order of their first producer layers.
        output_layer: dotted name of the final Linear producing logits (not prunable).
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


def trace_structure(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)
) -> ModelStructure:
    """Channel groups of ``model``'s Conv2d layers and hidden Linear layers, found by tracing
    a forward pass of an example input of ``input_shape``.

    The logit layer is ``model.output_layer_name`` where the model declares it, otherwise the
    last ``nn.Linear`` the forward pass calls. Layers the forward pass does not call are not
    part of any group, nor are Linear layers whose outputs are not (batch, features) matrices
    (their "units" are not a model's hidden units) or whose units are coupled to conv channels
    (they belong to that conv group's channels). The model's parameters and training modes are
    left as they were.
    """
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
        if isinstance(module, (nn.Conv2d, nn.Linear, _NORM))
    ]
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
            with torch.no_grad():
                model(example)
        finally:
            for hook in hooks:
                hook.remove()
        # The dependency graph traces autograd's graph, so gradients stay enabled (nothing
        # calls backward); an input that requires grad keeps the graph even when all weights
        # are frozen.
        example.requires_grad_(True)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example, verbose=False)
    finally:
        for module, training in training_modes.items():
            module.training = training

    called_convs = [module for module in forward_order if isinstance(module, nn.Conv2d)]
    if not called_convs:
        raise ConfigError(f"{type(model).__name__}: no prunable conv layers found")
    output_layer = _output_layer(model, names, forward_order)
    hidden_linears = [
        module for module in forward_order
        if isinstance(module, nn.Linear) and names[module] != output_layer
        and output_shapes[module] == {(module.out_features,)}
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
            producers, norms = [], []
            for dependency, _ in graph.get_pruning_group(layer, pruning_fn, [0]):
                member = dependency.target.module
                if not graph.is_out_channel_pruning_fn(dependency.handler):
                    continue
                grouped.add(member)
                if isinstance(member, layer_type) and member not in producers:
                    producers.append(member)
                elif isinstance(member, _NORM) and member not in norms:
                    norms.append(member)
            producers.sort(key=position.__getitem__)
            norms.sort(key=registration_order.__getitem__)
            size = _common_size(model, names, producers)
            shapes = set().union(*(output_shapes.get(m, set()) for m in (*producers, *norms)))
            groups.append((position[producers[0]], ChannelGroup(
                name=names[producers[0]],
                size=size,
                convs=tuple(names[member] for member in producers),
                norms=tuple(names[member] for member in norms),
                kind=kind,
                shape=shapes.pop() if len(shapes) == 1 else (size,),
            )))
    groups.sort(key=lambda entry: entry[0])
    return ModelStructure(tuple(group for _, group in groups), output_layer, tuple(input_shape))


def _common_size(model: nn.Module, names: dict[nn.Module, str],
                 producers: list[nn.Module]) -> int:
    sizes = {m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in producers}
    if len(sizes) != 1:
        raise ConfigError(
            f"{type(model).__name__}: coupled layers {[names[m] for m in producers]} "
            f"have different output sizes {sorted(sizes)}"
        )
    return sizes.pop()


def _output_layer(
    model: nn.Module, names: dict[nn.Module, str], forward_order: list[nn.Module]
) -> str:
    declared = getattr(model, "output_layer_name", None)
    if declared is not None:
        return declared
    linears = [module for module in forward_order if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__}: no Linear layer producing logits found")
    return names[linears[-1]]

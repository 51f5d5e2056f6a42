"""The one description of a model's prunable channels, derived by tracing a forward pass.

A *channel group* is a set of conv layers whose output channels must be kept or dropped
together: convs whose outputs meet in a residual addition, and depthwise convs, which carry
the channels of the conv that feeds them. Torch-Pruning's dependency graph finds these
couplings, so the description also holds for models outside the zoo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from dnnmod.errors import ArtifactError, ConfigError, UnknownNameError


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels shared by coupled conv layers; one kernel set for all of them.

    Attributes:
        name: dotted name of the group's first conv in forward order (its representative).
        size: number of channels (kernels) in the group.
        convs: every conv whose output channels are the group's channels, in forward order.
        norms: the BatchNorm layers on those channels.
    """

    name: str
    size: int
    convs: tuple[str, ...]
    norms: tuple[str, ...]


@dataclass(frozen=True)
class ModelStructure:
    """A model's channel groups, its logit layer and the input shape it was traced with.

    Attributes:
        groups: channel groups in forward order of their representative convs.
        output_layer: dotted name of the final Linear producing logits (not prunable).
        input_shape: shape of the example input used for tracing.
    """

    groups: tuple[ChannelGroup, ...]
    output_layer: str
    input_shape: tuple[int, ...]

    def group_of(self, conv_name: str) -> ChannelGroup:
        """The group whose channels ``conv_name`` produces."""
        for group in self.groups:
            if conv_name in group.convs:
                return group
        raise UnknownNameError(
            "prunable conv", conv_name, [conv for group in self.groups for conv in group.convs]
        )

    @property
    def total_kernels(self) -> int:
        """Number of prunable kernels: the sum of the group sizes."""
        return sum(group.size for group in self.groups)

    def to_json(self) -> dict:
        """A JSON-serialisable dict that :meth:`from_json` reads back."""
        return {
            "groups": [
                {
                    "name": group.name,
                    "size": group.size,
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
        """The structure that :meth:`to_json` wrote."""
        try:
            return cls(
                groups=tuple(
                    ChannelGroup(
                        name=group["name"],
                        size=int(group["size"]),
                        convs=tuple(group["convs"]),
                        norms=tuple(group["norms"]),
                    )
                    for group in data["groups"]
                ),
                output_layer=data["output_layer"],
                input_shape=tuple(data["input_shape"]),
            )
        except KeyError as missing:
            raise ArtifactError(f"model structure lacks key {missing.args[0]!r}") from None


def trace_structure(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)
) -> ModelStructure:
    """Channel groups of ``model``'s Conv2d layers, found by one forward pass.

    The logit layer is ``model.output_layer_name`` where the model declares it, otherwise the
    last ``nn.Linear`` the forward pass calls. Convs the forward pass does not call are not
    part of any group. The model's parameters and training modes are left as they were.
    """
    names = {module: name for name, module in model.named_modules()}
    forward_order: list[nn.Module] = []

    def record_call(module: nn.Module, inputs, output) -> None:
        if module not in forward_order:
            forward_order.append(module)

    hooks = [
        module.register_forward_hook(record_call)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    training_modes = {module: module.training for module in model.modules()}
    reference = next(model.parameters(), None)
    example = torch.randn(
        input_shape,
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None else None,
    )
    # The dependency graph traces autograd's graph, so gradients stay enabled (nothing calls
    # backward); an input that requires grad keeps the graph even when all weights are frozen.
    example.requires_grad_(True)
    try:
        model.eval()
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example, verbose=False)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in training_modes.items():
            module.training = training

    called_convs = [module for module in forward_order if isinstance(module, nn.Conv2d)]
    if not called_convs:
        raise ConfigError(f"{type(model).__name__}: no prunable conv layers found")
    output_layer = _output_layer(model, names, forward_order)
    position = {module: index for index, module in enumerate(forward_order)}
    registration_order = {module: index for index, module in enumerate(names)}

    groups: list[ChannelGroup] = []
    grouped: set[nn.Module] = set()
    for conv in called_convs:
        if conv in grouped:
            continue
        pruning_group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, [0])
        convs, norms = [], []
        for dependency, _ in pruning_group:
            member = dependency.target.module
            if not graph.is_out_channel_pruning_fn(dependency.handler):
                continue
            if isinstance(member, nn.Conv2d) and member not in convs:
                convs.append(member)
            elif isinstance(member, nn.modules.batchnorm._BatchNorm) and member not in norms:
                norms.append(member)
        convs.sort(key=position.__getitem__)
        norms.sort(key=registration_order.__getitem__)
        sizes = {member.out_channels for member in convs}
        if len(sizes) != 1:
            raise ConfigError(
                f"{type(model).__name__}: coupled convs {[names[c] for c in convs]} "
                f"have different output channel counts {sorted(sizes)}"
            )
        grouped.update(convs)
        groups.append(
            ChannelGroup(
                name=names[convs[0]],
                size=sizes.pop(),
                convs=tuple(names[member] for member in convs),
                norms=tuple(names[member] for member in norms),
            )
        )
    return ModelStructure(tuple(groups), output_layer, tuple(input_shape))


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

"""M modules of a frozen model as their kept-channel sub-networks, batched as grouped convs.

:class:`~dnnmod.modules.masking.KeptChannelPass` runs each module's kept-channel sub-network
on its own: one launch per layer and module, which a CPU runs well and a GPU does not (a
population of 1,000 candidates is 13,000 small convs per image batch). The batched masked pass
(:func:`~dnnmod.modules.masking.masked_logits`) fills a GPU but computes every dropped channel
only to zero it: about 1/r² of the kept channels' multiplications for modules keeping a
fraction r.

This pass computes the kept channels only, in few launches. The M modules' feature maps lie
side by side along the channel dimension, module after module, each holding only its kept
channels (a *segment*). A conv then runs as one grouped convolution per *bucket* of modules
with the same segment widths in and out (groups = the bucket's modules), over weights gathered
per module (its kept filters, and of those its kept input channels). To keep the buckets few,
each module's segment of a group is padded with zero channels up to a *level*: the group's
kept counts are cut into levels from the top, each holding the counts within ``padding`` (10 %)
below it. A padded channel's weights and bias are zero, so it stays zero and nothing reads it;
a layer computes at most (1 + ``padding``)² of its modules' kept-channel products. BatchNorms
that read a conv directly are folded into it (:func:`~dnnmod.modules.masking.
batch_norm_folding`); others scale and shift by gathered per-channel factors. Channel-wise
operations (ReLU, pooling, dropout in eval mode) run on the side-by-side map as they are, a
residual addition adds two maps of one group's segments, a concatenation interleaves its
operands' segments module by module, and Linear layers run as 1×1 grouped convs.

The same ops run on every device; everything that depends on the masks (levels, buckets,
gather indices) is planned on the host from the masks once per chunk of modules
(:meth:`GroupedKeptPass.prepare`) and reused for every image batch.

The model is followed through a :mod:`torch.fx` trace; :meth:`GroupedKeptPass.build` returns
None for a model with operations it does not follow (grouped convs, flattened feature maps,
anything but the operations above) or whose probe disagrees with the masked model, and
callers then use the masked pass.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from dnnmod.modules.masking import batch_norm_folding, check_masks, masked_logits
from dnnmod.modules.structure import ModelStructure

#: kept counts within this fraction below a level are padded up to it
PADDING = 0.1

#: modules whose output channel c depends on input channel c alone, run on the side-by-side map
_CHANNEL_WISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 nn.Dropout, nn.Identity)
_CHANNEL_WISE_FUNCTIONS = (F.relu, torch.relu)
_BATCH_NORM = nn.modules.batchnorm._BatchNorm


class _Unsupported(Exception):
    """An operation the pass does not follow; :meth:`GroupedKeptPass.build` returns None."""


@dataclass(frozen=True)
class _Segments:
    """Where each module's channels of one feature map lie on the side-by-side map.

    ``size`` is the map's channel count in the base model; ``channels[m]`` the base channel of
    each of module m's positions, ``size`` for a padding channel (a zero)."""

    size: int
    channels: tuple[torch.Tensor, ...]

    @property
    def widths(self) -> list[int]:
        return [len(c) for c in self.channels]

    @property
    def complete(self) -> bool:
        """Every module holds every channel, in order (a layer no mask prunes)."""
        return all(len(c) == self.size and bool((c == torch.arange(self.size)).all())
                   for c in self.channels)

    def positions(self, modules: Sequence[int]) -> torch.Tensor:
        """Positions on the side-by-side map of ``modules``' segments, in that order."""
        starts = [0]
        for width in self.widths:
            starts.append(starts[-1] + width)
        return torch.cat([torch.arange(starts[m], starts[m + 1]) for m in modules])

    def same_as(self, other: _Segments) -> bool:
        return self.size == other.size and all(
            torch.equal(a, b) for a, b in zip(self.channels, other.channels, strict=True))


class _Staging:
    """Index tensors planned on the host, sent to the device in one transfer."""

    def __init__(self) -> None:
        self.host: list[torch.Tensor] = []

    def add(self, index: torch.Tensor) -> int:
        self.host.append(index.long().flatten())
        return len(self.host) - 1

    def transfer(self, device: torch.device) -> list[torch.Tensor]:
        if not self.host:
            return []
        sizes = [len(index) for index in self.host]
        return list(torch.cat(self.host).to(device).split(sizes))


def _fixed(run: Callable) -> Callable[[list[torch.Tensor]], Callable]:
    """The binding of a step that needs no staged indices."""
    return lambda _pieces: run


def padded_widths(counts: Sequence[int], padding: float = PADDING) -> list[int]:
    """Each kept count raised to its level: levels from the largest count down, each holding
    the counts ``c`` with ``c * (1 + padding) >= level``."""
    widths, level = {}, None
    for count in sorted(set(counts), reverse=True):
        if level is None or count * (1 + padding) < level:
            level = count
        widths[count] = level
    return [widths[c] for c in counts]


class GroupedKeptPass:
    """Kept-channel sub-networks of M modules of a frozen model, batched (module docstring).

    Build it with :meth:`build`; :meth:`prepare` plans M modules' masks, and the prepared
    pass maps an image batch to the modules' logits (M, batch, classes), as
    :func:`~dnnmod.modules.masking.masked_logits` gives them for binary channel masks."""

    def __init__(self, model: nn.Module, structure: ModelStructure,
                 padding: float = PADDING) -> None:
        self.structure, self.padding = structure, padding
        copied = copy.deepcopy(model).eval()
        folded = batch_norm_folding(copied, structure)
        self.graph = torch.fx.symbolic_trace(copied).graph
        self.layers = dict(copied.named_modules())
        self.group_of = {conv: group.name for group in structure.conv_groups
                         for conv in group.convs}
        # Every producer's weights (4D; a Linear's as 1x1) and bias, with a zero output row and
        # input column appended: the targets of padding indices.
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in self.layers.items():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                weight = folded.tensors.get(f"{name}.weight", layer.weight).detach()
                bias = folded.tensors.get(f"{name}.bias", layer.bias)
                bias = (weight.new_zeros(weight.shape[0]) if bias is None else bias.detach())
                weight = weight.contiguous().view(*weight.shape[:2], *weight.shape[2:],
                                                  *([1] * (4 - weight.dim())))
                self.weights[name] = (F.pad(weight, (0, 0, 0, 0, 0, 1, 0, 1)),
                                      F.pad(bias, (0, 1)))

    @classmethod
    def build(cls, model: nn.Module, structure: ModelStructure,
              padding: float = PADDING) -> GroupedKeptPass | None:
        """The pass for channel masks of the conv groups, or None where the model has an
        operation the pass does not follow or a float64 probe (3 modules with random kept
        halves, 2 random inputs) disagrees with the masked model."""
        try:
            double = copy.deepcopy(model).double()
            probe = cls(double, structure, padding)
            generator = torch.Generator().manual_seed(0)
            reference = next(model.parameters())
            masks = {}
            for group in structure.conv_groups:
                mask = torch.rand(3, group.size, generator=generator) < 0.5
                mask[:, 0] = True
                masks[group.name] = mask
            x = torch.randn((2, *structure.input_shape[1:]), generator=generator,
                            dtype=torch.float64).to(reference.device)
            with torch.no_grad():
                grouped = probe.prepare(masks)(x)
                dense = masked_logits(double.eval(), structure,
                                      {n: m.to(reference.device) for n, m in masks.items()}, x)
        except (_Unsupported, torch.fx.proxy.TraceError):
            return None
        if not torch.allclose(grouped, dense, rtol=1e-9, atol=1e-9 * float(dense.abs().max())):
            return None
        return cls(model, structure, padding)

    def weight_bytes(self) -> int:
        """Bytes of the weights of the producers the masks reach (in a conv group, or reading
        a map that one of them feeds): what one module's gathered weights take at most."""
        pruned: set[torch.fx.Node] = set()  # maps whose channels the masks prune
        total = 0
        for node in self.graph.nodes:
            producer = node.op == "call_module" and node.target in self.weights
            grouped = producer and node.target in self.group_of
            if grouped or any(a in pruned for a in node.all_input_nodes):
                if producer:
                    weight = self.weights[node.target][0]
                    total += weight.numel() * weight.element_size()
                if grouped or not producer:  # another producer's units are all kept
                    pruned.add(node)
        return total

    def prepare(self, masks: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor],
                                                                       torch.Tensor]:
        """The modules' logits as a function of an image batch, for binary channel masks
        (conv group name → (M, C); a group absent is kept whole). Planned on the host; the
        gathered weights live as long as the returned function."""
        modules = check_masks(self.structure, masks)
        unknown = sorted(set(masks) - {group.name for group in self.structure.conv_groups})
        if unknown or any(mask.dim() != 2 for mask in masks.values()):
            raise ValueError("a grouped kept-channel pass takes channel masks (M, C) of conv "
                             f"groups; got {unknown[:5] or 'position masks'}")
        kept = {name: mask.detach().cpu() > 0 for name, mask in masks.items()}
        device = next(iter(self.weights.values()))[0].device
        staging = _Staging()
        group_segments: dict[str, _Segments] = {}

        def segments_of(layer: str, size: int) -> _Segments:
            group = self.group_of.get(layer)
            if group is None or group not in kept:
                return _Segments(size, tuple(torch.arange(size) for _ in range(modules)))
            if group not in group_segments:
                indices = [row.nonzero().flatten() for row in kept[group]]
                widths = padded_widths([len(i) for i in indices], self.padding)
                group_segments[group] = _Segments(size, tuple(
                    torch.cat([i, torch.full((w - len(i),), size)])
                    for i, w in zip(indices, widths, strict=True)))
            return group_segments[group]

        steps: list[tuple[torch.fx.Node, Callable]] = []
        layout: dict[torch.fx.Node, _Segments | None] = {}  # None: the same for every module
        for node in self.graph.nodes:
            if node.op == "placeholder":
                layout[node] = None
                steps.append((node, None))
                continue
            if node.op == "output":
                source = node.args[0]
                if not isinstance(source, torch.fx.Node) or layout[source] is None:
                    raise _Unsupported("the output is not one tensor the masks reach")
                classes = layout[source].size
                if not layout[source].complete:
                    raise _Unsupported("the logits' units are pruned")
                steps.append((node, _fixed(lambda out, m=modules, n=classes:
                                           out.view(out.shape[0], m, n).transpose(0, 1))))
                continue
            inputs = [layout[a] for a in node.args if isinstance(a, torch.fx.Node)]
            target = self.layers.get(node.target) if node.op == "call_module" else None
            if isinstance(target, (nn.Conv2d, nn.Linear)):
                size = target.out_channels if isinstance(target, nn.Conv2d) \
                    else target.out_features
                out = segments_of(node.target, size)
                layout[node], run = self._producer(node.target, inputs[0], out, modules,
                                                   staging)
            elif isinstance(target, _BATCH_NORM):
                layout[node], run = inputs[0], self._norm(target, inputs[0], staging)
            elif (isinstance(target, _CHANNEL_WISE)
                  or (node.op == "call_function" and node.target in _CHANNEL_WISE_FUNCTIONS)
                  or (node.op == "call_method" and node.target == "relu")):
                layout[node], run = inputs[0], _fixed(self._call(node))
            elif (isinstance(target, nn.Flatten) and target.start_dim == 1
                  or node.op == "call_function" and node.target is torch.flatten
                  or node.op == "call_method" and node.target == "flatten"):
                if list(node.args[1:]) + list(node.kwargs.values()) not in ([1], [1, -1]) \
                        and node.op != "call_module":
                    raise _Unsupported("a flatten other than of all dimensions after channels")
                layout[node], run = inputs[0], _fixed(_flatten_pooled)
            elif node.op == "call_function" and node.target in (operator.add, torch.add):
                if (len(inputs) != 2 or node.kwargs
                        or (inputs[0] is None) != (inputs[1] is None)
                        or (inputs[0] is not None and not inputs[0].same_as(inputs[1]))):
                    raise _Unsupported("an addition of maps with different channels")
                layout[node], run = inputs[0], _fixed(operator.add)
            elif node.op == "call_function" and node.target is torch.cat:
                layout[node], run = self._concatenation(node, modules, layout, staging)
            else:
                raise _Unsupported(f"{node.op} {node.target}")
            steps.append((node, run))
        # every index to the device at once; then each step gathers its weights
        pieces = staging.transfer(device)
        steps = [(node, None if bind is None else bind(pieces)) for node, bind in steps]

        def forward(x: torch.Tensor) -> torch.Tensor:
            values: dict[torch.fx.Node, torch.Tensor] = {}
            for node, run in steps:
                if run is None:
                    values[node] = x
                    continue
                args = [values[a] for a in node.all_input_nodes]
                values[node] = run(*args)
                if node.op == "output":
                    return values[node]
            raise _Unsupported("the graph has no output")

        return forward

    def _producer(self, name: str, source: _Segments | None, out: _Segments, modules: int,
                  staging: _Staging) -> tuple[_Segments | None, Callable]:
        """A conv or Linear: one plain call for a shared input, else one grouped conv per
        bucket of modules with the same widths in and out, over weights gathered per module
        (one gather per layer for all buckets)."""
        layer = self.layers[name]
        weight, bias = self.weights[name]
        conv = ({"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
                if isinstance(layer, nn.Conv2d) else {})
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            raise _Unsupported(f"{name}: a grouped or non-zero-padded conv")
        linear = isinstance(layer, nn.Linear)
        if source is not None and source.size != weight.shape[1] - 1:
            raise _Unsupported(f"{name} reads {source.size} channels")
        if out.complete and (source is None or source.complete):  # no mask prunes it
            w, b = weight[:-1, :-1], bias[:-1]
            if source is None:  # no mask reaches it yet
                return None, _fixed(_as_conv(linear, lambda x: F.conv2d(x, w, b, **conv)))

            def run_shared(x: torch.Tensor) -> torch.Tensor:  # the model's own weights
                folded = x.reshape(x.shape[0] * modules, -1, *x.shape[2:])
                y = F.conv2d(folded, w, b, **conv)
                return y.reshape(x.shape[0], -1, *y.shape[2:])

            return out, _fixed(_as_conv(linear, run_shared))
        if source is None:  # the input, shared: each module's kept filters, stacked
            rows = staging.add(torch.cat(out.channels))

            def bind_stacked(pieces: list[torch.Tensor]) -> Callable:
                w, b = weight[:, :-1].index_select(0, pieces[rows]), bias[pieces[rows]]
                return _as_conv(linear, lambda x: F.conv2d(x, w, b, **conv))

            return out, bind_stacked
        buckets: dict[tuple[int, int], list[int]] = {}
        for module, pair in enumerate(zip(source.widths, out.widths, strict=True)):
            buckets.setdefault(pair, []).append(module)
        columns_all = weight.shape[1]
        flat, rows, plans = [], [], []
        for (width_in, width_out), members in buckets.items():
            kept_rows = torch.stack([out.channels[m] for m in members])
            kept_columns = torch.stack([source.channels[m] for m in members])
            flat.append(kept_rows[:, :, None] * columns_all + kept_columns[:, None, :])
            rows.append(kept_rows)
            positions = (None if len(members) == modules
                         else staging.add(source.positions(members)))
            plans.append((positions, len(members) * width_out, width_in, len(members)))
        flat_handle = staging.add(torch.cat([f.flatten() for f in flat]))
        rows_handle = staging.add(torch.cat([r.flatten() for r in rows]))
        # the buckets' outputs lie in bucket order: where each module's segment lies there
        order = [m for members in buckets.values() for m in members]
        restore = None
        if order != list(range(modules)):
            start, starts = 0, {}
            for module in order:
                starts[module] = start
                start += out.widths[module]
            restore = staging.add(torch.cat([
                torch.arange(starts[m], starts[m] + len(out.channels[m]))
                for m in range(modules)]))

        def bind_buckets(pieces: list[torch.Tensor]) -> Callable:
            gathered = weight.flatten(0, 1).index_select(0, pieces[flat_handle])
            biases = bias[pieces[rows_handle]]
            calls, first, row = [], 0, 0  # a bucket's first filter and first gathered row
            for positions, filters, width_in, groups in plans:
                w = gathered[row:row + filters * width_in].view(
                    filters, width_in, *weight.shape[2:])
                calls.append((None if positions is None else pieces[positions], w,
                              biases[first:first + filters], groups))
                first, row = first + filters, row + filters * width_in
            back = None if restore is None else pieces[restore]

            def run_buckets(x: torch.Tensor) -> torch.Tensor:
                outputs = [F.conv2d(x if positions is None else x.index_select(1, positions),
                                    w, b, groups=groups, **conv)
                           for positions, w, b, groups in calls]
                y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
                return y if back is None else y.index_select(1, back)

            return _as_conv(linear, run_buckets)

        return out, bind_buckets

    def _norm(self, norm: nn.Module, source: _Segments | None,
              staging: _Staging) -> Callable[[list[torch.Tensor]], Callable]:
        """A BatchNorm no conv folded: its eval-mode scale and shift per base channel,
        gathered for each module's positions (a padding channel's are 0)."""
        if source is None:
            return _fixed(lambda x: norm(x))
        if norm.running_mean is None or source.size != norm.num_features:
            raise _Unsupported("a BatchNorm without running statistics or over other channels")
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach()
        shift = -scale * norm.running_mean
        if norm.bias is not None:
            shift = shift + norm.bias.detach()
        index = staging.add(torch.cat(source.channels))

        def bind(pieces: list[torch.Tensor]) -> Callable:
            scales = F.pad(scale, (0, 1))[pieces[index]]
            shifts = F.pad(shift, (0, 1))[pieces[index]]

            def apply(x: torch.Tensor) -> torch.Tensor:
                shape = (1, -1, *([1] * (x.dim() - 2)))
                return x * scales.view(shape) + shifts.view(shape)

            return apply

        return bind

    def _concatenation(self, node: torch.fx.Node, modules: int,
                       layout: Mapping[torch.fx.Node, _Segments | None],
                       staging: _Staging) -> tuple[_Segments, Callable]:
        """Concatenated channels: module by module, each operand's segment after the last."""
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim != 1 or any(layout[part] is None for part in parts):
            raise _Unsupported("a concatenation other than of masked maps' channels")
        operands = [layout[part] for part in parts]
        size = sum(operand.size for operand in operands)
        offsets, starts = [0], [0]  # per operand: first base channel, first position
        for operand in operands:
            offsets.append(offsets[-1] + operand.size)
            starts.append(starts[-1] + sum(operand.widths))
        channels, interleave = [], []
        segment_starts = [starts[i] + torch.tensor([0, *operand.widths]).cumsum(0)
                          for i, operand in enumerate(operands)]
        for module in range(modules):
            pieces = []
            for operand, offset, first in zip(operands, offsets, segment_starts, strict=False):
                own = operand.channels[module]
                pieces.append(torch.where(own == operand.size, size, own + offset))
                before = int(first[module])
                interleave.append(torch.arange(before, before + len(own)))
            channels.append(torch.cat(pieces))
        index = staging.add(torch.cat(interleave))
        return _Segments(size, tuple(channels)), (
            lambda pieces: lambda *xs: torch.cat(xs, dim=1).index_select(1, pieces[index]))

    def _call(self, node: torch.fx.Node) -> Callable:
        """A channel-wise operation, called as the model calls it."""
        if node.op == "call_module":
            return self._call_module(node.target)
        others = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(others) != 1:
            raise _Unsupported(f"{node.target} of several maps")
        if node.op == "call_method":
            return lambda x: getattr(x, node.target)(*node.args[1:], **node.kwargs)
        return lambda x: node.target(x, *node.args[1:], **node.kwargs)

    def _call_module(self, name: str) -> Callable:
        layer = self.layers[name]
        return lambda *xs: layer(*xs)


def _flatten_pooled(x: torch.Tensor) -> torch.Tensor:
    """Flatten a map whose spatial size is 1 (pooled): each channel stays one feature."""
    if x.dim() > 2 and x[0, 0].numel() != 1:
        raise ValueError("a flattened feature map with more than one position per channel: "
                         "the grouped kept-channel pass cannot follow it")
    return x.flatten(1)


def _as_conv(linear: bool, run: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A Linear layer runs as a 1×1 conv of its (batch, features) input."""
    if not linear:
        return run
    return lambda x: run(x[:, :, None, None]).flatten(1)

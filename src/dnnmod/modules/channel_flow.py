"""Which operations between a model's layers channel groups can follow.

Channel groups (:mod:`dnnmod.modules.structure`) keep or drop channels one at a time, and a
module is computed two ways that must agree: the *masked* base model zeroes a dropped channel
where its layers produce it, the *extracted* one removes it from every layer that produces or
reads it. They agree if, between those layers, every operation treats channels one at a time
and leaves a dropped channel zero wherever a layer reads it. Tracing checks both, on the
example input it traces with:

- :class:`ChannelFlow`, during the traced pass, follows every tensor that carries the
  channels (or units) of a Conv2d, Linear or BatchNorm layer through the operations between
  layers, and records a :class:`Refusal` for each operation that (a) changes the channel
  dimension other than by concatenating channels or flattening (C, H, W) into features (of
  channels other than a concatenation's, which Torch-Pruning's graph maps wrong): a
  channel slice or split, a reduction or softmax over channels, a reshape that splits or
  merges channels; (b) mixes channels while keeping their number, found by perturbing chosen
  channels of its inputs and watching which output channels change: a norm over channels,
  channel gating by a channel mean, a channel permutation; (c) combines channels with a
  per-channel tensor that no prunable layer produces: a parameter or buffer of another layer
  (a FrozenBatchNorm2d, a bias added through ``param.view``), or the input image. Such
  operations would silently change a module or break its extraction.
- :func:`dropped_channel_hooks` run the model with every channel of every group dropped and
  find the layers that read a nonzero value in channels that come from pruned layers:
  an operation between (a sigmoid, adding a constant) turned a dropped channel's zero into a
  value that the extracted module, which lacks the channel, would not read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_NORM = nn.modules.batchnorm._BatchNorm
#: layers whose computation channel groups model; operations inside them are not followed
MODELED_LAYERS = (nn.Conv2d, nn.Linear, _NORM)
#: operations that permute channels by construction
_CHANNEL_SHUFFLES = (torch.channel_shuffle, torch.native_channel_shuffle)
#: operations that change a tensor's shape
_RESHAPES = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten,
             torch.unflatten, torch.Tensor.flatten, torch.flatten)
_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)
#: normalisations other than BatchNorm: they mix channels, or (instance norm) compute per
#: channel through a reshape of all channels into one batch, which the dependency graph
#: cannot follow
_CHANNEL_NORMS = (F.group_norm, F.layer_norm, F.instance_norm, F.local_response_norm,
                  F.rms_norm)


@dataclass(frozen=True)
class Refusal:
    """An operation channel groups cannot follow.

    Attributes:
        layer: dotted name of the innermost module running it ('' for the model itself).
        construct: what it does, for the message.
        sources: the layers whose channels it reads.
    """

    layer: str
    construct: str
    sources: frozenset[str]


class ChannelFlow(TorchFunctionMode):
    """Within the block, follows the channels of ``model``'s Conv2d, Linear and BatchNorm
    layers through a forward pass and records, in :attr:`refusals`, each operation that
    channel groups cannot follow (see the module docstring); :meth:`hooks` must be registered
    for the pass. :attr:`readers` maps each Conv2d and Linear layer to the layers whose
    channels it reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {module: name for name, module in model.named_modules()}
        self.running: list[nn.Module] = []
        # id → (the tensor, kept alive so that ids stay unique, and the layers it comes from)
        self.channels: dict[int, tuple[torch.Tensor, frozenset[str]]] = {}
        # tensors of the model's own parameters and buffers, and tensors computed from them
        self.owned: dict[int, torch.Tensor] = {
            id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
        self.readers: dict[str, frozenset[str]] = {}
        # ids of followed tensors whose channels are a concatenation's
        self.concatenated: set[int] = set()
        self.refusals: list[Refusal] = []
        self._noise = torch.Generator().manual_seed(0)

    def hooks(self, model: nn.Module) -> list:
        """Hooks on every module of ``model``, to remove after the pass."""
        handles = []
        for module in self.names:
            handles.append(module.register_forward_pre_hook(self._enter))
            handles.append(module.register_forward_hook(self._leave))
        return handles

    def _enter(self, module: nn.Module, _inputs) -> None:
        self.running.append(module)

    def _leave(self, module: nn.Module, inputs, output) -> None:
        self.running.pop()
        if not isinstance(module, MODELED_LAYERS) or not isinstance(output, torch.Tensor):
            return
        name = self.names[module]
        source = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        read = self.channels.get(id(source), (None, None))[1] if source is not None else None
        if isinstance(module, _NORM):
            if read is not None:
                self.channels[id(output)] = (output, read | {name})
                if id(source) in self.concatenated:
                    self.concatenated.add(id(output))
            return
        if read is not None:
            self.readers[name] = read
            if isinstance(module, nn.Linear) and source.dim() > 2:
                self._refuse(read, f"a Linear layer over the last dimension of the feature "
                                   f"map {tuple(source.shape)}", layer=name)
        if isinstance(module, nn.Conv2d) or output.dim() == 2:
            self.channels[id(output)] = (output, frozenset({name}))

    def _refuse(self, sources: frozenset[str], construct: str, layer: str | None = None) -> None:
        if layer is None:
            layer = self.names[self.running[-1]] if self.running else ""
        self.refusals.append(Refusal(layer, construct, sources))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.running and isinstance(self.running[-1], MODELED_LAYERS):
            return func(*args, **kwargs)
        operands = [leaf for leaf in pytree.tree_leaves((args, kwargs))
                    if isinstance(leaf, torch.Tensor)]
        followed = [tensor for tensor in operands if id(tensor) in self.channels]
        if not followed:
            output = func(*args, **kwargs)
            if any(id(tensor) in self.owned for tensor in operands):
                for leaf in _tensors(output):
                    self.owned[id(leaf)] = leaf
            return output
        # Inputs as they were, for the perturbed reruns: an in-place operation changes them.
        saved = {id(tensor): tensor.clone() for tensor in followed}
        output = func(*args, **kwargs)
        sources = frozenset().union(*(self.channels[id(tensor)][1] for tensor in followed))
        if self._follows(func, args, kwargs, operands, followed, saved, output, sources):
            for leaf in _tensors(output):
                self.channels[id(leaf)] = (leaf, sources)
        return output

    def _follows(self, func, args, kwargs, operands: list[torch.Tensor],
                 followed: list[torch.Tensor], saved: dict[int, torch.Tensor], output,
                 sources: frozenset[str]) -> bool:
        """Whether channel groups can follow ``func``'s output; records a refusal where
        they cannot."""
        name = getattr(func, "__name__", repr(func))
        outputs = _tensors(output)
        if not outputs:
            if name == "__setitem__":
                self._refuse(sources, f"an assignment into the feature map "
                                      f"{tuple(followed[0].shape)}")
            return False
        maps = [tensor for tensor in followed if tensor.dim() >= 2]
        if not maps:
            return True
        for operand in operands:
            if id(operand) not in self.channels and self._per_channel(operand, maps):
                kind = ("a parameter or buffer outside Conv2d, Linear and BatchNorm layers"
                        if id(operand) in self.owned else "e.g. the input image or a constant")
                self._refuse(sources, f"{name} of the channels of {tuple(maps[0].shape)} with "
                                      f"a {tuple(operand.shape)} tensor no prunable layer "
                                      f"produces ({kind})")
                return False
        if func in _CONCATENATIONS and _dim(args, kwargs, 1) % outputs[0].dim() == 1:
            self.concatenated.add(id(outputs[0]))
            return True  # channel groups follow concatenated channels
        if func in _CHANNEL_NORMS:
            self._refuse(sources, f"{name} (only BatchNorm normalises channels one at a time "
                                  "in a way channel groups follow)")
            return False
        if func in _CHANNEL_SHUFFLES:
            self._refuse(sources, f"{name} (a channel permutation)")
            return False
        channels = {tensor.shape[1] for tensor in maps}
        if len(channels) > 1:
            self._refuse(sources, f"{name} of feature maps of different channel counts "
                                  f"{sorted(channels)} (one broadcast over the other's "
                                  "channels)")
            return False
        count = channels.pop()
        concatenated = any(id(tensor) in self.concatenated for tensor in maps)
        for leaf in outputs:
            if leaf.dim() == 2 and any(
                    tensor.dim() > 2 and leaf.shape[1] == math.prod(tensor.shape[1:])
                    for tensor in maps):
                if concatenated and leaf.shape[1] != count:
                    # Torch-Pruning maps such features to the wrong channels.
                    self._refuse(sources, f"{name} of concatenated channels "
                                          f"{tuple(maps[0].shape)} into features "
                                          f"{tuple(leaf.shape)}")
                    return False
                continue  # (C, H, W) flattened into features
            if leaf.dim() < 2 or leaf.shape[1] != count:
                shapes = f"{tuple(maps[0].shape)} into {tuple(leaf.shape)}"
                self._refuse(sources, f"a channel shuffle or split: {name} of the feature map "
                                      f"{shapes}" if func in _RESHAPES else
                             f"{name} of {shapes}, which changes the channel dimension (a "
                             "channel slice or split, a reduction over channels, a reshape)")
                return False
        if count > 1 and self._mixes(func, args, kwargs, saved, outputs, count):
            self._refuse(sources, f"{name}, which mixes channels (a norm, softmax or mean over "
                                  "channels, a permutation): an output channel depends on "
                                  "other input channels")
            return False
        if concatenated:
            self.concatenated.update(id(leaf) for leaf in outputs)
        return True

    def _per_channel(self, operand: torch.Tensor, maps: Iterable[torch.Tensor]) -> bool:
        """Whether ``operand``, not carrying followed channels, holds values per channel of
        one of ``maps``: more than one entry along the dimension aligned with their channels
        when broadcast, or, for the model's own tensors, a dimension of the channel count."""
        if operand.numel() <= 1:
            return False
        for tensor in maps:
            aligned = operand.dim() - (tensor.dim() - 1)
            if 0 <= aligned < operand.dim() and operand.shape[aligned] > 1:
                return True
            if id(operand) in self.owned and tensor.shape[1] > 1 \
                    and tensor.shape[1] in operand.shape:
                return True
        return False

    def _mixes(self, func, args, kwargs, saved: dict[int, torch.Tensor],
               outputs: list[torch.Tensor], count: int) -> bool:
        """Whether perturbing some input channels changes other output channels. Channels
        are chosen by the bits of their index, each bit set and clear: every channel then
        differs from every other in some choice, so a permutation shows too."""
        index = torch.arange(count)
        for bit in range(max(1, (count - 1).bit_length())):
            for chosen in ((index >> bit) & 1 == 1, (index >> bit) & 1 == 0):
                def perturbed(leaf, chosen=chosen):
                    if not isinstance(leaf, torch.Tensor) or id(leaf) not in saved:
                        return leaf
                    copy = saved[id(leaf)].clone()
                    if copy.is_floating_point() and copy.dim() >= 2 and copy.shape[1] == count:
                        noise = torch.randn(copy[:, chosen].shape, generator=self._noise)
                        copy[:, chosen.to(copy.device)] += noise.to(copy)
                    return copy

                rerun = _tensors(func(*pytree.tree_map(perturbed, args),
                                      **pytree.tree_map(perturbed, kwargs)))
                kept = (~chosen).nonzero().flatten()
                for before, after in zip(outputs, rerun, strict=True):
                    if before.dim() < 2 or before.shape[1] != count:
                        continue
                    before = before.index_select(1, kept.to(before.device))
                    after = after.index_select(1, kept.to(after.device))
                    same = (torch.allclose(before, after, rtol=1e-5, atol=1e-6, equal_nan=True)
                            if before.is_floating_point() else torch.equal(before, after))
                    if not same:
                        return True
        return False


def _tensors(output) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _dim(args, kwargs, position: int) -> int:
    """The ``dim`` argument of a call such as ``torch.cat(tensors, dim)`` (default 0)."""
    if "dim" in kwargs:
        return kwargs["dim"]
    return args[position] if len(args) > position else 0


def dropped_channel_hooks(model: nn.Module, zeroed: Iterable[str],
                          readers: dict[str, frozenset[str]], pruned: set[str]
                          ) -> tuple[list, list[str]]:
    """Hooks for one pass of ``model`` that zero the outputs of the ``zeroed`` layers (every
    group's producers and norms: the masked model with every channel dropped) and append to
    the returned list each layer of ``readers`` (layer → layers whose channels it reads)
    reading channels of ``pruned`` layers that is given a nonzero value there."""
    layers = dict(model.named_modules())
    found: list[str] = []

    def zero(_layer, _inputs, output: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(output)

    def check(name: str):
        def hook(_layer, inputs) -> None:
            if bool(inputs[0].any()):
                found.append(name)
        return hook

    handles = [layers[name].register_forward_hook(zero) for name in zeroed]
    handles += [layers[name].register_forward_pre_hook(check(name))
                for name, read in readers.items() if read & pruned]
    return handles, found

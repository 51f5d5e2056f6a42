"""Composed models: modules of one or several module sets run as one network.

The modules of a module set are physically extracted, padded to a common shape and fused
(:class:`~dnnmod.modules.extract.FusedModules`), so one call runs all of them; the set's head
turns their logits into module scores, and a registered combination rule
(:mod:`dnnmod.modules.combination`) turns the scores into a prediction.

Two ways to build one:

- ``ComposedModel(model, modules, classes)``: modules of one module set (all, or those of a
  sub-task T), on normalised inputs as the base model takes them. Output positions follow T's
  order and predictions are base-model class indices.
- ``ComposedModel.from_parts(parts)``: a new task from parts, each the module of one class of
  one module set, drawn from different base models and datasets. Parts of one (model, module
  set) run fused; the scores of all parts are concatenated in part order, and the predicted
  class is the winning part's position. Models trained on different datasets normalise their
  inputs differently, so the composed model takes images in [0, 1]
  (:meth:`dnnmod.data.ImageSet.unit_batch`) and each part normalises them with its base
  model's mean/std, recorded in the module set as ``base["normalization"]``.

A module set runs one of three equivalent ways (:class:`FusedModuleSet`): ``fused``, the modules
padded to one shape and run in one vmap-ed pass; ``sequential``, each module extracted at its
own size and run one after another, reading its channels of a first layer computed once for
all (:class:`SharedFirstLayer`); or ``separate``, the same modules each computing its own first
layer. None wins everywhere on a CPU, so the fastest is chosen by timing them on the first batch
of each batch-size bucket (:class:`ExecutionChoice`). The input normalisation is computed once.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.modules.combination import combine_scores, get_combination
from dnnmod.modules.extract import (
    POSITION_MASK,
    FusedModules,
    extract_module,
    pad_and_extract,
    padded_channels,
)
from dnnmod.modules.masking import batch_norm_folding, channel_view, masked_logits
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import ModelStructure

#: the ways a module set can run, all computing the same scores (see FusedModuleSet)
EXECUTIONS = ("fused", "sequential", "separate")


@dataclass(frozen=True)
class ComposedPart:
    """The module of ``modules`` that recognises base-model class ``class_index``, run on
    ``model``, the base model the module set was cut from."""

    model: nn.Module
    modules: ModuleSet
    class_index: int


def batch_bucket(batch_size: int) -> int:
    """The power of two at or above ``batch_size``: batches of one bucket share an execution."""
    return 1 << max(batch_size - 1, 0).bit_length()


class ExecutionChoice:
    """Which of several equivalent executions runs a batch: the fastest measured on the first
    batch of its batch-size bucket (:func:`batch_bucket`), timed ``rounds`` times each,
    interleaved, best time kept (the first round includes one-off costs such as oneDNN's
    kernel set-up, the later ones not), then cached in :attr:`chosen` (bucket → name).
    ``forced`` (a name) skips the measurement. The candidates are those given to :meth:`run`."""

    def __init__(self, names: Sequence[str], forced: str | None = None, rounds: int = 2) -> None:
        if forced is not None and forced not in names:
            raise ConfigError(f"unknown execution {forced!r}; known: {', '.join(names)}")
        self.names, self.forced, self.rounds = tuple(names), forced, rounds
        self.chosen: dict[int, str] = {}

    def run(self, runs: Mapping[str, Callable[[], torch.Tensor]],
            batch_size: int) -> torch.Tensor:
        """The output of the execution chosen for ``batch_size`` (``runs``: name → call, some
        of :attr:`names`)."""
        if self.forced is not None:
            return runs[self.forced]()
        bucket = batch_bucket(batch_size)
        if bucket in self.chosen:
            return runs[self.chosen[bucket]]()
        best = dict.fromkeys(runs, float("inf"))
        outputs = {}
        for _ in range(self.rounds):
            for name in runs:
                started = time.perf_counter()
                outputs[name] = runs[name]()
                best[name] = min(best[name], time.perf_counter() - started)
        self.chosen[bucket] = min(best, key=best.__getitem__)
        return outputs[self.chosen[bucket]]


class SharedFirstLayer(nn.Module):
    """The base model's first layer (the first producer layer of its first group, a BatchNorm
    that reads it folded in) computed once for all modules: for the union of the channels they
    keep there, followed by one zero channel (a zero kernel, cheaper than concatenating zeros
    to the output). Module i reads its channels ``channels_i`` from
    it (an extracted module's kept channels in order) and the fused modules ``fused_channels``
    ((M, width): each padded module's channels, padding channels reading the zero channel, as
    a dropped channel outputs zero)."""

    def __init__(self, model: nn.Module, structure: ModelStructure,
                 kept: Sequence[torch.Tensor]) -> None:
        super().__init__()
        base = copy.deepcopy(model).eval()
        fold_batch_norms(base, structure)
        self.layer = base.get_submodule(structure.groups[0].convs[0])
        union = torch.stack(list(kept)).any(dim=0)
        channels = union.nonzero().flatten()
        with torch.no_grad():
            for name in ("weight", "bias"):
                tensor = getattr(self.layer, name)
                if tensor is not None:
                    rows = torch.cat([tensor[channels], tensor.new_zeros((1, *tensor.shape[1:]))])
                    setattr(self.layer, name, nn.Parameter(rows, requires_grad=False))
        # where each base-model channel is in this layer's output; dropped ones at the zero one
        position = torch.full((len(union),), len(channels), dtype=torch.long)
        position[channels] = torch.arange(len(channels))
        for index, own in enumerate(kept):
            self.register_buffer(f"channels_{index}", position[own])
        self.register_buffer("fused_channels", torch.stack([
            torch.where(own[padded], position[padded], len(channels))
            for own, padded in zip(kept, padded_channels(kept), strict=True)]))
        self.modules_count = len(kept)
        self.to(self.layer.weight.device)  # the index buffers come from the masks' device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def module_inputs(self, shared: torch.Tensor) -> list[torch.Tensor]:
        """Each extracted module's input: its channels of ``shared`` (this layer's output)."""
        return [shared.index_select(1, getattr(self, f"channels_{index}"))
                for index in range(self.modules_count)]

    def fused_inputs(self, shared: torch.Tensor) -> torch.Tensor:
        """The padded modules' inputs, (M, batch, width, ...), from ``shared``."""
        index = self.fused_channels
        return shared.index_select(1, index.flatten()).unflatten(1, index.shape).movedim(1, 0)


class FusedModuleSet(nn.Module):
    """The modules of one module set with the set's head: (batch, M) scores. With
    ``normalization`` ({"mean": [...], "std": [...]}) it takes images in [0, 1] and normalises
    them as its base model was trained; without, it takes normalised images.

    It runs one of :data:`EXECUTIONS`, which give the same scores within float tolerance:

    - ``fused``: the modules padded to one shape (:func:`pad_and_extract`) in one vmap-ed
      pass (:class:`FusedModules`): one call instead of M, each conv a grouped conv;
    - ``sequential``: each module extracted at its own size and run one after another, each
      reading its channels of the first layer computed once for all (:class:`SharedFirstLayer`);
    - ``separate``: the same extracted modules, each computing its own first layer.

    On this project's CPU the fused pass wins at small batches, where the per-operation
    overhead of M calls dominates, and loses at large ones, where oneDNN's grouped convs of a
    few channels per group run slower than M small dense convs. Sharing the first layer saves
    its M - 1 repeats but copies each module's channels out of the shared output: on a wide
    first layer at a large batch the copies cost more than the convs they save (vgg16 at full
    width, batch 256). So on a CPU an :class:`ExecutionChoice` times them on the first batch of
    each batch-size bucket and keeps the fastest; ``execution`` forces one. On a GPU the fused
    pass always runs: the M sequential modules would launch M times as many small kernels,
    which leave the device idle, and timing there would need synchronisation that the fused
    pass does not.

    Every execution normalises the input once, and each module's BatchNorms are folded into
    the convs they read. The padded and the extracted modules are both held, so this takes
    about twice the extracted modules' memory, unless one execution is forced; a single module
    always runs ``separate``.
    """

    def __init__(self, model: nn.Module, modules: ModuleSet,
                 normalization: Mapping[str, Sequence[float]] | None = None,
                 execution: str | None = None) -> None:
        super().__init__()
        if execution is None and len(modules) == 1:
            execution = "separate"  # one module: nothing to fuse or share, no timing to spend
        self.choice = ExecutionChoice(EXECUTIONS, forced=execution)
        model = model.eval()
        keeps = [modules.module_masks(position) for position in range(len(modules))]
        structure = modules.structure
        self._build(model, structure, keeps, optimised=True)
        if not self._agrees_with_masked_modules(model, structure, modules.masks):
            # A model that reads its input past its first layer cannot share that layer: run
            # the extracted modules as they are.
            self._build(model, structure, keeps, optimised=False)
        self.head = modules.head.eval()
        for key in ("mean", "std"):
            value = None if normalization is None else \
                torch.tensor(normalization[key], dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(key, value)
        self.to(next(model.parameters()).device)  # the head and buffers built on the CPU

    def _build(self, model: nn.Module, structure: ModelStructure,
               keeps: Sequence[Mapping[str, torch.Tensor]], optimised: bool) -> None:
        """The executions' modules; ``optimised``: with folded BatchNorms and, where the first
        layer can be shared, first layers that can read the shared one
        (:class:`SwitchableFirstLayer`)."""
        forced = self.choice.forced
        first = first_layer(model, structure) if optimised and forced != "separate" else None

        def prepared(module: nn.Module) -> nn.Module:
            if optimised:
                fold_batch_norms(module, structure)
            if first is not None:
                parent, _, child = first.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, child,
                        SwitchableFirstLayer(module.get_submodule(first)))
            return module

        # a forced execution builds only its own modules
        self.sequential = None if forced == "fused" else nn.ModuleList(
            prepared(extract_module(model, structure, keep)) for keep in keeps)
        self.fused = None if forced in ("sequential", "separate") else FusedModules(
            [prepared(module) for module in pad_and_extract(model, structure, keeps)])
        self.switches = [] if first is None else [
            module.get_submodule(first) for module in self.sequential or ()]
        group = structure.groups[0]
        self.first_layer = None if first is None else SharedFirstLayer(model, structure, [
            channel_view(keep.get(group.name, torch.ones(group.size, dtype=torch.bool))[None])[0]
            for keep in keeps])

    @torch.no_grad()
    def _agrees_with_masked_modules(self, model: nn.Module, structure: ModelStructure,
                                    masks: Mapping[str, torch.Tensor]) -> bool:
        """Whether every execution built computes the masked modules' logits on a random
        probe."""
        generator = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        x = torch.randn((2, *structure.input_shape[1:]), generator=generator).to(device)
        expected = masked_logits(model, structure,
                                 {name: mask.to(device) for name, mask in masks.items()}, x)
        tolerance = 1e-4 * (1 + float(expected.abs().max()))
        return all(float((run(x) - expected).abs().max()) <= tolerance
                   for run in self.executions().values())

    def executions(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The executions built (name → run), each giving (M, batch, num_classes) logits."""
        runs = {}
        if self.fused is not None:
            runs["fused"] = self.run_fused
        if self.sequential is not None:
            if self.first_layer is not None or self.choice.forced == "sequential":
                runs["sequential"] = self.run_sequential
            if self.choice.forced != "sequential":
                runs["separate"] = self.run_separate
        return runs

    def run_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Every module's base-model logits, (M, batch, num_classes), in one fused pass."""
        if self.first_layer is None:
            return self.fused(x)
        return self.fused(self.first_layer.fused_inputs(self.first_layer(x)), per_module=True)

    def run_sequential(self, x: torch.Tensor) -> torch.Tensor:
        """Every module's base-model logits, (M, batch, num_classes), one module at a time,
        each reading its channels of the shared first layer (where it can be shared: else as
        ``separate``)."""
        if self.first_layer is None:
            return self.run_separate(x)
        inputs = self.first_layer.module_inputs(self.first_layer(x))
        self._read_shared_first_layer(True)
        return torch.stack([module(xi) for module, xi in zip(self.sequential, inputs,
                                                             strict=True)])

    def run_separate(self, x: torch.Tensor) -> torch.Tensor:
        """Every module's base-model logits, (M, batch, num_classes), one module at a time,
        each computing its own first layer."""
        self._read_shared_first_layer(False)
        return torch.stack([module(x) for module in self.sequential])

    def _read_shared_first_layer(self, shared: bool) -> None:
        for switch in self.switches:
            switch.reads_shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if x.device.type != "cpu" and self.choice.forced is None:
            return self.head(self.run_fused(x))
        runs = {name: functools.partial(run, x) for name, run in self.executions().items()}
        return self.head(self.choice.run(runs, x.shape[0]))


def first_layer(model: nn.Module, structure: ModelStructure) -> str | None:
    """The name of ``model``'s first layer where modules can share it, else None: the first
    producer layer of the first group, an ungrouped Conv2d or a Linear called once, on the
    model's input itself, which nothing else reads (modules given the shared layer's output
    as their input could not compute a second layer reading the image)."""
    if not structure.groups:
        return None
    name = structure.groups[0].convs[0]
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear | nn.Conv2d) or getattr(layer, "groups", 1) != 1:
        return None
    reference = next(model.parameters())
    x = torch.zeros((1, *structure.input_shape[1:]), device=reference.device,
                    dtype=reference.dtype)
    readers = _InputReaders(x, layer)
    handles = [layer.register_forward_pre_hook(readers.enter),
               layer.register_forward_hook(readers.leave)]
    try:
        with torch.no_grad(), readers:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return name if readers.layer_reads == [True] and not readers.other_reads else None


class _InputReaders(TorchFunctionMode):
    """Within the block, records whether each call of ``layer`` reads ``x``
    (:attr:`layer_reads`) and counts the operations outside it that compute a tensor from
    ``x`` (:attr:`other_reads`)."""

    def __init__(self, x: torch.Tensor, layer: nn.Module) -> None:
        super().__init__()
        self.x, self.layer = x, layer
        self.inside = False
        self.layer_reads: list[bool] = []
        self.other_reads = 0

    def enter(self, _layer: nn.Module, inputs) -> None:
        self.inside = True
        self.layer_reads.append(inputs[0] is self.x)

    def leave(self, _layer: nn.Module, _inputs, _output) -> None:
        self.inside = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if not self.inside and any(isinstance(leaf, torch.Tensor)
                                   for leaf in pytree.tree_leaves(output)) and any(
                leaf is self.x for leaf in pytree.tree_leaves((args, kwargs))):
            self.other_reads += 1
        return output


def fold_batch_norms(module: nn.Module, structure: ModelStructure) -> None:
    """Fold, in place, each BatchNorm of eval-mode ``module`` (the base model or one cut from
    it, with its layer names) that reads a conv of its group directly into that conv."""
    folded = batch_norm_folding(module, structure)
    with torch.no_grad():
        for name, tensor in folded.tensors.items():
            module.get_parameter(name).copy_(tensor)


class SwitchableFirstLayer(nn.Module):
    """A module's first layer that either passes its input on as its output, the module's
    channels of the shared first layer (``reads_shared``, as the fused modules always do), or
    computes it (the ``separate`` execution); either way with the layer's position mask."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.reads_shared = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reads_shared:
            return self.layer(x)  # its own forward hook applies the position mask
        mask = getattr(self.layer, POSITION_MASK, None)
        return x if mask is None else mask(x)


class ComposedModel(nn.Module):
    """``modules`` restricted to ``classes`` (base-model indices; default: all) fused into one
    network on ``model``'s weights. ``forward`` returns module scores, (batch, |classes|), and
    ``predict`` base-model class indices by the module set's combination rule.

    :meth:`from_parts` composes modules of several module sets and base models instead.
    ``execution`` forces one of :data:`EXECUTIONS` (default: the faster, measured; see
    :class:`FusedModuleSet`).
    """

    def __init__(self, model: nn.Module, modules: ModuleSet,
                 classes: Sequence[int] | None = None, execution: str | None = None) -> None:
        super().__init__()
        chosen = modules.subset(classes) if classes is not None else modules
        self._assemble([FusedModuleSet(model, chosen, execution=execution)],
                       range(len(chosen)), chosen.classes, chosen.combination)

    @classmethod
    def from_parts(cls, parts: Sequence[ComposedPart],
                   combination: str = "argmax") -> ComposedModel:
        """A classifier over ``len(parts)`` classes, class i being ``parts[i]``'s.

        It takes images in [0, 1]; each part normalises them with its base model's
        ``normalization``. Parts with the same model and module-set objects run fused in one
        network. ``forward`` returns the parts' scores in part order, ``predict`` the part
        positions chosen by the combination rule ``combination``.
        """
        if not parts:
            raise ConfigError("a composed model needs at least one part")
        get_combination(combination)
        shapes = {tuple(part.modules.structure.input_shape[1:]) for part in parts}
        if len(shapes) > 1:
            raise ArtifactError(f"composed parts take inputs of different shapes {sorted(shapes)}")
        by_module_set: dict[tuple[int, int], list[int]] = {}
        for position, part in enumerate(parts):
            by_module_set.setdefault((id(part.model), id(part.modules)), []).append(position)
        groups = []
        for positions in by_module_set.values():
            first = parts[positions[0]]
            chosen = first.modules.subset([parts[p].class_index for p in positions])
            groups.append(FusedModuleSet(first.model, chosen, normalization_of(first.modules)))
        # The constructor composes one module set; this is the general case it specialises.
        composed = cls.__new__(cls)
        nn.Module.__init__(composed)
        composed._assemble(groups, [p for positions in by_module_set.values() for p in positions],
                           range(len(parts)), combination)
        return composed

    def _assemble(self, groups: Sequence[FusedModuleSet], positions: Sequence[int],
                  classes: Sequence[int], combination: str) -> None:
        """``groups``' scores, concatenated, hold the scores of ``positions`` in that order."""
        self.groups = nn.ModuleList(groups)
        device = next(itertools.chain(groups[0].parameters(), groups[0].buffers())).device
        self.register_buffer("order", torch.argsort(torch.tensor(list(positions), device=device)))
        self.register_buffer("classes", torch.tensor(list(classes), device=device))
        self.combination = combination

    def train(self, mode: bool = True) -> ComposedModel:
        if mode:
            raise RuntimeError("a composed model runs in eval mode only")
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([group(x) for group in self.groups], dim=1)[:, self.order]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes: base-model class indices, or part positions (from_parts)."""
        return combine_scores(self.combination, self(x), self.classes)


def normalization_of(modules: ModuleSet) -> Mapping[str, Sequence[float]]:
    normalization = modules.base.get("normalization")
    if not normalization or not {"mean", "std"} <= set(normalization):
        raise ArtifactError(
            f"the {modules.approach} modules of {modules.base.get('arch')} on "
            f"{modules.base.get('dataset')} record no input normalisation of their base model "
            "(base['normalization'] = {'mean': [...], 'std': [...]}); composing parts of "
            "different models normalises each part's input with its own base model's "
            "statistics")
    return normalization

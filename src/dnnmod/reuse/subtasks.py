"""E5, sub-task reuse (the MwT/MODA protocol): one module set reused for every sub-task T of its
classes, a subset of size 2..N, scored against the base model restricted to T and costed
against |T|.

What is computed once per module set and reused for every sub-task:

- the scores of all N modules on the test images, in one batched masked pass
  (:func:`~dnnmod.modules.metrics.module_scores`), and the logits of the base model the
  approach decomposed and of the standard-trained (ST) model of the same architecture. T's
  *composed* prediction is the set's combination rule over T's columns of the scores
  (:func:`~dnnmod.modules.combination.combine_scores`; one score per module, or k per module
  as for voting), on the test images of T's classes; the base model restricted to T predicts
  the argmax over T's logit columns on the same images. No network is rebuilt or rerun per
  sub-task: a module's score does not depend on which other modules are composed with it.
- the parameters and FLOPs of T's *union network* (:func:`~dnnmod.modules.union.union_network`:
  the OR of T's masks, extracted, logit rows of T; as the approach's authors deploy it, so
  MwT's without its mask generators, against the model without them, the ST model's size),
  from T's kept-channel counts per group (:class:`UnionCosts`; equal to counting the built
  network, tested), and the sizes of the
  separate extracted modules (:func:`~dnnmod.modules.metrics.module_costs`), summed over T:
  union cost is what MwT and MODA deploy, the separate sum what splitter-style composition
  (each module a network of its own) deploys.

MwT and MODA compose a sub-task as the union network itself; its outputs depend on T, so it
is built and run per sub-task, on a seeded sample of the sub-tasks spread over the sizes
(``union_subsets``; 0 for approaches that do not compose so), as the authors reuse it (the
approach's :meth:`~dnnmod.approaches.base.Approach.reuse_network`: MwT removes its mask
generators). ``union_accuracy``: the union network with T's logit rows, argmax (MODA's
composition, which is never fine-tuned; MwT's union module before fine-tuning).
``finetuned_accuracy``, for an approach whose authors fine-tune (``fine_tunes_union``: MwT):
the union network with all N logits, a ReLU and a fresh Linear(N→|T|) head
(:func:`~dnnmod.modules.union.union_classifier`), every parameter trained on T's training
images with MwT's recipe (``fine_tune_*``, defaults from modularizer.py's
``fine_tune_module``: 10 epochs, SGD lr 0.05, momentum 0.9, Nesterov, no weight decay, batch
128, cosine annealing over 20 epochs, random crop + flip). Deviations from MwT's code: the last
epoch is kept (MwT keeps the epoch of best *test* accuracy; the MODA authors' fork of MwT keeps
the last), the crop pads with the dataset's mean colour (:func:`~dnnmod.training.train.augment`)
and CUDA runs in mixed precision, as every dnnmod training does.

Sub-tasks: every subset of size 2..N when there are at most ``max_subsets`` of them (1,013 for
N = 10), else a seeded sample of ``samples_per_size`` subsets of each size (all of a size that
has no more). The draw depends on N and ``seed`` only, so every approach and model of a study
is scored on the same sub-tasks.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dnnmod.approaches import APPROACHES, get_approach
from dnnmod.approaches.base import Approach
from dnnmod.artifacts import atomic_write, write_json
from dnnmod.errors import ConfigError
from dnnmod.hyperparameters import Range, resolve
from dnnmod.modules.combination import combine_scores
from dnnmod.modules.extract import extract_module, layer_flops
from dnnmod.modules.inference import run
from dnnmod.modules.masking import channel_view
from dnnmod.modules.metrics import module_costs, module_scores
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import ModelStructure
from dnnmod.modules.union import union_classifier, union_network
from dnnmod.report.subtasks import COLUMNS
from dnnmod.training.train import AUGMENTATIONS, Recipe, fine_tune

log = logging.getLogger(__name__)

#: settings of one E5 unit (config ``reuse.subtasks`` without ``union_approaches``)
DEFAULTS: dict[str, Any] = {
    "max_subsets": 1013,        # all subsets of size 2..N when there are at most this many
    "samples_per_size": 10,     # else this many seeded subsets per size
    "seed": 0,                  # of the subset draws (the same sub-tasks for every unit)
    "union_subsets": 0,         # sub-tasks whose union network is built, run and fine-tuned
    # MwT's fine-tuning of a sub-task's union network (modularizer.py, fine_tune_module)
    "fine_tune_epochs": 10,
    "fine_tune_lr": 0.05,
    "fine_tune_batch_size": 128,
    "fine_tune_momentum": 0.9,
    "fine_tune_nesterov": True,
    "fine_tune_weight_decay": 0.0,
    "fine_tune_cosine_epochs": 20,  # T_max: twice the epochs, so the lr ends near half
    "fine_tune_augmentation": ["crop", "flip"],
}
CONSTRAINTS = {"max_subsets": Range(0), "samples_per_size": Range(1), "seed": Range(0),
               "union_subsets": Range(0), "fine_tune_epochs": Range(0),
               "fine_tune_lr": Range(0, low_open=True), "fine_tune_batch_size": Range(1),
               "fine_tune_momentum": Range(0), "fine_tune_weight_decay": Range(0),
               "fine_tune_cosine_epochs": Range(1)}


def resolve_settings(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`DEFAULTS` overridden by ``overrides``; ConfigError naming a bad key or value."""
    settings = resolve("reuse.subtasks", DEFAULTS, overrides, CONSTRAINTS)
    augmentation = settings["fine_tune_augmentation"]
    if not all(isinstance(entry, str) and entry in AUGMENTATIONS for entry in augmentation):
        raise ConfigError(f"reuse.subtasks.fine_tune_augmentation: expected entries among "
                          f"{list(AUGMENTATIONS)}, got {augmentation!r}")
    return settings


def fine_tune_recipe(settings: Mapping[str, Any]) -> Recipe:
    """The recipe of a union network's fine-tuning, from resolved ``settings``."""
    return Recipe(epochs=settings["fine_tune_epochs"], batch_size=settings["fine_tune_batch_size"],
                  lr=settings["fine_tune_lr"], momentum=settings["fine_tune_momentum"],
                  nesterov=settings["fine_tune_nesterov"],
                  weight_decay=settings["fine_tune_weight_decay"], schedule="cosine",
                  augmentation=tuple(settings["fine_tune_augmentation"]))


def subset_count(num_classes: int) -> int:
    """Number of subsets of size 2..N of N classes: 2^N - N - 1 (1,013 for N = 10)."""
    return 2 ** num_classes - num_classes - 1


def choose_subsets(num_classes: int, max_subsets: int, samples_per_size: int,
                   seed: int) -> tuple[list[tuple[int, ...]], bool]:
    """The sub-tasks (sorted tuples of positions 0..N-1, by size, then lexicographic) and
    whether they are every subset of size 2..N (else a seeded sample per size)."""
    if num_classes < 2:
        raise ConfigError(f"sub-task reuse needs at least 2 classes, got {num_classes}")
    if subset_count(num_classes) <= max_subsets:
        return [subset for size in range(2, num_classes + 1)
                for subset in itertools.combinations(range(num_classes), size)], True
    rng = np.random.default_rng(seed)
    subsets = []
    for size in range(2, num_classes + 1):
        available = math.comb(num_classes, size)
        if available <= 4 * samples_per_size:  # few enough to list, then draw without replacement
            every = list(itertools.combinations(range(num_classes), size))
            picked = [every[i] for i in sorted(rng.choice(available, min(samples_per_size,
                                                                          available),
                                                          replace=False))]
        else:
            drawn: set[tuple[int, ...]] = set()
            while len(drawn) < samples_per_size:
                drawn.add(tuple(sorted(rng.choice(num_classes, size, replace=False).tolist())))
            picked = sorted(drawn)
        subsets += picked
    return subsets, False


def spread_sample(subsets: Sequence[tuple[int, ...]], count: int, seed: int) -> list[int]:
    """Indices of ``count`` of ``subsets``, drawn (seeded) one size at a time in turn, so the
    sample covers every size before it takes a second sub-task of any."""
    rng = np.random.default_rng(seed)
    by_size: dict[int, list[int]] = {}
    for index, subset in enumerate(subsets):
        by_size.setdefault(len(subset), []).append(index)
    pools = {size: [indices[i] for i in rng.permutation(len(indices))]
             for size, indices in sorted(by_size.items())}
    chosen: list[int] = []
    while len(chosen) < min(count, len(subsets)):
        for pool in pools.values():
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return sorted(chosen)


class UnionCosts:
    """Parameters and FLOPs of union networks, from kept-channel counts per group.

    Extraction removes whole channels (units), and every parameter tensor dimension shrinks by
    a fixed number of elements per channel dropped from a group it depends on (1 for a conv's
    or norm's channels, H·W for the Linear layer reading a flattened feature map, one per
    concatenated group). One extraction per group with one channel dropped measures those
    numbers; afterwards a union network's size is the product of its tensors' dimensions,
    exact, for any kept counts, without building it. A Conv2d's or Linear's FLOPs are
    proportional to its weight's elements at a fixed input size, so each layer's share of the
    base model's FLOPs scales with its weight. The logit layer keeps |T| rows.

    ``reuse`` (the approach's :meth:`~dnnmod.approaches.base.Approach.reuse_network`) gives
    the network as its authors deploy it: the parameters and layers it removes (MwT's mask
    generators) count neither in a union network nor in the base model, so MwT's fractions are
    of the model without generators, the ST model's size, as its authors count them.
    """

    def __init__(self, model: nn.Module, structure: ModelStructure,
                 reuse: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.structure = structure
        self.group_sizes = {group.name: group.size for group in structure.groups}
        deployed = _deployed_parameters(model, reuse)
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()
                       if name in deployed}
        #: tensor name → per dimension {group name: elements removed per dropped channel}
        self.shrink: dict[str, list[dict[str, int]]] = {
            name: [{} for _ in shape] for name, shape in self.shapes.items()}
        for group in structure.groups:
            if group.size < 2:  # a union network keeps at least one channel: always whole
                continue
            keep = {group.name: torch.arange(group.size) > 0}
            pruned = dict(extract_module(model, structure, keep).named_parameters())
            for name, shape in self.shapes.items():
                for dim, (full, left) in enumerate(zip(shape, pruned[name].shape, strict=True)):
                    if left != full:
                        self.shrink[name][dim][group.name] = full - left
        self.output_tensors = {f"{structure.output_layer}.{kind}" for kind in ("weight", "bias")}
        self.base_params = sum(math.prod(shape) for shape in self.shapes.values())
        removed = {name.removesuffix(".weight") for name, _ in model.named_parameters()
                   if name.endswith(".weight") and name not in deployed}
        flops = {layer: count for layer, count in
                 layer_flops(model, tuple(structure.input_shape)).items() if layer not in removed}
        self.base_flops = sum(flops.values())
        #: FLOPs per weight element of each leaf layer that counts any
        self.flops_per_weight = {
            f"{layer}.weight": count / math.prod(self.shapes[f"{layer}.weight"])
            for layer, count in flops.items() if f"{layer}.weight" in self.shapes}
        self.fixed_flops = self.base_flops - sum(
            flops[name.removesuffix(".weight")] for name in self.flops_per_weight)

    def counts(self, kept: Mapping[str, int], outputs: int) -> tuple[int, float]:
        """Parameters and FLOPs of the union network keeping ``kept[group]`` channels of each
        group (absent groups whole) and ``outputs`` logit rows."""
        params, flops = 0, float(self.fixed_flops)
        for name, shape in self.shapes.items():
            dims = []
            for dim, full in enumerate(shape):
                if dim == 0 and name in self.output_tensors:
                    dims.append(outputs)
                    continue
                dims.append(full - sum(per_channel * (self.group_sizes[group] - kept[group])
                                       for group, per_channel in self.shrink[name][dim].items()
                                       if group in kept))
            elements = math.prod(dims)
            params += elements
            flops += elements * self.flops_per_weight.get(name, 0.0)
        return params, flops

    def fractions(self, kept: Mapping[str, int], outputs: int) -> tuple[float, float]:
        """:meth:`counts` as fractions of the base model's parameters and FLOPs."""
        params, flops = self.counts(kept, outputs)
        return params / self.base_params, flops / self.base_flops


def _deployed_parameters(model: nn.Module, reuse: Callable[[nn.Module], nn.Module] | None
                         ) -> set[str]:
    """Names of ``model``'s parameters that ``reuse`` (applied to a copy) keeps."""
    if reuse is None:
        return {name for name, _ in model.named_parameters()}
    copy = deepcopy(model)
    named = dict(copy.named_parameters())
    kept = {id(parameter) for parameter in reuse(copy).parameters()}
    return {name for name, parameter in named.items() if id(parameter) in kept}


class KeptChannels:
    """Each module's kept channels (channel view) of every masked group, concatenated, so the
    kept channels of a union of modules are counted per group with one reduction."""

    def __init__(self, modules: ModuleSet) -> None:
        masks = {name: channel_view(mask).cpu() for name, mask in modules.masks.items()}
        self.names = list(masks)
        self.kept = torch.cat([*masks.values(), torch.zeros(len(modules), 0, dtype=torch.bool)],
                              dim=1)
        sizes = torch.tensor([mask.shape[1] for mask in masks.values()], dtype=torch.long)
        #: (channels, groups): 1 where a channel belongs to a group
        self.owner = torch.repeat_interleave(torch.eye(len(self.names)), sizes, dim=0)

    def union(self, positions: Sequence[int]) -> dict[str, int]:
        """Group name → channels kept by any of the modules at ``positions``."""
        counts = self.kept[list(positions)].any(dim=0).float() @ self.owner
        return dict(zip(self.names, counts.long().tolist(), strict=True))


def _restricted_accuracy(logits: torch.Tensor, classes: torch.Tensor,
                         labels: torch.Tensor) -> float:
    """Accuracy (%) of the argmax over ``classes``' logit columns: a model restricted to T."""
    return _accuracy(classes[logits[:, classes].argmax(dim=1)], labels)


def evaluate_subtasks(model: nn.Module, modules: ModuleSet, data, settings: Mapping[str, Any],
                      *, st_model: nn.Module | None = None, seed: int = 0
                      ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """E5 for one module set: one row per sub-task (the columns of
    :data:`~dnnmod.report.subtasks.COLUMNS` from ``subset`` on) and a record of the run
    (sub-task count, whether exhaustive, seconds spent on the shared passes, the per-sub-task
    loop and the union networks).

    ``model`` is the base model the set was cut from; ``st_model`` the ST model of the same
    architecture (``model`` itself when the approach decomposes the ST model; None: no ST
    column). ``data`` are its dataset splits (test images scored; training images fine-tune
    union heads). ``seed`` seeds fine-tuning.
    """
    settings = resolve_settings(settings)
    started = time.perf_counter()
    test = data.test
    scores = module_scores(model, modules, test)
    logits = run(model, test)
    if st_model is None or st_model is model:
        st_logits = None if st_model is None else logits
    else:
        st_logits = run(st_model, test)
    approach = APPROACHES.get(modules.approach)
    reuse = None if approach is None else approach.reuse_network
    costs = UnionCosts(model, modules.structure, reuse)
    separate = module_costs(model, modules, reuse)
    shared_seconds = time.perf_counter() - started

    classes = torch.tensor(modules.classes, device=test.labels.device)
    rows_of = {c: (test.labels == c).nonzero().flatten() for c in modules.classes}
    kept = KeptChannels(modules)
    subsets, exhaustive = choose_subsets(len(modules), settings["max_subsets"],
                                         settings["samples_per_size"], settings["seed"])
    union_sample = set(spread_sample(subsets, settings["union_subsets"], settings["seed"]))
    if union_sample:
        approach = get_approach(modules.approach)  # an unknown name fails here
        _check_union_networks(model, modules)

    loop_started, union_total, records = time.perf_counter(), 0.0, []
    for index, positions in enumerate(subsets):
        subset_started = time.perf_counter()
        chosen = classes[list(positions)]
        rows = torch.cat([rows_of[int(c)] for c in chosen])
        labels = test.labels[rows]
        predicted = combine_scores(modules.combination, scores[rows][:, list(positions)], chosen)
        params, flops = costs.fractions(kept.union(positions), len(positions))
        record = {
            "subset": "-".join(str(int(c)) for c in chosen), "size": len(positions),
            "test_images": len(rows),
            "composed_accuracy": _accuracy(predicted, labels),
            "base_accuracy": _restricted_accuracy(logits[rows], chosen, labels),
            "st_accuracy": math.nan if st_logits is None
            else _restricted_accuracy(st_logits[rows], chosen, labels),
            "params_fraction": params, "flops_fraction": flops,
            "separate_params_fraction": sum(separate[p]["size_fraction"] for p in positions),
            "separate_flops_fraction": sum(separate[p]["flops_fraction"] for p in positions),
            "union_accuracy": math.nan, "finetuned_accuracy": math.nan,
            "seconds": time.perf_counter() - subset_started, "union_seconds": math.nan,
        }
        if index in union_sample:
            union_started = time.perf_counter()
            record["union_accuracy"], record["finetuned_accuracy"] = _union_accuracies(
                model, modules, approach, data, chosen.tolist(), settings, seed)
            record["union_seconds"] = time.perf_counter() - union_started
            union_total += record["union_seconds"]
            finetuned = record["finetuned_accuracy"]
            log.info("union network %s: %.2f%% %s (%.1f s)", record["subset"],
                     record["union_accuracy"], "(not fine-tuned)" if math.isnan(finetuned)
                     else f"without fine-tuning, {finetuned:.2f}% with it",
                     record["union_seconds"])
        records.append(record)
    loop_seconds = time.perf_counter() - loop_started - union_total
    summary = {"subsets": len(subsets), "exhaustive": exhaustive,
               "union_subsets": len(union_sample), "shared_seconds": shared_seconds,
               "subsets_seconds": loop_seconds, "union_seconds": union_total,
               "settings": settings}
    return pd.DataFrame(records), summary


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    if not len(labels):  # a sub-task none of whose classes has a test image
        return math.nan
    return 100.0 * (predicted == labels).float().mean().item()


def _check_union_networks(model: nn.Module, modules: ModuleSet) -> None:
    layer = modules.structure.output_layer
    if not isinstance(model.get_submodule(layer), nn.Linear):
        raise ConfigError(f"reuse.subtasks.union_subsets: union networks restrict a Linear "
                          f"logit layer to T's rows; {modules.base.get('arch')}'s logit layer "
                          f"{layer} is a {type(model.get_submodule(layer)).__name__} (set "
                          "union_subsets to 0 for this approach)")


def _union_accuracies(model: nn.Module, modules: ModuleSet, approach: Approach, data,
                      classes: list[int], settings: Mapping[str, Any], seed: int
                      ) -> tuple[float, float]:
    """Test accuracy (%) of the union network of ``classes`` as ``approach``'s authors reuse
    it: with T's logit rows, and fine-tuned with a ReLU + Linear head (NaN where the authors
    do not fine-tune, or ``fine_tune_epochs`` is 0)."""
    test = data.test.subset(classes)  # labels 0..|T|-1 in ``classes`` order, as its outputs
    network = approach.reuse_network(union_network(model, modules, classes))
    without = _accuracy(run(network, test).argmax(dim=1), test.labels)
    if not approach.fine_tunes_union or settings["fine_tune_epochs"] == 0:
        return without, math.nan
    torch.manual_seed(seed)  # the head's initialisation
    classifier = union_classifier(model, modules, classes, approach.reuse_network)
    device = str(next(model.parameters()).device)
    fine_tune(classifier, data.train.subset(classes), fine_tune_recipe(settings), seed=seed,
              device=device, cosine_epochs=settings["fine_tune_cosine_epochs"])
    return without, _accuracy(run(classifier, test).argmax(dim=1), test.labels)


def check_st_model(st_meta: Mapping[str, Any], model_meta: Mapping[str, Any],
                   source: str) -> None:
    """Raise ConfigError unless ``st_meta`` (read from ``source``) describes a standard-trained
    model of the same architecture, width, options, dataset and seed as ``model_meta``."""
    if st_meta.get("training") != "st":
        raise ConfigError(f"{source}: a model of training kind {st_meta.get('training')!r}; "
                          "the ST column needs a standard-trained ('st') model")
    differing = [key for key in ("arch", "width", "options", "dataset", "num_classes", "seed")
                 if st_meta.get(key) != model_meta.get(key)]
    if differing:
        raise ConfigError(
            f"{source}: not the ST model of the decomposed one ({model_meta.get('arch')} on "
            f"{model_meta.get('dataset')}, seed {model_meta.get('seed')}); differing: "
            f"{', '.join(f'{k} {st_meta.get(k)!r} vs {model_meta.get(k)!r}' for k in differing)}")


def write_subtasks(path: Path, frame: pd.DataFrame, summary: Mapping[str, Any],
                   model_meta: Mapping[str, Any], modules: ModuleSet, device: str) -> None:
    """Write the per-sub-task rows of one unit as ``path`` (CSV,
    :data:`~dnnmod.report.subtasks.COLUMNS`) and the run record as the JSON beside it, both
    atomically."""
    identity = {"approach": modules.approach, "training": model_meta["training"],
                "model": model_meta.get("model", model_meta["arch"]),
                "arch": model_meta["arch"], "dataset": model_meta["dataset"],
                "seed": modules.provenance["seed"], "device": device}
    table = frame.assign(**identity)[COLUMNS]
    path = Path(path)
    with atomic_write(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(path.with_suffix(".json"), {**identity, **summary})

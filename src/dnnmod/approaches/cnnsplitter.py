"""CNNSplitter (Qi et al., ASE 2022 / TOSEM 2023): modules found by a genetic search over
groups of kernels.

Search space. For class c, the kernels of each conv channel group (coupled layers are one
group, so they share genes) are sorted by their importance for c and cut into contiguous
groups: ``small_layer_groups`` (10) for a group of fewer than ``large_layer_kernels`` (256)
kernels, ``large_layer_groups`` (100) otherwise, fewer when the layer has fewer kernels. One
gene (bit) per group, 1 = keep it. Importance = the mean L1 norm of the kernel's post-ReLU map
over validation images of class c predicted as c with confidence >= ``confidence``
(:func:`~dnnmod.modules.activations.activation_statistics`, ``l1``).

Initial population. Layer sensitivity: each group alone keeps the top int(size × r) kernels
of every module (all other layers whole; at least one) and the modules are composed on the
validation images (:func:`layer_sensitivity`). With ``keep_ratios: listed`` only r =
``sensitivity_ratio`` is scored, and the composed accuracy dropping more than
``sensitivity_margin_pp`` below the base model's marks the layer sensitive; the keep ratios
are ``sensitive_keep_ratios`` and ``other_keep_ratios`` as given. With ``keep_ratios: sweep``
the layer sensitivity sweep of the authors' analyser (r = 0.1, ..., 1.0 for every layer; the
workflow's ``cnnsplitter_layer_sensitivity`` step, read from ``layer_sensitivity``) gives the
sensitive layers and both lists (:func:`keep_ratios_from_sweep`, which states the rule). Per
solution and layer a keep ratio is drawn from its list and floor(groups × ratio) groups are
activated, drawn without replacement with probability ∝ exp((groups − 1 − rank) / 10).

Search. One population per class, bred with DEAP's operators: the ``parents`` best solutions
(steady-state selection) are paired at random, crossed at one point, and every gene of a child
is reset to a random bit with probability ``mutation_rate``; the ``elites`` best solutions
survive unchanged. Every solution of class c runs the base model with its kernels and emits
only its class's logit (no head, no retraining); the N populations are scored together by
composition (:func:`score_compositions`), and the generation whose best composition has the
highest α·acc + (1 − α)·diff on validation is the result.

Speed (spec's performance decision): a class's population runs as P channel masks through the
one inference path (:func:`~dnnmod.modules.inference.run`): on a CPU each solution as its
kept-channel sub-network (:func:`~dnnmod.modules.inference.kept_channel_pass`: weights sliced
by index, no network built), elsewhere chunks of solutions at once as grouped convs over their
kept channels (:class:`~dnnmod.modules.grouped_pass.GroupedKeptPass`, at most 1.21x the
kept channels' multiplications; the batched masked pass computed about 3.5x), chunked over
images and modules. Each distinct solution runs once: its own-class logits are cached on the
model's device and carried to the next generation (elites are not run again), and all
compositions are scored from the cached logits with tensor operations on that device.

Deviations from the paper and the reference implementation, all deliberate:
- Sensitive layers and keep ratios are chosen by a rule, not by hand: the authors read their
  r = 0.1..1.0 curves and wrote each model's lists (configures/*.py). With ``keep_ratios:
  listed`` the sensitive layers are those losing more than a margin at r =
  ``sensitivity_ratio``; with ``sweep`` the rule of :func:`keep_ratios_from_sweep` sets both.
- A class with no validation image predicted as itself with confidence >= ``confidence``
  falls back to its correctly predicted images, then to all its images; the basis used per
  class is recorded in the provenance (``importance_basis``). A channel group no ReLU carries
  keeps its kernels in index order (importance 0). Residual groups with several ReLU sites
  average their sites' L1 norms.
- A solution whose genes would drop a whole layer gets that layer's most important group
  back (a module cannot have an empty layer), after initialisation and after variation.
- Mutation resets each gene with probability ``mutation_rate`` (DEAP's ``mutUniformInt``), so
  ``mutation_rate`` × genes are reset on average rather than exactly that many.
- Hierarchical pruning, as the reference implementation does it: the classes are shuffled
  every generation (a permutation seeded by the seed and the generation; the reference
  shuffles them with Python's random, seeded once) and composed pairwise in that order
  ((c0,c1), (c2,c3), ...; an odd one out joins at the next level), all combinations of the two
  parts' surviving compositions are
  scored on the validation images of their classes (a tie between the true and another
  module's logit counts as a miss), and the most accurate survive: as many as reach the
  level's accuracy threshold (``accuracy_thresholds`` for pairs, 4 and 8 classes, the last
  entry for deeper levels, ``final_accuracy_threshold`` for the N-class level), but at least
  ``survivors[0]`` and at most ``survivors[1]``. Fitness orders the survivors, and the best
  composition of the previous generation (its solutions are the first elites) always survives.
- A solution's fitness is the best fitness of the surviving N-class compositions containing it.
  The reference gives every other solution 0; here the DEAP fitness (classes in the largest
  surviving composition a solution is in, its best fitness there; compared lexicographically)
  also ranks the solutions that survived only the lower levels, above those that survived none
  (0, 0).
- The accuracy weight is α in generation 0 and α + max(0, γ − acc_prev_best) after it, as
  the reference's recorder sets it; acc_prev_best is the accuracy of the previous generation's
  best (fittest) composition.
- Generation 0 is the initial population; ``generations`` breedings follow it.
- Selection images. The reference scores fitness and selects the generation on the whole
  validation split (module_recorder.py: the validation part of the training set, not test
  images), as dnnmod does by default. Deviation, only with ``fitness_samples`` below the
  split's size (a reduction for small budgets): fitness is scored on that sample and the
  generation is selected by the accuracy of each generation's best composition on the
  validation images the search never scored (at most ``selection_samples`` of them;
  ``selection_accuracy`` in the logbook). The images the
  search scores cannot show that it fits them: the fittest composition survives every
  generation, and on the demo's 150 images its accuracy stayed at 98.7 % while test accuracy
  fell after generation 10, so selecting on them picked the last generation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from deap import base, tools
from torch import nn

from dnnmod.approaches.base import Approach, Decomposition, RunContext
from dnnmod.artifacts import config_hash
from dnnmod.errors import ConfigError
from dnnmod.modules.activations import activation_statistics
from dnnmod.modules.grouped_pass import GroupedKeptPass
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.inference import kept_channel_pass, run
from dnnmod.modules.masking import KeptChannelPass
from dnnmod.modules.metrics import PER_LAYER_KRR, layer_kernel_retention
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import ModelStructure, trace_structure
from dnnmod.resumable import ResumableLoop

DEFAULTS: dict[str, Any] = {
    "population": 100,          # solutions per class
    "generations": 200,         # breedings after the initial population
    "parents": 50,              # best solutions bred (steady-state selection)
    "elites": 20,               # best solutions kept unchanged
    "mutation_rate": 0.05,      # probability of resetting a gene (0.1 for SVHN in the paper)
    "alpha": 0.9,               # weight of accuracy vs kernel-set difference
    "gamma": 0.9,               # accuracy target of the adaptive weight (0.95 for SVHN)
    # composition pruning per level: at least/at most this many survive, the most accurate...
    "survivors": [50, 500],
    # ...and within those bounds, all that reach the level's accuracy: pairs, 4 classes, 8 (and
    # on); the N-class level's (the reference's SimCNN/CIFAR-10 thresholds)
    "accuracy_thresholds": [0.95, 0.95, 0.85],
    "final_accuracy_threshold": 0.8,
    "small_layer_groups": 10,   # genes of a layer with fewer than large_layer_kernels kernels
    "large_layer_groups": 100,  # genes of a larger layer
    "large_layer_kernels": 256,
    "confidence": 0.9,          # importance: images predicted as their class this surely
    "sensitivity_ratio": 0.5,   # kernels each layer keeps in the sensitivity analysis
    "sensitivity_margin_pp": 5.0,  # accuracy drop (pp) that marks a layer sensitive
    "sensitive_keep_ratios": [0.6, 0.7, 0.8],
    "other_keep_ratios": [0.4, 0.5, 0.6, 0.7],
    # "listed": the two lists above, sensitive layers at sensitivity_ratio; "sweep": both
    # lists and the sensitive layers from the layer sensitivity sweep (keep_ratios_from_sweep)
    "keep_ratios": "listed",
    # the sweep "sweep" reads: {"base_accuracy", "ratios", "accuracy": {group: [% per
    # ratio]}}, the cnnsplitter_layer_sensitivity step's (dnnmod modularize
    # --layer-sensitivity fills it in)
    "layer_sensitivity": None,
    "grouping": "importance",   # ablation: "random" cuts randomly ordered kernels into groups
    "initialisation": "heuristic",  # ablation: "random" draws every gene uniformly
    "fitness_samples": None,    # validation images scored per generation (None: all)
    # of the validation images fitness does not score, those that select the generation
    # (None: all of them)
    "selection_samples": None,
}
GROUPINGS = ("importance", "random")
KEEP_RATIO_SOURCES = ("listed", "sweep")
#: the ratios the authors' analyser keeps of each layer (layer_sensitivity_analyzer.py)
SWEEP_RATIOS = tuple(k / 10 for k in range(1, 11))
INITIALISATIONS = ("heuristic", "random")
#: the models (arch, options) the CNNSplitter papers decompose: GradSplitter's SimCNN, ResCNN and
#: InceCNN (BatchNorm) and CNNSplitter's own BatchNorm-free SimCNN and ResCNN (config.yaml's
#: cnnsplitter_simcnn and cnnsplitter_rescnn)
PAPER_MODELS = (("simcnn", {}), ("rescnn", {}), ("incecnn", {}),
                ("simcnn", {"batch_norm": False, "hidden_features": 512}),
                ("rescnn", {"batch_norm": False, "dropout": 0.4}))

log = logging.getLogger(__name__)


class _Fitness(base.Fitness):
    """(classes of the largest composition the solution was scored in, best fitness there)."""

    weights = (1.0, 1.0)


class Solution(list):
    """One candidate module's genes with its DEAP fitness. A plain class on purpose:
    ``deap.creator`` types are process-global and would leak between runs."""

    def __init__(self, genes: Sequence[int] = ()) -> None:
        super().__init__(genes)
        self.fitness = _Fitness()


@dataclass(frozen=True)
class GeneLayout:
    """Where each class's kernels sit in a gene vector.

    Attributes:
        groups: conv channel group names, in forward order (one gene layer each).
        genes_per_group: genes of each layer.
        kernel_gene: group → (N, size) long tensor: for class position c, the gene index
            (in the whole vector) that keeps each kernel of the group.
    """

    groups: tuple[str, ...]
    genes_per_group: tuple[int, ...]
    kernel_gene: dict[str, torch.Tensor]

    @property
    def length(self) -> int:
        return sum(self.genes_per_group)

    def layer_slices(self) -> list[slice]:
        bounds = np.cumsum([0, *self.genes_per_group]).tolist()
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def decode(self, genes: torch.Tensor, position: int) -> dict[str, torch.Tensor]:
        """Channel masks (P, size) per group of class ``position``'s solutions (P, genes)."""
        kept = genes.bool()
        return {group: kept[:, self.kernel_gene[group][position]] for group in self.groups}

    def kernel_sets(self, genes: torch.Tensor, position: int) -> torch.Tensor:
        """(P, kernels) bool: every kernel each solution keeps, groups concatenated."""
        return torch.cat(list(self.decode(genes, position).values()), dim=1)


def genes_for(size: int, hyperparameters: Mapping[str, Any]) -> int:
    """Gene count of a layer of ``size`` kernels."""
    large = size >= hyperparameters["large_layer_kernels"]
    count = hyperparameters["large_layer_groups" if large else "small_layer_groups"]
    return min(count, size)


def gene_layout(structure: ModelStructure, order: Mapping[str, torch.Tensor],
                hyperparameters: Mapping[str, Any]) -> GeneLayout:
    """Genes of kernels ranked by ``order`` (group → (N, size): kernel indices, most important
    first, per class): each layer's ranks cut into contiguous groups, one gene per group."""
    groups, counts, kernel_gene, offset = [], [], {}, 0
    for group in structure.conv_groups:
        count = genes_for(group.size, hyperparameters)
        gene_of_rank = torch.cat([torch.full((len(part),), offset + gene, dtype=torch.long)
                                  for gene, part in enumerate(
                                      torch.arange(group.size).tensor_split(count))])
        ranks = order[group.name]
        kernel_gene[group.name] = torch.empty_like(ranks).scatter_(
            1, ranks, gene_of_rank.expand_as(ranks).contiguous())
        groups.append(group.name)
        counts.append(count)
        offset += count
    return GeneLayout(tuple(groups), tuple(counts), kernel_gene)


def kernel_importance(model: nn.Module, structure: ModelStructure, images, num_classes: int,
                      confidence: float) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """Group → (N, size) importance of each kernel per class, and the images each class's
    importance rests on ("confident", else "correct", else "all" of its images)."""
    probabilities = run(model, images).softmax(1)
    surety, predicted = probabilities.max(1)
    labels = images.labels.to(predicted.device)
    chosen, basis = [], {}
    for label in range(num_classes):
        own = labels == label
        candidates = (("confident", own & (predicted == label) & (surety >= confidence)),
                      ("correct", own & (predicted == label)), ("all", own))
        basis[label], keep = next(((name, keep) for name, keep in candidates if keep.any()),
                                  candidates[-1])
        chosen.append(keep.nonzero().flatten())
    # activation_statistics names any class without a single image
    subset = images.take(torch.cat(chosen).sort().values.to(images.labels.device))
    statistics = activation_statistics(model, structure, subset, classes=range(num_classes))
    view = statistics.group_view("l1", "mean")
    importance = {group.name: view.get(group.name, torch.zeros(num_classes, group.size)).float()
                  for group in structure.conv_groups}
    return importance, basis


def layer_sensitivity(model: nn.Module, structure: ModelStructure, images,
                      order: Mapping[str, torch.Tensor], ratios: Sequence[float],
                      kept_pass: KeptChannelPass | GroupedKeptPass | None = None
                      ) -> dict[str, list[float]]:
    """Group → composed accuracy (%) at each of ``ratios`` when that layer alone keeps the top
    int(size × ratio) kernels (at least one; the authors' rounding) of every module by its
    class's importance ``order``, all other layers whole, the modules composed by the argmax
    of their own-class logits (layer_sensitivity_analyzer.py). All settings run as the masks of
    one pass (module (setting, c) masks only that setting's layer); a layer kept whole is the
    base model, whose composition is scored once."""
    groups = structure.conv_groups
    classes = next(iter(order.values())).shape[0]
    labels = images.labels.cpu()
    # as the search's base accuracy (search_inputs), so a layer kept whole reads the same
    whole = 100.0 * (run(model, images).argmax(1).cpu() == labels).float().mean().item()
    settings = [(group, max(1, int(group.size * ratio))) for group in groups for ratio in ratios]
    pruned = [(group, kept) for group, kept in settings if kept < group.size]
    masks = {group.name: torch.ones(len(pruned), classes, group.size, dtype=torch.bool)
             for group in groups}
    for index, (group, kept) in enumerate(pruned):
        masks[group.name][index] = torch.zeros(classes, group.size, dtype=torch.bool).scatter_(
            1, order[group.name][:, :kept], True)
    accuracy = iter([])
    if pruned:
        head = OwnLogitHead(list(range(classes)) * len(pruned), classes)
        scores = run(model, images, structure=structure, head=head, kept_pass=kept_pass,
                     masks={name: mask.flatten(0, 1) for name, mask in masks.items()}).cpu()
        predicted = scores.view(len(images), len(pruned), classes).argmax(2)
        accuracy = iter((100.0 * (predicted == labels[:, None]).double().mean(0)).tolist())
    sweep: dict[str, list[float]] = {group.name: [] for group in groups}
    for group, kept in settings:
        sweep[group.name].append(next(accuracy) if kept < group.size else whole)
    return sweep


def keep_ratios_from_sweep(sweep: Mapping[str, Any], groups: Sequence[str],
                           hyperparameters: Mapping[str, Any]
                           ) -> tuple[list[bool], list[float], list[float]]:
    """Sensitive layers (in ``groups`` order), sensitive and other keep ratios from a layer
    sensitivity sweep ({"base_accuracy", "ratios", "accuracy": {group: [% per ratio]}}).

    The authors chose them by hand from their curves (configures/*.py; the paper gives no
    rule). The rule here is fitted to their six published settings:
    - a layer *tolerates* the smallest swept ratio from which on its accuracy stays within
      ``sensitivity_margin_pp`` of the base model's (``base_accuracy``), at every larger
      ratio too; it is *sensitive* when that ratio exceeds ``sensitivity_ratio`` (the
      ``listed`` mode's test, read off the whole curve);
    - the sensitive list is three swept ratios from the largest ratio a sensitive layer
      tolerates (three in five of the authors' six settings; SimCNN on SVHN-5 has four);
    - the other list runs from the largest ratio a non-sensitive layer tolerates up to the
      sensitive list's first ratio, at most four ratios (the authors' other lists: two to
      four ratios, ending at the sensitive list's first in four of six settings, one step
      above it in SimCNN/CIFAR-10, one below in ResCNN/CIFAR-10);
    - with no sensitive layer, the sensitive list (then unused) starts at the first swept
      ratio above ``sensitivity_ratio``.
    The result cannot be checked against the authors' own curves, which they did not
    publish; it makes every layer's initial keep ratio one at which that layer alone costs
    at most the margin, as their lists do for the layers their configures mark.
    """
    ratios = sorted(float(r) for r in sweep["ratios"])
    accuracy = sweep["accuracy"]
    floor = float(sweep["base_accuracy"]) - hyperparameters["sensitivity_margin_pp"]

    def tolerated(group: str) -> float:
        by_ratio = dict(zip(sweep["ratios"], accuracy[group], strict=True))
        within = ratios[:]
        for ratio in reversed(ratios):
            if by_ratio[ratio] < floor:
                within = [r for r in ratios if r > ratio]
                break
        return within[0] if within else ratios[-1]

    level = {group: tolerated(group) for group in groups}
    sensitive = [level[group] > hyperparameters["sensitivity_ratio"] + 1e-9 for group in groups]
    others = [level[g] for g, s in zip(groups, sensitive, strict=True) if not s]
    above = [r for r in ratios if r > hyperparameters["sensitivity_ratio"] + 1e-9]
    start = max((level[g] for g, s in zip(groups, sensitive, strict=True) if s),
                default=above[0] if above else ratios[-1])
    sensitive_ratios = [r for r in ratios if r >= start][:3]
    other_start = max(others, default=ratios[0])
    other_ratios = [r for r in ratios if other_start <= r <= start][:4]
    return sensitive, sensitive_ratios, other_ratios


def checked_sweep(sweep: Any, groups: Sequence[str] | None) -> Mapping[str, Any]:
    """``sweep`` if it is a layer sensitivity sweep (of exactly ``groups``, when given), else a
    ConfigError naming what is wrong."""
    where = "approaches.cnnsplitter.layer_sensitivity"
    if sweep is None:
        raise ConfigError(f"{where}: keep_ratios 'sweep' needs the layer sensitivity sweep of "
                          "the same model and images (dnnmod cnnsplitter-sweep; dnnmod "
                          "modularize --layer-sensitivity reads its output)")
    ratios = sweep.get("ratios") if isinstance(sweep, Mapping) else None
    accuracy = sweep.get("accuracy") if isinstance(sweep, Mapping) else None
    if not (isinstance(ratios, list) and ratios
            and all(isinstance(r, (int, float)) and 0 < r <= 1 for r in ratios)
            and isinstance(sweep.get("base_accuracy"), (int, float))
            and isinstance(accuracy, Mapping)
            and all(isinstance(v, list) and len(v) == len(ratios) for v in accuracy.values())):
        raise ConfigError(f"{where}: expected {{base_accuracy, ratios: [ratios in (0, 1]], "
                          f"accuracy: {{group: [% per ratio]}}}}, got keys "
                          f"{sorted(sweep) if isinstance(sweep, Mapping) else type(sweep)}")
    if groups is not None and sorted(accuracy) != sorted(groups):
        raise ConfigError(f"{where}: a sweep of groups {sorted(accuracy)[:5]}, but the model's "
                          f"conv groups are {sorted(groups)[:5]}: another model's sweep?")
    return sweep


def rank_weights(count: int) -> np.ndarray:
    """Probability of drawing each of ``count`` groups first, ∝ exp((count − 1 − rank) / 10):
    important (low-rank) groups are preferred."""
    weights = np.exp((count - 1 - np.arange(count)) / 10.0)
    return weights / weights.sum()


def initial_genes(layout: GeneLayout, sensitive: Sequence[bool], population: int,
                  hyperparameters: Mapping[str, Any], generator: np.random.Generator
                  ) -> torch.Tensor:
    """(population, genes) uint8: heuristic (keep ratios and rank weights) or uniform."""
    if hyperparameters["initialisation"] == "random":
        genes = generator.integers(0, 2, size=(population, layout.length), dtype=np.uint8)
        return repair(torch.from_numpy(genes), layout)
    genes = np.zeros((population, layout.length), dtype=np.uint8)
    for solution in range(population):
        for layer, (where, count) in enumerate(zip(layout.layer_slices(),
                                                   layout.genes_per_group, strict=True)):
            ratios = hyperparameters["sensitive_keep_ratios" if sensitive[layer]
                                     else "other_keep_ratios"]
            active = max(1, math.floor(count * ratios[generator.integers(len(ratios))]))
            chosen = generator.choice(count, size=active, replace=False, p=rank_weights(count))
            genes[solution, where.start + chosen] = 1
    return torch.from_numpy(genes)


def repair(genes: torch.Tensor, layout: GeneLayout) -> torch.Tensor:
    """``genes`` with every layer keeping at least its most important group."""
    genes = genes.clone()
    for where in layout.layer_slices():
        empty = genes[:, where].sum(1) == 0
        genes[empty, where.start] = 1
    return genes


@contextlib.contextmanager
def drawing_from(generator: random.Random) -> Iterator[None]:
    """DEAP's operators draw from the module-level ``random``: within the block they draw from
    ``generator``'s stream (which advances), and the global stream is left as it was."""
    saved = random.getstate()
    random.setstate(generator.getstate())
    try:
        yield
    finally:
        generator.setstate(random.getstate())
        random.setstate(saved)


def breed(genes: torch.Tensor, fitness: torch.Tensor, layout: GeneLayout,
          hyperparameters: Mapping[str, Any], generator: random.Random, best: int
          ) -> torch.Tensor:
    """The next population of one class: its elites, the solution ``best`` (the class's member
    of the best composition) first when any are kept, then children of its best parents."""
    population = []
    for row, value in zip(genes.tolist(), fitness.tolist(), strict=True):
        solution = Solution(row)
        solution.fitness.values = tuple(value)
        population.append(solution)
    toolbox = base.Toolbox()
    toolbox.register("mate", tools.cxOnePoint)
    toolbox.register("mutate", tools.mutUniformInt, low=0, up=1,
                     indpb=hyperparameters["mutation_rate"])
    ranked = [population[best]] + [s for s in tools.selBest(population, len(population))
                                   if s is not population[best]]
    elites = [toolbox.clone(s) for s in ranked[:hyperparameters["elites"]]]
    parents = tools.selBest(population, hyperparameters["parents"])
    children: list[Solution] = []
    with drawing_from(generator):
        while len(elites) + len(children) < len(population):
            first, second = (toolbox.clone(parent) for parent in random.sample(parents, 2))
            toolbox.mate(first, second)
            for child in (first, second):
                toolbox.mutate(child)
                children.append(child)
    children = children[:len(population) - len(elites)]
    return repair(torch.tensor([list(s) for s in elites + children], dtype=torch.uint8), layout)


def population_logits(model: nn.Module, structure: ModelStructure, images,
                      layout: GeneLayout, populations: torch.Tensor,
                      caches: Sequence[dict[bytes, torch.Tensor]],
                      kept_pass: KeptChannelPass | GroupedKeptPass | None = None
                      ) -> tuple[torch.Tensor, int]:
    """(N, P, images) own-class logits of every class's solutions (``populations``: (N, P,
    genes)), on the model's device, and how many solutions were run.

    Each distinct solution of class c absent from ``caches[c]`` (genes → logits) runs once;
    all of them, of every class, are the masks of one batched pass, and the caches gain them.
    """
    keys = [[row.tobytes() for row in genes.numpy()] for genes in populations]
    new = [list(dict.fromkeys(k for k in class_keys if k not in cache))
           for class_keys, cache in zip(keys, caches, strict=True)]
    owners = [c for c, class_new in enumerate(new) for _ in class_new]
    if owners:
        decoded = [layout.decode(populations[c][[keys[c].index(k) for k in class_new]], c)
                   for c, class_new in enumerate(new) if class_new]
        masks = {group: torch.cat([d[group] for d in decoded]) for group in layout.groups}
        head = OwnLogitHead(owners, len(populations))
        scores = run(model, images, structure=structure, masks=masks, head=head,
                     kept_pass=kept_pass)
        columns = iter(range(len(owners)))
        for cache, class_new in zip(caches, new, strict=True):
            cache.update({key: scores[:, next(columns)] for key in class_new})
    device = next(model.parameters()).device  # a resumed cache was loaded on the CPU
    logits = torch.stack([torch.stack([cache[k].to(device) for k in class_keys])
                          for class_keys, cache in zip(keys, caches, strict=True)])
    return logits, len(owners)


@dataclass
class _Composition:
    """Surviving compositions of some classes: one solution index per class."""

    classes: list[int]
    solutions: torch.Tensor  # (K, len(classes)) long
    difference_sum: torch.Tensor  # (K,) sum over module pairs of 1 − Jaccard
    level: int
    carried: int | None  # row of the previous generation's best composition, if given


@dataclass(frozen=True)
class CompositionScores:
    """Fitness of every solution and the surviving N-class compositions, fittest first.

    Attributes:
        fitness: (N, P, 2): classes of the largest surviving composition a solution is in, and
            its best fitness there (the DEAP fitness values).
        solutions: (K, N) the solutions of each surviving N-class composition.
        fitness_of: (K,) its fitness.
        accuracy: (K,) its accuracy on the images (fraction).
        difference: (K,) its mean pairwise 1 − Jaccard of kernel sets.
    """

    fitness: torch.Tensor
    solutions: torch.Tensor
    fitness_of: torch.Tensor
    accuracy: torch.Tensor
    difference: torch.Tensor


def jaccard_difference(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(P1, P2): 1 − Jaccard index of the kernel sets (P1, kernels) × (P2, kernels)."""
    a, b = first.double(), second.double()
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - intersection
    return 1.0 - intersection / union.clamp_min(1.0)


def surviving(accuracy: torch.Tensor, fitness: torch.Tensor, threshold: float,
              bounds: Sequence[int], carried: int | None) -> torch.Tensor:
    """Flat indices of the compositions that survive a level, fittest first: the most accurate,
    as many as reach ``threshold`` within ``bounds`` (at least, at most), and ``carried``."""
    reaching = int((accuracy >= threshold).sum())
    count = min(max(reaching, bounds[0]), bounds[1], accuracy.numel())
    kept = torch.sort(accuracy, descending=True, stable=True).indices[:count]
    if carried is not None and not (kept == carried).any():
        kept = torch.cat([kept, torch.tensor([carried], device=kept.device)])
    return kept[torch.sort(fitness[kept], descending=True, stable=True).indices]


def score_compositions(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                       kernel_sets: Sequence[torch.Tensor], *, accuracy_weight: float,
                       alpha: float, accuracy_thresholds: Sequence[float],
                       final_accuracy_threshold: float, survivors: Sequence[int],
                       carried: Sequence[int] | None = None,
                       max_elements: int = 1 << 23) -> CompositionScores:
    """Hierarchical composition pruning (see the module docstring).

    ``logits[c]``: (P, images) own-class logits of class c's solutions; ``labels``: the
    images' classes; ``kernel_sets[c]``: (P, kernels) bool; ``carried``: one solution per class
    whose composition survives every level (the previous generation's best). Fitness of a
    composition S = ``accuracy_weight``·acc(S) + (1 − ``alpha``)·diff(S). ``max_elements``
    bounds the (compositions × images) comparisons held at once. Scored on the logits'
    device; the scores come back on the CPU.
    """
    classes = len(logits)
    population = logits[0].shape[0]
    device = logits[0].device
    labels = labels.to(device)
    kernel_sets = [kernels.to(device) for kernels in kernel_sets]
    difference = {(i, j): jaccard_difference(kernel_sets[i], kernel_sets[j])
                  for i in range(classes) for j in range(i + 1, classes)}
    fitness = torch.zeros(classes, population, 2, dtype=torch.float64, device=device)
    parts = [_Composition([c], torch.arange(population, device=device)[:, None],
                          torch.zeros(population, dtype=torch.float64, device=device), 0,
                          None if carried is None else int(carried[c]))
             for c in range(classes)]
    while len(parts) > 1:
        merged = []
        for first, second in zip(parts[::2], parts[1::2], strict=False):
            level = max(first.level, second.level)
            joined = first.classes + second.classes
            full = len(joined) == classes
            accuracy, diff_sum = _merge_scores(first, second, logits, labels, difference,
                                               max_elements)
            diff = diff_sum / (len(joined) * (len(joined) - 1) / 2)
            score = accuracy_weight * accuracy + (1.0 - alpha) * diff
            threshold = (final_accuracy_threshold if full else
                         accuracy_thresholds[min(level, len(accuracy_thresholds) - 1)])
            carried_at = (None if first.carried is None or second.carried is None
                          else first.carried * score.shape[1] + second.carried)
            order = surviving(accuracy.flatten(), score.flatten(), threshold, survivors,
                              carried_at)
            rows, columns = order // score.shape[1], order % score.shape[1]
            solutions = torch.cat([first.solutions[rows], second.solutions[columns]], dim=1)
            best = score.flatten()[order]
            for column, label in enumerate(joined):
                _record(fitness[label], solutions[:, column], best, len(joined))
            position = (None if carried_at is None
                        else int((order == carried_at).nonzero()[0, 0]))
            merged.append(_Composition(joined, solutions, diff_sum.flatten()[order], level + 1,
                                       position))
            if full:
                result = CompositionScores(*(values.cpu() for values in (
                    fitness, solutions[:, torch.tensor(joined).argsort().to(device)], best,
                    accuracy.flatten()[order], diff.flatten()[order])))
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return result


def _record(fitness: torch.Tensor, solutions: torch.Tensor, best: torch.Tensor,
            size: int) -> None:
    """Solutions in a surviving composition of ``size`` classes: (size, their best fitness)."""
    top = torch.full((fitness.shape[0],), -math.inf, dtype=torch.float64,
                     device=fitness.device)
    top.scatter_reduce_(0, solutions, best.double(), "amax")
    scored = torch.isfinite(top)
    fitness[scored, 0] = float(size)
    fitness[scored, 1] = top[scored]


def _merge_scores(first: _Composition, second: _Composition, logits, labels, difference,
                  max_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and summed pairwise difference of every (first, second) composition pair."""
    joined = first.classes + second.classes
    on = torch.isin(labels, torch.tensor(joined, device=labels.device))
    image_labels = labels[on]

    def extremes(part: _Composition) -> tuple[torch.Tensor, torch.Tensor]:
        # The true class's logit (−inf off the part) and the highest logit of the part's other
        # modules: an image counts as right when its true logit beats every other module's
        # (a tie counts as a miss).
        stacked = torch.stack([logits[label][part.solutions[:, column]][:, on]
                               for column, label in enumerate(part.classes)])
        true = torch.full_like(stacked[0], -math.inf)
        for column, label in enumerate(part.classes):
            mine = image_labels == label
            true[:, mine] = stacked[column][:, mine]
            stacked[column][:, mine] = -math.inf
        return true, stacked.amax(0)

    true_a, other_a = extremes(first)
    true_b, other_b = extremes(second)
    rows = max(1, max_elements // max(1, len(second.solutions) * len(image_labels)))
    accuracy = torch.cat([
        (torch.maximum(true_a[i:i + rows, None], true_b[None])
         > torch.maximum(other_a[i:i + rows, None], other_b[None])).double().mean(2)
        for i in range(0, len(first.solutions), rows)])
    diff_sum = first.difference_sum[:, None] + second.difference_sum[None]
    for column_a, label_a in enumerate(first.classes):
        for column_b, label_b in enumerate(second.classes):
            pair = (difference[label_a, label_b] if label_a < label_b
                    else difference[label_b, label_a].T)
            diff_sum = diff_sum + pair[first.solutions[:, column_a]][
                :, second.solutions[:, column_b]]
    return accuracy, diff_sum


def score_in_class_order(class_order: Sequence[int], logits: Sequence[torch.Tensor],
                         labels: torch.Tensor, kernel_sets: Sequence[torch.Tensor], *,
                         carried: Sequence[int] | None = None,
                         **settings: Any) -> CompositionScores:
    """:func:`score_compositions` with the classes composed in ``class_order`` (the reference
    shuffles them every generation); arguments and scores are by class index."""
    place = torch.argsort(torch.as_tensor(class_order))  # class c's position in the order
    scores = score_compositions(
        [logits[c] for c in class_order], place[labels.cpu()],
        [kernel_sets[c] for c in class_order],
        carried=None if carried is None else [carried[c] for c in class_order], **settings)
    return replace(scores, fitness=scores.fitness[place], solutions=scores.solutions[:, place])


@dataclass
class SearchInputs:
    """What the search and the layer sensitivity sweep read of a model and its data."""

    structure: ModelStructure
    images: Any  # the validation images fitness scores (an ImageSet)
    held_out: Any  # the other validation images (None without fitness_samples)
    base_accuracy: float  # the model's accuracy (%) on ``images``
    order: dict[str, torch.Tensor]  # group → (N, size) kernels by importance, per class
    basis: dict[int, str]  # the images each class's importance rests on
    kept_pass: KeptChannelPass | GroupedKeptPass | None


def search_inputs(model: nn.Module, structure: ModelStructure, data,
                  hyperparameters: Mapping[str, Any], seed: int) -> SearchInputs:
    """The fitness images (``fitness_samples`` of the validation split, seeded), the base
    accuracy on them, kernel importance order and the pass modules run by, for an eval-mode
    ``model`` on its device and its traced ``structure``."""
    if data.num_classes < 2:
        raise ConfigError("cnnsplitter: needs at least two classes to compose")
    images, held_out = data.val.sample_and_rest(hyperparameters["fitness_samples"], seed)
    base_accuracy = 100.0 * (run(model, images).argmax(1).cpu()
                             == images.labels.cpu()).float().mean().item()
    importance, basis = kernel_importance(model, structure, data.val, data.num_classes,
                                          hyperparameters["confidence"])
    order = {name: torch.sort(value, dim=1, descending=True, stable=True).indices
             for name, value in importance.items()}
    kept_pass = kept_channel_pass(model, structure) or GroupedKeptPass.build(model, structure)
    return SearchInputs(structure, images, held_out, base_accuracy, order, basis, kept_pass)


def layer_sensitivity_sweep(model: nn.Module, base_meta: Mapping[str, Any], data,
                            hyperparameters: Mapping[str, Any], *, seed: int,
                            device: str = "cpu") -> dict[str, Any]:
    """The layer sensitivity sweep of the authors' analyser (every conv group at every ratio
    of :data:`SWEEP_RATIOS`) on the images a search with ``hyperparameters`` and ``seed``
    scores, as the record ``keep_ratios: sweep`` reads, with what it was made from and the
    keep ratios :func:`keep_ratios_from_sweep` derives from it at these hyperparameters."""
    started = time.perf_counter()
    model = model.to(device).eval()
    structure = trace_structure(model, (1, *data.train.images.shape[1:]))
    search = search_inputs(model, structure, data, hyperparameters, seed)
    accuracy = layer_sensitivity(model, search.structure, search.images, search.order,
                                 SWEEP_RATIOS, search.kept_pass)
    sweep = {"base_accuracy": search.base_accuracy, "ratios": list(SWEEP_RATIOS),
             "accuracy": accuracy}
    groups = [group.name for group in search.structure.conv_groups]
    sensitive, sensitive_ratios, other_ratios = keep_ratios_from_sweep(sweep, groups,
                                                                       hyperparameters)
    return {
        "sweep": sweep,
        "made_from": {"weights_sha256": base_meta.get("weights_sha256"), "seed": seed,
                      "fitness_samples": hyperparameters["fitness_samples"],
                      "confidence": hyperparameters["confidence"],
                      "images": len(search.images)},
        "derived": {"sensitive_layers": [g for g, s in zip(groups, sensitive, strict=True)
                                         if s],
                    "sensitive_keep_ratios": sensitive_ratios,
                    "other_keep_ratios": other_ratios,
                    "sensitivity_ratio": hyperparameters["sensitivity_ratio"],
                    "sensitivity_margin_pp": hyperparameters["sensitivity_margin_pp"]},
        "wall_seconds": time.perf_counter() - started,
    }


def sweep_for(record: Mapping[str, Any], base_meta: Mapping[str, Any],
              hyperparameters: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The sweep of a :func:`layer_sensitivity_sweep` record, checked to be of the model
    (``base_meta``) and the images a search with ``hyperparameters`` and ``seed`` scores."""
    made_from = record.get("made_from", {})
    expected = {"weights_sha256": base_meta.get("weights_sha256"), "seed": seed,
                "fitness_samples": hyperparameters["fitness_samples"],
                "confidence": hyperparameters["confidence"]}
    differing = {key: (made_from.get(key), value) for key, value in expected.items()
                 if made_from.get(key) != value}
    if differing:
        raise ConfigError("cnnsplitter layer sensitivity sweep: made from another model or "
                          "other images than this search scores (recorded, expected): "
                          + ", ".join(f"{key} {got!r}, {want!r}"
                                      for key, (got, want) in differing.items()))
    return dict(checked_sweep(record.get("sweep"), None))


class CNNSplitter(Approach):
    name = "cnnsplitter"
    defaults = DEFAULTS
    # The paper's KRR counts every conv layer's kernels (its kernel ids are per layer): the
    # shared definition for models without coupled convs (SimCNN), coupled convs (ResCNN's
    # residual additions) counted once per layer.
    krr_definition = PER_LAYER_KRR
    types = {"fitness_samples": int, "selection_samples": int, "layer_sensitivity": dict}
    contract_hyperparameters = {"population": 4, "generations": 2, "parents": 2, "elites": 1,
                                "survivors": [4, 6], "fitness_samples": 40}

    def paper_kernel_retention(self, model: nn.Module, modules: ModuleSet) -> list[float]:
        return layer_kernel_retention(modules)

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        hp = super().resolve(overrides)
        where = f"approaches.{self.name}"

        def fail(key: str, requirement: str) -> None:
            raise ConfigError(f"{where}.{key}: must be {requirement}, got {hp[key]!r}")

        for key in ("population", "small_layer_groups", "large_layer_groups",
                    "large_layer_kernels"):
            if hp[key] < 1:
                fail(key, "at least 1")
        if hp["population"] < 2:
            fail("population", "at least 2 (crossover needs two parents)")
        if hp["generations"] < 0:
            fail("generations", ">= 0")
        if not 2 <= hp["parents"] <= hp["population"]:
            fail("parents", f"between 2 and population ({hp['population']})")
        if not 0 <= hp["elites"] < hp["population"]:
            fail("elites", f"between 0 and population - 1 ({hp['population'] - 1})")
        for key in ("mutation_rate", "alpha", "gamma", "confidence", "final_accuracy_threshold"):
            if not 0 <= hp[key] <= 1:
                fail(key, "in [0, 1]")
        if not 0 < hp["sensitivity_ratio"] <= 1:
            fail("sensitivity_ratio", "in (0, 1]")
        for key in ("sensitive_keep_ratios", "other_keep_ratios"):
            if not hp[key] or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                      and 0 < r <= 1 for r in hp[key]):
                fail(key, "a non-empty list of ratios in (0, 1]")
        bounds = hp["survivors"]
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(k, int) and not isinstance(k, bool) for k in bounds)
                and 1 <= bounds[0] <= bounds[1]):
            fail("survivors", "[at least, at most] with 1 <= at least <= at most")
        thresholds = hp["accuracy_thresholds"]
        if not (isinstance(thresholds, list) and thresholds
                and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1
                        for t in thresholds)):
            fail("accuracy_thresholds", "a non-empty list of accuracies in [0, 1]")
        if hp["grouping"] not in GROUPINGS:
            fail("grouping", f"one of {list(GROUPINGS)}")
        if hp["initialisation"] not in INITIALISATIONS:
            fail("initialisation", f"one of {list(INITIALISATIONS)}")
        if hp["keep_ratios"] not in KEEP_RATIO_SOURCES:
            fail("keep_ratios", f"one of {list(KEEP_RATIO_SOURCES)}")
        if hp["layer_sensitivity"] is not None:
            if hp["keep_ratios"] != "sweep":
                fail("layer_sensitivity", "null unless keep_ratios is 'sweep' (nothing else "
                     "reads it)")
            checked_sweep(hp["layer_sensitivity"], None)
        for key in ("fitness_samples", "selection_samples"):
            samples = hp[key]
            if samples is not None and (not isinstance(samples, int)
                                        or isinstance(samples, bool) or samples < 1):
                fail(key, "a positive integer or null")
        if hp["selection_samples"] is not None and hp["fitness_samples"] is None:
            fail("selection_samples", "null when fitness_samples is null (fitness then scores "
                 "every validation image, and the generation is selected on them)")
        return hp

    def decompose(self, context: RunContext) -> Decomposition:
        model, base_meta, data = context.model, context.base_meta, context.data
        hp = context.hyperparameters
        structure, classes, seed = context.structure, context.classes, context.seed
        search = search_inputs(model, structure, data, hp, seed)
        images, order, held_out = search.images, search.order, search.held_out
        kept_pass, base_accuracy = search.kept_pass, search.base_accuracy
        if held_out is not None:
            held_out = held_out.sample(hp["selection_samples"], seed)
        labels = images.labels.cpu()
        group_names = [group.name for group in structure.conv_groups]
        keep_ratios = {"sensitive": hp["sensitive_keep_ratios"],
                       "other": hp["other_keep_ratios"]}
        sensitivity: dict[str, Any] = {}
        sensitive = [False] * len(group_names)
        if hp["initialisation"] == "heuristic" and hp["keep_ratios"] == "sweep":
            sweep = checked_sweep(hp["layer_sensitivity"], group_names)
            sensitive, keep_ratios["sensitive"], keep_ratios["other"] = \
                keep_ratios_from_sweep(sweep, group_names, hp)
            sensitivity = sweep["accuracy"]
        elif hp["initialisation"] == "heuristic":
            at_ratio = layer_sensitivity(model, structure, images, order,
                                         [hp["sensitivity_ratio"]], kept_pass)
            sensitivity = {name: values[0] for name, values in at_ratio.items()}
            sensitive = [base_accuracy - sensitivity[name] > hp["sensitivity_margin_pp"]
                         for name in group_names]
        initialising = {**hp, "sensitive_keep_ratios": keep_ratios["sensitive"],
                        "other_keep_ratios": keep_ratios["other"]}
        if hp["grouping"] == "random":
            shuffler = torch.Generator().manual_seed(seed)
            order = {g.name: torch.stack([torch.randperm(g.size, generator=shuffler)
                                          for _ in classes]) for g in structure.conv_groups}
        layout = gene_layout(structure, order, hp)

        fingerprint = config_hash({"approach": self.name, "hyperparameters": hp, "seed": seed,
                                   "base": base_meta.get("weights_sha256")})
        loop = ResumableLoop(context.checkpoint, fingerprint, hp["generations"] + 1, desc=self.name,
                             unit="generation", progress=context.progress)
        logbook = tools.Logbook()
        statistics = tools.Statistics(key=lambda solution: solution.fitness.values[1])
        for name, reduce in (("mean", np.mean), ("max", np.max), ("min", np.min)):
            statistics.register(name, reduce)
        populations, fitness, cached, best_compositions = None, None, None, []
        held_out_caches = [{} for _ in classes]  # genes → own-class logits on held_out
        best_members, accuracy_prev_best = None, 0.0
        if loop.state is not None:
            state = loop.state
            populations, fitness = state["populations"], state["fitness"]
            cached, best_compositions = state["logits"], state["best_compositions"]
            previous = populations
            best_members, accuracy_prev_best = state["best_members"], state["accuracy_prev_best"]
            for record in state["logbook"]:
                logbook.record(**record)

        for generation in loop.steps():
            stream = seed * 1_000_003 + generation
            if populations is None:
                numbers = np.random.default_rng(stream)
                populations = torch.stack([initial_genes(layout, sensitive, hp["population"],
                                                         initialising, numbers)
                                           for _ in classes])
            else:
                draws = random.Random(stream)
                populations = torch.stack([breed(populations[c], fitness[c], layout, hp, draws,
                                                 int(best_members[c])) for c in classes])
            caches = [{} if cached is None else
                      {row.tobytes(): column for row, column in
                       zip(previous[c].numpy(), cached[c], strict=True)} for c in classes]
            cached, evaluations = population_logits(model, structure, images, layout,
                                                    populations, caches, kept_pass)
            previous, logits = populations, list(cached)
            weight = (hp["alpha"] if generation == 0
                      else hp["alpha"] + max(0.0, hp["gamma"] - accuracy_prev_best))
            # the previous best composition's members are the first elites (breed)
            carried = [0] * len(classes) if generation > 0 and hp["elites"] > 0 else None
            class_order = np.random.default_rng((stream, 1)).permutation(len(classes)).tolist()
            scores = score_in_class_order(
                class_order, logits, labels,
                [layout.kernel_sets(populations[c], c) for c in classes],
                accuracy_weight=weight, alpha=hp["alpha"],
                accuracy_thresholds=hp["accuracy_thresholds"],
                final_accuracy_threshold=hp["final_accuracy_threshold"],
                survivors=hp["survivors"], carried=carried)
            fitness = scores.fitness
            best_members = scores.solutions[0]  # the fittest surviving composition
            accuracy_prev_best = float(scores.accuracy[0])
            chosen = torch.stack([populations[c, best_members[c]] for c in classes])
            best_compositions.append(chosen)
            if held_out is None:
                selection_accuracy = accuracy_prev_best
            else:  # the best composition's members are mostly last generation's: cached
                held_out_logits, _ = population_logits(model, structure, held_out, layout,
                                                       chosen[:, None], held_out_caches,
                                                       kept_pass)
                selection_accuracy = float((held_out_logits[:, 0].argmax(0).cpu()
                                            == held_out.labels.cpu()).float().mean())
            selection = hp["alpha"] * selection_accuracy + (1 - hp["alpha"]) * float(
                scores.difference[0])
            kept = torch.stack([layout.kernel_sets(chosen[c:c + 1], c)[0] for c in classes])
            solutions = []
            for c in classes:
                for genes, value in zip(populations[c].tolist(), fitness[c].tolist(),
                                        strict=True):
                    solution = Solution(genes)
                    solution.fitness.values = tuple(value)
                    solutions.append(solution)
            logbook.record(generation=generation, evaluations=evaluations,
                           **{f"fitness_{k}": float(v)
                              for k, v in statistics.compile(solutions).items()},
                           val_accuracy=100.0 * accuracy_prev_best,
                           difference=float(scores.difference[0]),
                           selection_accuracy=100.0 * selection_accuracy,
                           selection=selection,
                           krr=float(kept.double().mean()))
            entry = logbook[-1]
            loop.save(generation, {
                "populations": populations, "fitness": fitness, "logits": cached,
                "best_compositions": best_compositions, "best_members": best_members,
                "accuracy_prev_best": accuracy_prev_best, "logbook": list(logbook),
            }, postfix={"val": f"{entry['val_accuracy']:.1f}%", "krr": f"{entry['krr']:.2f}"})
            log.info("generation %d/%d: val %.2f%% diff %.3f KRR %.3f (%d new solutions)",
                     generation, hp["generations"], entry["val_accuracy"], entry["difference"],
                     entry["krr"], evaluations)

        records = list(logbook)
        # As the authors' code (main, `gen_idx > 0`): the generation is selected among the
        # searched ones; generation 0, the initial population, competes only when it is all.
        candidates = range(1, len(records)) if len(records) > 1 else range(1)
        selected = max(candidates, key=lambda g: records[g]["selection"])
        genes = best_compositions[selected]
        masks = {group: torch.cat([layout.decode(genes[c:c + 1], c)[group] for c in classes])
                 for group in layout.groups}
        provenance = {
            "wall_seconds": loop.wall_seconds, "selected_generation": selected,
            "val_accuracy": records[selected]["val_accuracy"],
            "base_val_accuracy": base_accuracy, "fitness_samples": len(images),
            "selection_samples": len(images if held_out is None else held_out),
            "genes": layout.length,
            "importance_basis": {str(c): search.basis[c] for c in classes},
            "layer_sensitivity": sensitivity, "keep_ratios": keep_ratios,
            "sensitive_layers": [g for g, s in zip(layout.groups, sensitive, strict=True) if s],
            "logbook": records,
        }
        return Decomposition(masks, OwnLogitHead(classes, len(classes)), provenance=provenance)

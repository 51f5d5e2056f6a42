"""E4: new tasks composed from modules, compared with a network trained from scratch.

A new task is a pair of classes: class ``a`` of dataset A and class ``b`` of dataset B. With
A ≠ B it is GradSplitter's setting (CIFAR-10 × SVHN); with A = B and a ≠ b it is Pan & Rajan's
intra-dataset reuse; CIFAR-10 × CIFAR-100 is their inter-dataset reuse. One code path serves
them all: a *setting* names the two datasets, the baseline architecture, the pool of models
whose module sets are candidates, and the pairs.

For each class of a pair the module is chosen among the candidates, the module sets of one
approach on the pool models of that class's dataset, by the highest binary F1 ("is it my
class?", :func:`dnnmod.modules.metrics.binary_metrics`) on a selection split of the dataset
(default: the validation split, which the base models never trained on); ties go to the first
candidate in the order given. The two chosen modules are composed with
:meth:`ComposedModel.from_parts` (each normalising the raw images with its own base model's
statistics) and combined by the approach's combination rule, so a rule over (batch, M, k)
scores, such as Pan & Rajan's voting, serves as well as argmax. The composed binary classifier
is scored on the pair's test images, those of the derived pair task (``pair_<A>_<a>_<B>_<b>``,
labels 0 for ``a``, 1 for ``b``) on which the from-scratch baseline is also tested.

Not implemented yet: GradSplitter's pool of models trained on Dirichlet-imbalanced subsets
(the pool here is the study's base models of each dataset), and Pan & Rajan's "continuous
learning" variant of inter-dataset reuse.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from typing import Any

import torch
from torch import nn

from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.modules.compose import ComposedModel, ComposedPart
from dnnmod.modules.metrics import binary_metrics, module_scores
from dnnmod.modules.moduleset import ModuleSet

#: images per forward pass of a composed pair model (two fused modules: small activations)
PREDICT_BATCH = 256
SELECTION_SPLITS = ("val", "train")


@dataclass(frozen=True)
class Pair:
    """Class ``class_a`` of ``dataset_a`` and class ``class_b`` of ``dataset_b``, a binary
    task whose label 0 is ``class_a`` and label 1 ``class_b``."""

    dataset_a: str
    class_a: int
    dataset_b: str
    class_b: int

    @property
    def task(self) -> str:
        """The name of the derived dataset holding the pair's images (same name for the same
        classes in every study: data roots are shared)."""
        return f"pair_{self.dataset_a}_{self.class_a}_{self.dataset_b}_{self.class_b}"

    @property
    def label(self) -> str:
        return f"{self.dataset_a}/{self.class_a} + {self.dataset_b}/{self.class_b}"

    def task_spec(self) -> dict[str, Any]:
        """The ``tasks:`` entry (:class:`dnnmod.data.Task`) that derives the pair's dataset."""
        return {"parts": [{"dataset": self.dataset_a, "classes": [self.class_a]},
                          {"dataset": self.dataset_b, "classes": [self.class_b]}]}

    def to_json(self) -> list:
        return [self.dataset_a, self.class_a, self.dataset_b, self.class_b]


def setting_pairs(name: str, setting: Mapping[str, Any],
                  num_classes: Mapping[str, int]) -> list[Pair]:
    """The pairs of setting ``reuse.new_tasks.settings.<name>``.

    ``pairs: all`` (the default) is every (a, b) of A × B, or every a < b when A = B;
    otherwise a list of [a, b] class indices. ``max_pairs`` keeps a seeded sample
    (``pair_seed``) of that many, in their original order. ConfigError names the key at fault.
    """
    where = f"reuse.new_tasks.settings.{name}"
    datasets = setting.get("datasets")
    if not isinstance(datasets, list | tuple) or len(datasets) != 2:
        raise ConfigError(f"{where}.datasets: expected [dataset A, dataset B]; got {datasets!r}")
    first, second = datasets
    for dataset in datasets:
        if dataset not in num_classes:
            raise ConfigError(f"{where}.datasets: {dataset!r} is not a configured dataset "
                              f"(configured: {sorted(num_classes)})")
    listed = setting.get("pairs", "all")
    if listed == "all":
        if first == second:
            indices = list(combinations(range(num_classes[first]), 2))
        else:
            indices = list(product(range(num_classes[first]), range(num_classes[second])))
    elif isinstance(listed, list) and listed:
        indices = []
        for position, entry in enumerate(listed):
            if (not isinstance(entry, list | tuple) or len(entry) != 2 or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in entry)):
                raise ConfigError(f"{where}.pairs[{position}]: expected [class of "
                                  f"{first}, class of {second}] as indices; got {entry!r}")
            for dataset, cls in zip(datasets, entry, strict=True):
                if not 0 <= cls < num_classes[dataset]:
                    raise ConfigError(f"{where}.pairs[{position}]: class {cls} is out of range "
                                      f"for {dataset} (0..{num_classes[dataset] - 1})")
            if first == second and entry[0] == entry[1]:
                raise ConfigError(f"{where}.pairs[{position}]: a pair within {first} needs two "
                                  f"distinct classes; got {list(entry)}")
            indices.append(tuple(entry))
        if len(set(indices)) != len(indices):
            raise ConfigError(f"{where}.pairs: a pair is listed twice")
    else:
        raise ConfigError(f"{where}.pairs: expected 'all' or a non-empty list of [a, b]; got "
                          f"{listed!r}")
    if not indices:
        raise ConfigError(f"{where}.pairs: {first} × {second} has no pair of distinct classes")
    limit = setting.get("max_pairs")
    if limit is not None and limit < len(indices):
        chosen = sorted(random.Random(setting.get("pair_seed", 0)).sample(
            range(len(indices)), limit))
        indices = [indices[i] for i in chosen]
    return [Pair(first, a, second, b) for a, b in indices]


@dataclass
class Candidate:
    """One candidate module set: its base model, what it was decomposed from and the binary
    F1 (%) of each of its modules on the selection split."""

    model: nn.Module
    meta: dict[str, Any]
    modules: ModuleSet
    source: str  # where it came from, for the record (e.g. the module-set path)
    f1: dict[int, float]

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.meta.get("model"),
                "arch": self.meta["arch"], "training": self.meta["training"],
                "dataset": self.dataset, "seed": self.meta.get("seed"),
                "weights_sha256": self.meta.get("weights_sha256")}


def f1_by_class(modules: ModuleSet, scores: torch.Tensor,
                labels: torch.Tensor) -> dict[int, float]:
    """Binary F1 (%) of every module of ``modules`` from its ``scores`` on images of base-model
    ``labels``: class → F1."""
    return {row["class"]: row["f1"] for row in binary_metrics(modules, scores, labels)}


def selection_f1(model: nn.Module, modules: ModuleSet, images) -> dict[int, float]:
    """Binary F1 (%) of every module of ``modules`` on the ImageSet ``images``."""
    return f1_by_class(modules, module_scores(model, modules, images), images.labels)


def choose_module(candidates: Sequence[Candidate], dataset: str, cls: int) -> Candidate:
    """The candidate of ``dataset`` whose module for class ``cls`` has the highest selection
    F1; the first such candidate on a tie."""
    eligible = [c for c in candidates if c.dataset == dataset and cls in c.f1]
    if not eligible:
        raise ArtifactError(f"no candidate module set of {dataset} has a module for class "
                            f"{cls} (candidates: {[c.source for c in candidates]})")
    return max(eligible, key=lambda c: c.f1[cls])  # max keeps the first of equal keys


def compose_pair(part_a: Candidate, class_a: int, part_b: Candidate,
                 class_b: int) -> ComposedModel:
    """The binary classifier of modules ``class_a`` of ``part_a`` (label 0) and ``class_b`` of
    ``part_b`` (label 1), combined by their module sets' rule; it takes images in [0, 1]."""
    rules = {part_a.modules.combination, part_b.modules.combination}
    if len(rules) != 1:
        raise ArtifactError(f"modules of {part_a.source} and {part_b.source} combine by "
                            f"different rules {sorted(rules)}; compose modules of one approach")
    return ComposedModel.from_parts([ComposedPart(part_a.model, part_a.modules, class_a),
                                     ComposedPart(part_b.model, part_b.modules, class_b)],
                                    combination=rules.pop())


@torch.no_grad()
def predict(composed: ComposedModel, images) -> torch.Tensor:
    """Predicted labels (part positions) of ``composed`` on every image of an ImageSet."""
    predictions = []
    for start in range(0, len(images), PREDICT_BATCH):
        x, _ = images.unit_batch(slice(start, start + PREDICT_BATCH))
        predictions.append(composed.predict(x))
    return torch.cat(predictions)


def pair_record(pair: Pair, part_a: Candidate, part_b: Candidate,
                test) -> dict[str, Any]:
    """Compose the pair's chosen modules and score them on ``test``, the pair task's test
    ImageSet (labels 0 = class a, 1 = class b)."""
    counts = torch.bincount(test.labels, minlength=2).tolist()
    if len(counts) != 2 or min(counts) == 0:
        raise ArtifactError(f"{pair.task}: test labels {counts} are not those of a pair task "
                            "(images of label 0 and 1 only, both present)")
    composed = compose_pair(part_a, pair.class_a, part_b, pair.class_b).to(test.device)
    predicted = predict(composed, test)
    correct = predicted == test.labels
    return {
        "task": pair.task, "pair": pair.label,
        "dataset_a": pair.dataset_a, "class_a": pair.class_a,
        "class_name_a": _class_name(part_a.meta, pair.class_a),
        "dataset_b": pair.dataset_b, "class_b": pair.class_b,
        "class_name_b": _class_name(part_b.meta, pair.class_b),
        "module_a": {**part_a.describe(), "selection_f1": part_a.f1[pair.class_a]},
        "module_b": {**part_b.describe(), "selection_f1": part_b.f1[pair.class_b]},
        "test_images": len(test),
        "composed_accuracy": 100.0 * correct.float().mean().item(),
        "recall_a": 100.0 * correct[test.labels == 0].float().mean().item(),
        "recall_b": 100.0 * correct[test.labels == 1].float().mean().item(),
    }


def compose_new_tasks(candidates: Sequence[Candidate], pairs: Sequence[Pair],
                      tests: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per pair: the chosen modules, composed, scored on ``tests[pair.task]``."""
    records = []
    for pair in pairs:
        part_a = choose_module(candidates, pair.dataset_a, pair.class_a)
        part_b = choose_module(candidates, pair.dataset_b, pair.class_b)
        records.append(pair_record(pair, part_a, part_b, tests[pair.task]))
    return records


def _class_name(meta: Mapping[str, Any], cls: int) -> str:
    names = meta.get("class_names")
    return str(names[cls]) if names else str(cls)


def load_candidates(paths: Sequence[tuple[Any, Any]], data_root, selection_split: str = "val",
                    device: str = "cpu") -> list[Candidate]:
    """Candidates from (module set, base model) paths, each set checked to belong to its model,
    with the binary F1 of its modules on ``selection_split`` of the model's dataset (the split
    of the model's seed; each dataset loaded once)."""
    from dnnmod.data import load_dataset
    from dnnmod.training.model_io import load_model

    if selection_split not in SELECTION_SPLITS:
        raise ConfigError(f"selection split {selection_split!r} is not one of "
                          f"{list(SELECTION_SPLITS)}")
    splits: dict[tuple[str, int], Any] = {}
    candidates = []
    for modules_path, model_path in paths:
        model, meta = load_model(model_path, device=device)
        modules = ModuleSet.load(modules_path, base=meta)
        key = (meta["dataset"], meta["seed"])
        if key not in splits:
            splits[key] = getattr(load_dataset(data_root, *key, device=device), selection_split)
        candidates.append(Candidate(model=model, meta=meta, modules=modules,
                                    source=str(modules_path),
                                    f1=selection_f1(model, modules, splits[key])))
    return candidates


@dataclass(frozen=True)
class SettingPlan:
    """What the workflow runs for one setting: its pairs and, per approach with module sets
    on both datasets, the (dataset, model) of every candidate module set."""

    name: str
    datasets: tuple[str, str]
    model: str
    pairs: tuple[Pair, ...]
    candidates: Mapping[str, tuple[tuple[str, str], ...]]

    @property
    def kind(self) -> str:
        """``intra``: both classes from one dataset; ``inter``: from two."""
        return setting_kind(*self.datasets)


def setting_kind(dataset_a: str, dataset_b: str) -> str:
    return "intra" if dataset_a == dataset_b else "inter"


def plan_new_tasks(config: Mapping[str, Any],
                   modularizations: Sequence[tuple[str, str, str]]) -> dict[str, SettingPlan]:
    """Setting name → plan, for ``reuse.new_tasks`` of a study config (none: empty).

    An approach takes part in a setting when it decomposed at least one pool model of each of
    the two datasets (``modularize`` entries); a setting no approach can serve has no plan.
    Names that do not resolve are a ConfigError naming the key.
    """
    from dnnmod.data import DATASETS

    new_tasks = config.get("reuse", {}).get("new_tasks")
    if not new_tasks:
        return {}
    recipe = new_tasks.get("recipe")
    if recipe not in config["recipes"]:
        raise ConfigError(f"reuse.new_tasks.recipe: {recipe!r} is not defined under recipes "
                          f"(defined: {sorted(config['recipes'])})")
    num_classes = {name: DATASETS[name].num_classes for name in config["datasets"]
                   if name in DATASETS}
    plans = {}
    for name, setting in new_tasks.get("settings", {}).items():
        where = f"reuse.new_tasks.settings.{name}"
        pairs = setting_pairs(name, setting, num_classes)
        model = setting.get("model")
        pool = setting.get("pool") or [model]
        for key, names in (("model", [model]), ("pool", pool)):
            unknown = [m for m in names if m not in config["models"]]
            if unknown:
                raise ConfigError(f"{where}.{key}: {unknown[0]!r} is not defined under models "
                                  f"(defined: {sorted(config['models'])})")
        datasets = tuple(dict.fromkeys(setting["datasets"]))
        candidates = {}
        decomposed = set(modularizations)
        for approach in dict.fromkeys(a for a, _, _ in modularizations):
            found = tuple((dataset, m) for dataset in datasets for m in pool
                          if (approach, dataset, m) in decomposed)
            if {dataset for dataset, _ in found} == set(datasets):
                candidates[approach] = found
        if candidates:
            plans[name] = SettingPlan(name, tuple(setting["datasets"]), model, tuple(pairs),
                                      candidates)
    return plans

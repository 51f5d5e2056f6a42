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

Pan & Rajan report inter-dataset reuse without and with a *continuous-learning* step (−12.06 %
and −7.63 % against training from scratch): a module decomposed from a CIFAR-10 model has never
seen CIFAR-100 images, so its "not my class" side knows nothing of its partner's class; the
composed modules are retrained on the new task's data. A setting's ``continuous_learning``
(``{epochs, lr, batch_size}``, :func:`resolve_continuous_learning`) adds that variant beside the
plain composition, from the same chosen modules (:func:`continue_learning`). The stored text of
the paper available to us names the step and its numbers, not its recipe; our choices, also
stated in the README:

- each chosen module is retrained on its own copy of its base model, with its masks held fixed
  (the masked forward zeroes what the module drops, so dropped channels, units and positions
  get no gradient and keep their weights, and nothing dropped comes back), its head's own
  parameters with it (GradSplitter's); BatchNorm keeps its running statistics and dropout stays
  off (eval mode), as two classes' batches would skew the statistics every module shares;
- on the pair task's training split (the images the from-scratch baseline trains on) for a
  fixed number of epochs with Adam, keeping the last epoch's weights: nothing is selected, and
  the test images are only scored;
- with the loss that matches how the combination rule reads the scores: for Pan & Rajan's
  voting, each module's (V_c, V_uc) pair as a two-node softmax (V_c should win on the module's
  class, V_uc on the other one's, so that exactly the right module votes) plus the two
  modules' V_c as the logits of one softmax (voting's rule where both or neither vote); for
  argmax, the
  two modules' scores as the logits of one softmax over the two classes. GradSplitter's
  sigmoid scores are read that way too: a binary cross-entropy pushing each probability to
  0 or 1 saturated the sigmoid and undid the composition on the demo (26 % after 2 epochs on
  a pair it composed at 100 %).

By default the pool is the study's base models of each dataset (the setting's ``pool`` models,
``[model]`` unless given). A setting's ``dirichlet_pool`` (:func:`resolve_dirichlet_pool`) is
GradSplitter's pool instead: per dataset and pool model, ``members`` models of the same
architecture, each trained on its own class-imbalanced subsample of the dataset's training split
and decomposed by each of the pool's approaches (the other approaches of the setting keep the
base models). GradSplitter (TOSEM 2023; the authors' code, as we read it) trains 10 models per
architecture and dataset; proportions p ~ Dirichlet(alpha · 1) over the classes, class c keeping
floor(p_c / max p · n_c) of its images (alpha 1 and at least 100 images a class on CIFAR-10, 0.5
and 10 on SVHN); each model trains and validates on an 8:2 split of its own sample; a class's
module is the member's with the best binary F1 on held-out images. Here:

- each member is a derived task :meth:`PoolMember.task` (:class:`dnnmod.data.tasks.DirichletDraw`,
  the proportions and kept counts in its ``meta.json``), whose training images are drawn from the
  dataset's *training split of the study seed*, not from the whole official training set, so that
  the validation split on which modules are chosen, and the test images, are the ones the base
  models' candidates use, unseen by every member. Its own validation split (the study's
  ``validation_fraction`` of its sample, GradSplitter's 8:2) serves its training recipe and its
  decomposition;
- member k (0-based) draws with seed ``seed + k``; GradSplitter's kept estimator indices
  (e.g. 1, 3, 4, 6, …) are not explained, so we take consecutive seeds, and raise a class short of
  ``min_per_class`` to it where GradSplitter redraws the proportions;
- the F1 of a candidate module is measured on the dataset's whole selection split (every class),
  as for the base models; GradSplitter measures it on the pair's module-evaluation images (its
  class and the partner's, 20 % of the test sets), which a pool shared by every pair cannot use.

A member's base model normalises with its own training images' statistics; the selection split
is normalised with them when its modules are scored (:func:`load_candidates`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnnmod.artifacts import read_json
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.hyperparameters import Range, resolve
from dnnmod.modules.combination import combine_scores
from dnnmod.modules.compose import ComposedModel, ComposedPart, normalization_of
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.metrics import binary_metrics, module_scores
from dnnmod.modules.moduleset import ModuleSet

#: images per forward pass of a composed pair model (two fused modules: small activations)
PREDICT_BATCH = 256
SELECTION_SPLITS = ("val", "train")
#: the continuous-learning step's settings (``settings.<name>.continuous_learning``); the
#: paper states none of them: a few epochs of Adam at a fine-tuning rate (Adam's first steps
#: move every weight by about lr. Measured on the demo's digits x shapes pairs: at 0.001 they
#: undid GradSplitter's compositions; at 0.0001 a Pan & Rajan pair fell from 92.6 % to 34.6 %
#: while its training loss fell; at 0.00001 GradSplitter's pair rose from 97.1 % to 99.3 %
#: and Pan & Rajan's from 92.6 % to 94.9 %)
CONTINUOUS_LEARNING = {"epochs": 5, "lr": 0.00001, "batch_size": 64}
CONTINUOUS_LEARNING_RANGES = {"epochs": Range(1), "lr": Range(0, low_open=True),
                              "batch_size": Range(1)}
#: GradSplitter's pool (``settings.<name>.dirichlet_pool``): models per dataset and pool model,
#: the Dirichlet concentration and the minimum images per class (a number, or one per dataset),
#: the seed of the first member's draw, the members' recipe (None: that of the study's base
#: model of the dataset and model) and the approaches that decompose them (None: every approach
#: of the setting)
DIRICHLET_POOL = {"members": 10, "alpha": 1.0, "min_per_class": 1, "seed": 0, "recipe": None,
                  "approaches": None}
DIRICHLET_POOL_RANGES = {"members": Range(1), "seed": Range(0)}


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
    F1 (%) of each of its modules on the selection split. ``draw``: for a base model trained on
    a Dirichlet pool member's task, the draw (source ``dataset``, draw ``seed``, the task's
    ``dirichlet`` record), whose dataset's classes the modules stand for."""

    model: nn.Module
    meta: dict[str, Any]
    modules: ModuleSet
    source: str  # where it came from, for the record (e.g. the module-set path)
    f1: dict[int, float]
    draw: dict[str, Any] | None = None

    @property
    def dataset(self) -> str:
        return self.draw["dataset"] if self.draw else self.meta["dataset"]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.meta.get("model"),
                "arch": self.meta["arch"], "training": self.meta["training"],
                "dataset": self.dataset, "trained_on": self.meta["dataset"],
                "dirichlet": self.draw, "seed": self.meta.get("seed"),
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
    return ComposedModel.from_parts([ComposedPart(part_a.model, part_a.modules, class_a),
                                     ComposedPart(part_b.model, part_b.modules, class_b)],
                                    combination=_combination(part_a, part_b))


def _combination(part_a: Candidate, part_b: Candidate) -> str:
    """The combination rule of both parts' module sets; ArtifactError if they differ."""
    rules = {part_a.modules.combination, part_b.modules.combination}
    if len(rules) != 1:
        raise ArtifactError(f"modules of {part_a.source} and {part_b.source} combine by "
                            f"different rules {sorted(rules)}; compose modules of one approach")
    return rules.pop()


@torch.no_grad()
def predict(composed: ComposedModel, images) -> torch.Tensor:
    """Predicted labels (part positions) of ``composed`` on every image of an ImageSet."""
    predictions = []
    for start in range(0, len(images), PREDICT_BATCH):
        x, _ = images.unit_batch(slice(start, start + PREDICT_BATCH))
        predictions.append(composed.predict(x))
    return torch.cat(predictions)


def resolve_continuous_learning(where: str,
                                settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`CONTINUOUS_LEARNING` overridden by ``settings``; ConfigError naming a bad key or
    value under ``where``."""
    return resolve(where, CONTINUOUS_LEARNING, settings, CONTINUOUS_LEARNING_RANGES)


@dataclass
class _LearningPart:
    """One module of a pair on its own copy of its base model, to retrain: the module set
    restricted to that module (its head's parameters copied) and the base model's input
    statistics."""

    model: nn.Module
    modules: ModuleSet
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, part: Candidate, class_index: int, device: torch.device) -> _LearningPart:
        model = copy.deepcopy(part.model).to(device).eval()
        model.requires_grad_(True)
        modules = part.modules.subset([class_index])
        modules.head.to(device).eval().requires_grad_(True)
        # The statistics each part of a composition normalises its input with (from_parts).
        statistics = normalization_of(part.modules)
        mean, std = (torch.tensor(statistics[key], dtype=torch.float32,
                                  device=device).view(1, -1, 1, 1) for key in ("mean", "std"))
        return cls(model, modules, mean, std)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.modules.head.parameters()]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The module's scores on images ``x`` in [0, 1], with gradients: (batch, 1[, k])."""
        masks = {name: mask.to(x.device) for name, mask in self.modules.masks.items()}
        logits = masked_logits(self.model, self.modules.structure, masks,
                               (x - self.mean) / self.std)
        return self.modules.head(logits)


def continuous_learning_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of a pair's module scores on ``labels`` (the part position of each image's
    class), read as the combination rule reads them (module docstring): (batch, 2, 2) scores
    (V_c, V_uc) of voting as a two-node softmax per module plus one softmax across the
    modules' V_c, (batch, 2) scores of argmax as one softmax across the two modules."""
    if scores.dim() == 3:
        # V_c (node 0) should win on the module's class, V_uc (node 1) on the other's; and
        # where both or neither vote, voting picks the highest V_c, so that should be the
        # right module's (without this term, a demo pair's accuracy fell as its loss did).
        concerned = nn.functional.one_hot(labels, scores.shape[1])
        return (nn.functional.cross_entropy(scores.flatten(0, 1), (1 - concerned).flatten())
                + nn.functional.cross_entropy(scores[..., 0], labels))
    return nn.functional.cross_entropy(scores, labels)


def continue_learning(part_a: Candidate, class_a: int, part_b: Candidate, class_b: int,
                      train, settings: Mapping[str, Any],
                      seed: int = 0) -> tuple[list[ComposedPart], list[dict[str, float]]]:
    """Pan & Rajan's continuous-learning step: modules ``class_a`` of ``part_a`` and
    ``class_b`` of ``part_b``, each on its own copy of its base model, retrained together for
    ``settings["epochs"]`` epochs (Adam, ``lr``, ``batch_size``, batches in a ``seed``ed order)
    on ``train``, the pair task's training ImageSet (labels 0 = class a, 1 = class b), masks
    fixed (see the module docstring). The candidates are left untouched.

    Returns the retrained modules as composable parts and the history (mean training loss and
    accuracy of each epoch).
    """
    settings = resolve_continuous_learning("continuous_learning", settings)
    counts = torch.bincount(train.labels, minlength=2).tolist()
    if len(counts) != 2 or min(counts) == 0:
        raise ArtifactError(f"continuous learning: training labels {counts} are not those of a "
                            "pair task (images of label 0 and 1 only, both present)")
    combination = _combination(part_a, part_b)
    device = train.device
    parts = [_LearningPart.of(part_a, class_a, device), _LearningPart.of(part_b, class_b, device)]
    optimizer = torch.optim.Adam([p for part in parts for p in part.parameters()],
                                 lr=settings["lr"])
    generator = torch.Generator().manual_seed(seed)
    history = []
    with torch.enable_grad():
        for epoch in range(1, settings["epochs"] + 1):
            order = torch.randperm(len(train), generator=generator).to(device)
            loss_sum, correct = 0.0, 0
            for start in range(0, len(order), settings["batch_size"]):
                x, labels = train.unit_batch(order[start:start + settings["batch_size"]])
                scores = torch.cat([part.scores(x) for part in parts], dim=1)
                loss = continuous_learning_loss(scores, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(labels)
                predicted = combine_scores(combination, scores.detach(), (0, 1))
                correct += int((predicted == labels).sum())
            history.append({"epoch": epoch, "train_loss": loss_sum / len(train),
                            "train_accuracy": 100.0 * correct / len(train)})
    tuned = []
    for part, class_index in zip(parts, (class_a, class_b), strict=True):
        part.model.requires_grad_(False)
        part.modules.head.requires_grad_(False)
        tuned.append(ComposedPart(part.model, part.modules, class_index))
    return tuned, history


def _scored(composed: ComposedModel, test) -> dict[str, float]:
    correct = predict(composed, test) == test.labels
    return {"composed_accuracy": 100.0 * correct.float().mean().item(),
            "recall_a": 100.0 * correct[test.labels == 0].float().mean().item(),
            "recall_b": 100.0 * correct[test.labels == 1].float().mean().item()}


def pair_record(pair: Pair, part_a: Candidate, part_b: Candidate, test, train=None,
                continuous_learning: Mapping[str, Any] | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Compose the pair's chosen modules and score them on ``test``, the pair task's test
    ImageSet (labels 0 = class a, 1 = class b). With ``continuous_learning`` settings, the
    modules are also retrained on ``train`` (the pair task's training split;
    :func:`continue_learning`) and the retrained composition scored on ``test`` as well."""
    counts = torch.bincount(test.labels, minlength=2).tolist()
    if len(counts) != 2 or min(counts) == 0:
        raise ArtifactError(f"{pair.task}: test labels {counts} are not those of a pair task "
                            "(images of label 0 and 1 only, both present)")
    composed = compose_pair(part_a, pair.class_a, part_b, pair.class_b).to(test.device)
    record = {
        "task": pair.task, "pair": pair.label,
        "dataset_a": pair.dataset_a, "class_a": pair.class_a,
        "class_name_a": _class_name(part_a.meta, pair.class_a),
        "dataset_b": pair.dataset_b, "class_b": pair.class_b,
        "class_name_b": _class_name(part_b.meta, pair.class_b),
        "module_a": {**part_a.describe(), "selection_f1": part_a.f1[pair.class_a]},
        "module_b": {**part_b.describe(), "selection_f1": part_b.f1[pair.class_b]},
        "test_images": len(test),
        **_scored(composed, test),
    }
    if continuous_learning is not None:
        if train is None:
            raise ArtifactError(f"{pair.task}: continuous learning needs the pair task's "
                                "training images")
        started = time.monotonic()
        tuned, history = continue_learning(part_a, pair.class_a, part_b, pair.class_b, train,
                                           continuous_learning, seed)
        retrained = ComposedModel.from_parts(tuned, combination=_combination(part_a, part_b))
        record["continuous_learning"] = {
            **_scored(retrained.to(test.device), test), "train_images": len(train),
            "history": history, "seconds": time.monotonic() - started}
    return record


def compose_new_tasks(candidates: Sequence[Candidate], pairs: Sequence[Pair],
                      tests: Mapping[str, Any], trains: Mapping[str, Any] | None = None,
                      continuous_learning: Mapping[str, Any] | None = None,
                      seed: int = 0) -> list[dict[str, Any]]:
    """One record per pair: the chosen modules, composed, scored on ``tests[pair.task]``;
    with ``continuous_learning`` settings also retrained on ``trains[pair.task]`` and scored
    again (:func:`pair_record`)."""
    records = []
    for pair in pairs:
        part_a = choose_module(candidates, pair.dataset_a, pair.class_a)
        part_b = choose_module(candidates, pair.dataset_b, pair.class_b)
        train = trains.get(pair.task) if trains is not None else None
        records.append(pair_record(pair, part_a, part_b, tests[pair.task], train,
                                   continuous_learning, seed))
    return records


def _class_name(meta: Mapping[str, Any], cls: int) -> str:
    names = meta.get("class_names")
    return str(names[cls]) if names else str(cls)


def load_candidates(paths: Sequence[tuple[Any, Any]], data_root, selection_split: str = "val",
                    device: str = "cpu") -> list[Candidate]:
    """Candidates from (module set, base model) paths, each set checked to belong to its model,
    with the binary F1 of its modules on ``selection_split`` of the model's dataset (the split
    of the model's seed; each dataset loaded once), normalised with the model's own statistics.
    A model trained on a Dirichlet pool member's task is scored on its source dataset's split."""
    from dnnmod.data import load_dataset
    from dnnmod.training.model_io import load_model

    if selection_split not in SELECTION_SPLITS:
        raise ConfigError(f"selection split {selection_split!r} is not one of "
                          f"{list(SELECTION_SPLITS)}")
    splits: dict[tuple[str, int], Any] = {}
    candidates = []
    for modules_path, model_path in paths:
        model, meta = load_model(model_path, device=device)
        modules = ModuleSet.load(modules_path, base=meta, model=model)
        draw = pool_draw(data_root, meta, model_path)
        key = (draw["dataset"] if draw else meta["dataset"], meta["seed"])
        if key not in splits:
            splits[key] = getattr(load_dataset(data_root, *key, device=device), selection_split)
        images = splits[key]
        if draw and list(images.class_names) != list(meta["class_names"]):
            raise ArtifactError(f"{model_path}: trained on {meta['dataset']}, whose classes "
                                f"{meta['class_names']} are not those of {key[0]} "
                                f"{images.class_names}")
        statistics = normalization_of(modules)
        images = dataclasses.replace(images, **{
            name: torch.tensor(statistics[name], dtype=torch.float32, device=images.device)
            for name in ("mean", "std")})
        candidates.append(Candidate(model=model, meta=meta, modules=modules,
                                    source=str(modules_path),
                                    f1=selection_f1(model, modules, images), draw=draw))
    return candidates


def pool_draw(data_root, meta: Mapping[str, Any], model_path) -> dict[str, Any] | None:
    """The Dirichlet draw of the task a model (``meta``) was trained on, from the task's
    ``meta.json`` under ``data_root``: source ``dataset``, draw ``seed`` and the ``dirichlet``
    record; None for a model of a dataset or of another task. ArtifactError if the draw is
    not one a pool member's modules can stand for its dataset with (not every class in order,
    or drawn from the training split of another seed than the model's, whose validation split
    it may have trained on)."""
    task_meta = Path(data_root) / meta["dataset"] / "meta.json"
    source = read_json(task_meta).get("source", {}) if task_meta.is_file() else {}
    if source.get("kind") != "task" or "dirichlet" not in source:
        return None
    (part,) = source["parts"]
    if part["classes"] != list(range(len(meta["class_names"]))):
        raise ArtifactError(f"{task_meta}: the draw keeps classes {part['classes']} of "
                            f"{part['dataset']}; a pool member keeps every class in order")
    if source["dirichlet"]["split_seed"] != meta["seed"]:
        raise ArtifactError(f"{model_path}: a seed-{meta['seed']} model trained on "
                            f"{meta['dataset']}, drawn from the training split of seed "
                            f"{source['dirichlet']['split_seed']}: its modules would be chosen "
                            "on images it may have trained on")
    return {"dataset": part["dataset"], "seed": source["seed"], **source["dirichlet"]}


@dataclass(frozen=True)
class PoolMember:
    """One model of a setting's Dirichlet pool: ``model`` trained with ``recipe`` on a
    class-imbalanced draw (``alpha``, ``min_per_class``, draw seed ``draw``) from the training
    split of ``dataset`` (``num_classes`` classes) of the study seed, the derived task
    :meth:`task`. Models of every setting and pool model share the task of the same draw."""

    dataset: str
    num_classes: int
    model: str
    recipe: str
    alpha: float
    min_per_class: int
    draw: int

    def task(self, seed: int) -> str:
        """The derived task's name; it names everything its images depend on (data roots are
        shared between studies): alpha as its repr with ``.`` → ``p`` and ``-`` → ``m``."""
        alpha = repr(self.alpha).replace(".", "p").replace("-", "m").replace("+", "")
        return (f"{self.dataset}_dir{alpha}_min{self.min_per_class}_draw{self.draw}"
                f"_split{seed}")

    def task_spec(self, seed: int) -> dict[str, Any]:
        """The ``tasks:`` entry (:class:`dnnmod.data.Task`) that derives :meth:`task`."""
        return {"parts": [{"dataset": self.dataset, "classes": list(range(self.num_classes))}],
                "seed": self.draw,
                "dirichlet": {"alpha": self.alpha, "min_per_class": self.min_per_class,
                              "split_seed": seed}}


@dataclass(frozen=True)
class SettingPlan:
    """What the workflow runs for one setting: its pairs, per approach the candidate module
    sets' base models, and the settings of the continuous-learning step (None: the plain
    composition only).

    ``candidates``: approach → the (dataset, model) of the study's base models whose module sets
    are candidates, empty for an approach the Dirichlet pool serves; ``members``: approach → its
    Dirichlet pool members (none without ``dirichlet_pool``).
    """

    name: str
    datasets: tuple[str, str]
    model: str
    pairs: tuple[Pair, ...]
    candidates: Mapping[str, tuple[tuple[str, str], ...]]
    continuous_learning: Mapping[str, Any] | None = None
    members: Mapping[str, tuple[PoolMember, ...]] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``intra``: both classes from one dataset; ``inter``: from two."""
        return setting_kind(*self.datasets)

    def trained_models(self, approach: str, seed: int) -> list[tuple[str, str]]:
        """(dataset or pool member's task, model) of every candidate of ``approach``, in pool
        order, for the study ``seed``."""
        return [*self.candidates[approach],
                *((member.task(seed), member.model) for member in self.members.get(approach, ()))]


def setting_kind(dataset_a: str, dataset_b: str) -> str:
    return "intra" if dataset_a == dataset_b else "inter"


def resolve_dirichlet_pool(where: str, entry: Any, datasets: Sequence[str],
                           pool: Sequence[str], config: Mapping[str, Any],
                           num_classes: Mapping[str, int]) -> tuple[list[str] | None,
                                                                    tuple[PoolMember, ...]]:
    """The approaches (None: every approach of the setting) and members of the Dirichlet pool
    ``entry`` (:data:`DIRICHLET_POOL` overridden) of a setting with ``datasets`` and ``pool``
    models; ConfigError naming the key under ``where``."""
    from dnnmod.approaches import APPROACHES
    from dnnmod.study import expand_base_models

    if not isinstance(entry, Mapping):  # resolve takes None for no overrides; a pool needs keys
        raise ConfigError(f"{where}: expected a mapping of {sorted(DIRICHLET_POOL)}; got "
                          f"{entry!r}")
    # alpha and min_per_class take a number or a mapping dataset → number: _per_dataset checks
    settings = resolve(where, {**DIRICHLET_POOL, "alpha": None, "min_per_class": None}, entry,
                       DIRICHLET_POOL_RANGES)
    datasets = list(dict.fromkeys(datasets))
    alpha = _per_dataset(f"{where}.alpha", entry.get("alpha", DIRICHLET_POOL["alpha"]),
                         datasets, float)
    minimum = _per_dataset(f"{where}.min_per_class",
                           entry.get("min_per_class", DIRICHLET_POOL["min_per_class"]),
                           datasets, int)
    approaches = settings["approaches"]
    if approaches is not None:
        if (not isinstance(approaches, list) or not approaches
                or len(set(approaches)) != len(approaches)):
            raise ConfigError(f"{where}.approaches: expected a non-empty list of distinct "
                              f"approaches; got {approaches!r}")
        unknown = [a for a in approaches if a not in APPROACHES]
        if unknown:
            raise ConfigError(f"{where}.approaches: {unknown[0]!r} is not an approach "
                              f"(known: {sorted(APPROACHES)})")
    recipe = settings["recipe"]
    if recipe is not None and recipe not in config["recipes"]:
        raise ConfigError(f"{where}.recipe: {recipe!r} is not defined under recipes (defined: "
                          f"{sorted(config['recipes'])})")
    base_models = expand_base_models(config) if "base_models" in config else {}
    members = []
    for dataset in datasets:
        for model in pool:
            if recipe is None and (dataset, model) not in base_models:
                raise ConfigError(f"{where}.recipe: not given, and {model} on {dataset} is not "
                                  "a base model of the study whose recipe the members could take")
            members += [PoolMember(dataset, num_classes[dataset], model,
                                   recipe or base_models[dataset, model], alpha[dataset],
                                   minimum[dataset], settings["seed"] + k)
                        for k in range(settings["members"])]
    return approaches, tuple(members)


def _per_dataset(where: str, value: Any, datasets: Sequence[str], kind: type) -> dict[str, Any]:
    """A positive number (``kind`` int: an integer >= 1) for every dataset: one for all, or a
    mapping dataset → number naming each of ``datasets``."""
    values = value if isinstance(value, Mapping) else dict.fromkeys(datasets, value)
    missing = [d for d in datasets if d not in values]
    unknown = [d for d in values if d not in datasets]
    if missing or unknown:
        raise ConfigError(f"{where}: expected a value for each of the setting's datasets "
                          f"{datasets}; missing {missing}, unknown {unknown}")
    for dataset, number in values.items():
        valid = (not isinstance(number, bool) and isinstance(number, int)
                 and number >= 1) if kind is int else (
            not isinstance(number, bool) and isinstance(number, int | float)
            and math.isfinite(number) and number > 0)
        if not valid:
            what = "an integer >= 1" if kind is int else "a finite number > 0"
            key = f"{where}.{dataset}" if isinstance(value, Mapping) else where
            raise ConfigError(f"{key}: expected {what}; got {number!r}")
    return {dataset: kind(number) for dataset, number in values.items()}


def plan_new_tasks(config: Mapping[str, Any],
                   modularizations: Sequence[tuple[str, str, str]]) -> dict[str, SettingPlan]:
    """Setting name → plan, for ``reuse.new_tasks`` of a study config (none: empty).

    An approach takes part in a setting when it decomposed at least one pool model of each of
    the two datasets (``modularize`` entries), or when the setting's ``dirichlet_pool`` names it;
    the pool's approaches (by default every approach taking part) compose from its members
    instead of the base models. A setting no approach can serve has no plan. Names that do not
    resolve, and bad ``continuous_learning`` or ``dirichlet_pool`` settings, are a ConfigError
    naming the key.
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
        members = {}
        if setting.get("dirichlet_pool") is not None:
            approaches, pool_members = resolve_dirichlet_pool(
                f"{where}.dirichlet_pool", setting["dirichlet_pool"], datasets, pool, config,
                num_classes)
            for approach in approaches or list(candidates):
                candidates[approach] = ()
                members[approach] = pool_members
        continuous_learning = setting.get("continuous_learning")
        if continuous_learning is not None:
            continuous_learning = resolve_continuous_learning(f"{where}.continuous_learning",
                                                              continuous_learning)
        if candidates:
            plans[name] = SettingPlan(name, tuple(setting["datasets"]), model, tuple(pairs),
                                      candidates, continuous_learning, members)
    return plans


def pool_tasks(plans: Mapping[str, SettingPlan], seeds: Sequence[int]) -> dict[str, dict]:
    """Task name → ``tasks:`` entry of every Dirichlet pool member of ``plans`` and seed."""
    return {member.task(seed): member.task_spec(seed)
            for plan in plans.values() for members in plan.members.values()
            for member in members for seed in seeds}


def pool_recipes(plans: Mapping[str, SettingPlan], seeds: Sequence[int]
                 ) -> dict[tuple[str, str], str]:
    """(pool member's task, model) → recipe name, of every member of ``plans`` and seed; a
    ConfigError if two settings train the same member with different recipes."""
    recipes: dict[tuple[str, str], tuple[str, str]] = {}
    for plan in plans.values():
        for member in dict.fromkeys(m for members in plan.members.values() for m in members):
            for seed in seeds:
                key = (member.task(seed), member.model)
                earlier = recipes.setdefault(key, (member.recipe, plan.name))
                if earlier[0] != member.recipe:
                    raise ConfigError(
                        f"reuse.new_tasks.settings.{plan.name}.dirichlet_pool.recipe: trains "
                        f"{member.model} on {key[0]} with recipe {member.recipe!r}, setting "
                        f"{earlier[1]} with {earlier[0]!r}; give both the same recipe")
    return {key: recipe for key, (recipe, _) in recipes.items()}

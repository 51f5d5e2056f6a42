"""Derived tasks: datasets made from the classes of prepared datasets.

A task takes classes from one or more prepared datasets (a class subset of one dataset, or a
union of classes of several), optionally a fixed number of images per class in each official
split, drawn seeded and stratified; a part may draw its own number (E3's weak tasks give their
target class fewer training images than the other classes). :func:`derive_task` writes it in
exactly the layout of a prepared dataset (``<root>/<task>/images.safetensors`` + ``meta.json``,
see :mod:`dnnmod.data.registry`), so that splitting, :func:`~dnnmod.data.load_dataset`,
training and every later step treat a task as one more dataset. Its labels are 0..k-1 in part order,
then in the order of each part's classes; its channel statistics are those of its own
training images; ``meta.json`` records the parts and the source datasets they came from.

A task with a ``dirichlet`` draw (:class:`DirichletDraw`, GradSplitter's pool of models for new
tasks) takes its training images from one dataset's *training split* of a seed, class-imbalanced
by Dirichlet proportions, and its test images from the official test set: the validation split
of that seed stays unseen by a model trained on the task.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import save_tensors, sha256_file, write_json
from ..errors import ConfigError
from ..hyperparameters import Range, resolve
from .dataset import ImageSet, combine, load_dataset, load_prepared
from .registry import DATASETS, ClassInventory, channel_stats, images_path, split_path

SPLITS = ("train", "test")
_LISTED_CLASSES = 20  # a class-name error lists a dataset's classes up to this many
_NAME = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class TaskPart:
    """Classes of one source dataset, each by index or by class name, in task order.

    ``samples_per_class`` overrides the task's count per split for this part's classes.
    """

    dataset: str
    classes: tuple[int | str, ...]
    samples_per_class: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def count(self, task: Task, position: int, split: str) -> tuple[int | None, str]:
        """Images drawn per class of this part (``task.parts[position]``) from ``split`` (None:
        all of them), and the config key that asks for them."""
        if split in self.samples_per_class:
            return (self.samples_per_class[split],
                    f"tasks.{task.name}.parts[{position}].samples_per_class.{split}")
        return task.samples_per_class.get(split), f"tasks.{task.name}.samples_per_class.{split}"


@dataclass(frozen=True)
class DirichletDraw:
    """A class-imbalanced training set as GradSplitter draws one per model of its pool.

    Proportions p ~ Dirichlet(``alpha`` · 1) over the task's classes, drawn with the task's
    seed; class c keeps ``floor(p_c / max(p) · n_c)`` of its ``n_c`` images in the source
    dataset's training split of ``split_seed`` (the most favoured class keeps them all), and at
    least ``min_per_class``. Small ``alpha`` skews the counts, large ``alpha`` evens them out.
    GradSplitter redraws p until every class has its minimum; raising the short classes to the
    minimum instead always ends, and keeps the draw as skewed as it came.
    """

    alpha: float
    split_seed: int
    min_per_class: int = 1

    DEFAULTS = {"alpha": 1.0, "split_seed": 0, "min_per_class": 1}
    RANGES = {"alpha": Range(0, low_open=True), "split_seed": Range(0),
              "min_per_class": Range(1)}

    @classmethod
    def from_config(cls, where: str, entry: Any) -> DirichletDraw:
        """The draw of config entry ``where`` (``{alpha, split_seed[, min_per_class]}``);
        ConfigError naming the key at fault."""
        _check_keys(where, entry, required={"alpha", "split_seed"},
                    optional={"min_per_class"})
        values = resolve(where, cls.DEFAULTS, entry, cls.RANGES)
        if not math.isfinite(values["alpha"]):
            raise ConfigError(f"{where}.alpha: expected a finite number > 0; got "
                              f"{values['alpha']!r}")
        return cls(float(values["alpha"]), values["split_seed"], values["min_per_class"])

    def to_config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "split_seed": self.split_seed,
                "min_per_class": self.min_per_class}


@dataclass(frozen=True)
class Task:
    """A task as configured under ``tasks.<name>``.

    ``samples_per_class`` maps a split (``train``, ``test``) to the number of images drawn per
    class; a split it leaves out keeps all images of the chosen classes. ``seed`` seeds the
    draw (independently per split). ``dirichlet`` makes the training images a class-imbalanced
    draw from the one part's dataset instead (:class:`DirichletDraw`).
    """

    name: str
    parts: tuple[TaskPart, ...]
    samples_per_class: Mapping[str, int]
    seed: int = 0
    dirichlet: DirichletDraw | None = None

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any]) -> Task:
        """The task of config entry ``tasks.<name>``; ConfigError naming the key at fault (the
        workflow's schema checks the same shapes, the command line relies on this)."""
        where = f"tasks.{name}"
        if not _NAME.match(name):
            raise ConfigError(f"{where}: a task name must match {_NAME.pattern}")
        if name in DATASETS:
            raise ConfigError(f"{where}: {name!r} is a registered dataset; a task needs a name "
                              f"of its own (it is written to <data root>/{name}/)")
        _check_keys(where, entry, required={"parts"},
                    optional={"samples_per_class", "seed", "dirichlet"})
        parts = entry["parts"]
        if not isinstance(parts, list) or not parts:
            raise ConfigError(f"{where}.parts: expected a non-empty list of "
                              "{dataset, classes} entries")
        checked = []
        for position, part in enumerate(parts):
            part_where = f"{where}.parts[{position}]"
            _check_keys(part_where, part, required={"dataset", "classes"},
                        optional={"samples_per_class"})
            classes = part["classes"]
            if (not isinstance(classes, list) or not classes or not all(
                    isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool))
                    for c in classes)):
                raise ConfigError(f"{part_where}.classes: expected a non-empty list of class "
                                  f"indices or class names; got {classes!r}")
            checked.append(TaskPart(str(part["dataset"]), tuple(classes), _sample_counts(
                f"{part_where}.samples_per_class", part.get("samples_per_class", {}))))
        samples = _sample_counts(f"{where}.samples_per_class", entry.get("samples_per_class", {}))
        seed = entry.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{where}.seed: expected an integer >= 0; got {seed!r}")
        dirichlet = None
        if "dirichlet" in entry:
            dirichlet = DirichletDraw.from_config(f"{where}.dirichlet", entry["dirichlet"])
            if len(checked) != 1:
                raise ConfigError(f"{where}.dirichlet: draws from the training split of one "
                                  f"dataset; the task has {len(checked)} parts")
            if "train" in samples or "train" in checked[0].samples_per_class:
                raise ConfigError(f"{where}: samples_per_class.train and dirichlet both say how "
                                  "many training images to draw; give one")
        return cls(name, tuple(checked), dict(samples), seed, dirichlet)

    @property
    def datasets(self) -> list[str]:
        """The source datasets, in order of first use."""
        return list(dict.fromkeys(part.dataset for part in self.parts))

    def inventory(self, sources: Mapping[str, ClassInventory],
                  validation_fraction: float = 0.2) -> ClassInventory:
        """Check the task against what the datasets it may use hold (name → inventory), before
        any is prepared, and return the task's own inventory (a task of its classes can be
        checked in turn). Each part names one of them, its classes exist and are distinct, no
        class is asked for more images than its split has, and a Dirichlet draw's minimum fits
        each class's share of the training split (``validation_fraction`` goes to validation).
        ConfigError naming the key, the dataset and the value."""
        indices = self.resolve({name: source.class_names for name, source in sources.items()})
        several = len(self.datasets) > 1
        class_names: list[str] = []
        per_class: dict[str, list[int | None]] = {split: [] for split in SPLITS}
        for position, (part, classes) in enumerate(zip(self.parts, indices, strict=True)):
            source = sources[part.dataset]
            class_names += _qualified(part.dataset, [source.class_names[c] for c in classes],
                                      several)
            for split in SPLITS:
                count, where = part.count(self, position, split)
                for index in classes:
                    available = source.per_class[split][index]
                    name = source.class_names[index]
                    if split == "train" and self.dirichlet is not None:
                        # the draw's size is random: only its minimum is known before
                        _check_dirichlet_minimum(f"tasks.{self.name}.dirichlet", self.dirichlet,
                                                 part.dataset, name, available,
                                                 validation_fraction)
                        per_class[split].append(None)
                        continue
                    if count is not None and available is not None and count > available:
                        raise ConfigError(f"{where}: {count} images per class asked for, but "
                                          f"class {name!r} of {part.dataset} has only "
                                          f"{available} in its {split} split")
                    per_class[split].append(available if count is None else count)
        return ClassInventory(tuple(class_names),
                              {split: tuple(counts) for split, counts in per_class.items()})

    def resolve(self, class_names: Mapping[str, Sequence[str]]) -> list[list[int]]:
        """The class indices of every part, names looked up in ``class_names[dataset]``."""
        taken: dict[tuple[str, int], str] = {}
        resolved = []
        for position, part in enumerate(self.parts):
            where = f"tasks.{self.name}.parts[{position}]"
            if part.dataset not in class_names:
                raise ConfigError(f"{where}.dataset: {part.dataset!r} is not a configured "
                                  f"dataset (configured: {sorted(class_names)})")
            indices = [_class_index(f"{where}.classes", value, part.dataset,
                                    class_names[part.dataset]) for value in part.classes]
            for value, index in zip(part.classes, indices, strict=True):
                if (part.dataset, index) in taken:
                    raise ConfigError(f"{where}.classes: class {value!r} of {part.dataset} is "
                                      f"already in the task ({taken[part.dataset, index]})")
                taken[part.dataset, index] = f"{where}.classes"
            resolved.append(indices)
        return resolved


def _sample_counts(where: str, samples: Any) -> dict[str, int]:
    """A checked ``samples_per_class`` mapping (split → images per class)."""
    if not isinstance(samples, Mapping):
        raise ConfigError(f"{where}: expected a mapping split → count")
    _check_keys(where, samples, required=set(), optional=set(SPLITS))
    for split, count in samples.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{where}.{split}: expected an integer >= 1; got {count!r}")
    return dict(samples)


def _check_keys(where: str, entry: Any, required: set[str], optional: set[str]) -> None:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping; got {entry!r}")
    missing, unknown = required - set(entry), set(entry) - required - optional
    if missing:
        raise ConfigError(f"{where}: missing keys {sorted(missing)}")
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: "
                          f"{sorted(required | optional)}")


def _class_index(where: str, value: int | str, dataset: str, known: Sequence[str]) -> int:
    """The class index ``value`` (an index or a class name) stands for in ``dataset``, whose
    classes are ``known``."""
    count = len(known)
    if isinstance(value, int):
        if not 0 <= value < count:
            raise ConfigError(f"{where}: class {value} is out of range: {dataset} has {count} "
                              f"classes (0..{count - 1})")
        return value
    if value not in known:
        if len(known) <= _LISTED_CLASSES:
            listed = f"its classes: {', '.join(known)}"
        else:  # a hundred names would bury the message
            close = difflib.get_close_matches(value, known, n=3, cutoff=0.5)
            listed = (f"closest: {', '.join(close)}; " if close else "") + \
                f"{len(known)} classes, named in <data root>/{dataset}/meta.json once prepared"
        raise ConfigError(f"{where}: {dataset} has no class {value!r}; {listed}")
    return list(known).index(value)


def _qualified(dataset: str, class_names: Sequence[str], several: bool) -> list[str]:
    """A task's names of ``dataset``'s classes: prefixed with the dataset where the task takes
    several (digit 7 of digits and of svhn share the name)."""
    return [f"{dataset}/{name}" for name in class_names] if several else list(class_names)


def _check_dirichlet_minimum(where: str, draw: DirichletDraw, dataset: str, class_name: str,
                             available: int | None, validation_fraction: float) -> None:
    """The draw's ``min_per_class`` against the class's images in the training split (the
    split gives ``round(validation_fraction · n)`` of its n images to validation)."""
    if available is None:
        return
    in_training_split = available - round(validation_fraction * available)
    if draw.min_per_class > in_training_split:
        raise ConfigError(f"{where}.min_per_class: {draw.min_per_class} images per class asked "
                          f"for, but class {class_name!r} of {dataset} has only "
                          f"{in_training_split} in the training split")


def derive_task(task: Task, root: Path) -> Path:
    """Make ``task`` from the prepared datasets under ``root``; return its directory.

    Written with the atomic writers, tensors first and meta.json last, as ``prepare`` does.
    Asking for more images per class than a class has is a ConfigError naming the key.
    """
    root = Path(root)
    loaded = {name: load_prepared(root, name) for name in task.datasets}
    sets = {name: {"train": train, "test": test} for name, (train, test, _) in loaded.items()}
    metas = {name: meta for name, (_, _, meta) in loaded.items()}
    if task.dirichlet is not None:
        # Drawn from the training split of the seed: its validation split stays unseen.
        (source,) = task.datasets
        sets[source]["train"] = load_dataset(root, source, task.dirichlet.split_seed).train
    indices = task.resolve({name: meta["class_names"] for name, meta in metas.items()})
    several = len(metas) > 1
    tensors: dict[str, torch.Tensor] = {}
    for split_number, split in enumerate(SPLITS):
        parts = []
        for part, classes in zip(task.parts, indices, strict=True):
            subset = sets[part.dataset][split].subset(classes)
            parts.append(dataclasses.replace(
                subset, class_names=_qualified(part.dataset, subset.class_names, several)))
        try:
            union = combine(parts)
        except ConfigError as err:
            raise ConfigError(f"tasks.{task.name}.parts: {err}") from None
        rng = np.random.default_rng([task.seed, split_number])
        if split == "train" and task.dirichlet is not None:
            chosen, drawn = _dirichlet_sample(union, task.dirichlet, rng,
                                              f"tasks.{task.name}.dirichlet")
        else:
            counts = [part.count(task, position, split)
                      for position, (part, classes) in enumerate(
                          zip(task.parts, indices, strict=True)) for _ in classes]
            chosen = _stratified_sample(union, counts, rng)
        tensors[f"{split}_images"], tensors[f"{split}_labels"] = chosen.images, chosen.labels
        class_names = chosen.class_names
    out_dir = root / task.name
    save_tensors(out_dir / "images.safetensors", tensors,
                 metadata={"dataset": task.name, "task": "true"})
    mean, std = channel_stats(tensors["train_images"].numpy())
    write_json(out_dir / "meta.json", {
        "name": task.name,
        "num_classes": len(class_names),
        "class_names": class_names,
        "image_size": metas[task.datasets[0]]["image_size"],
        "channels_mean": mean,
        "channels_std": std,
        "source": {
            "kind": "task",
            "parts": [{"dataset": part.dataset, "classes": classes,
                       "class_names": [metas[part.dataset]["class_names"][c] for c in classes],
                       **({"samples_per_class": dict(part.samples_per_class)}
                          if part.samples_per_class else {})}
                      for part, classes in zip(task.parts, indices, strict=True)],
            "samples_per_class": dict(task.samples_per_class),
            "seed": task.seed,
            **({} if task.dirichlet is None else {"dirichlet": {
                **drawn, "split_sha256": sha256_file(
                    split_path(root, task.datasets[0], task.dirichlet.split_seed))}}),
            "datasets": {name: {"images_sha256": sha256_file(images_path(root, name)),
                                "source": meta["source"]}
                         for name, meta in metas.items()},
        },
        "transform": "classes of " + ", ".join(task.datasets) + ", relabelled 0..k-1 in part "
                     "order" + ("" if task.dirichlet is None else "; training images a "
                                "Dirichlet-imbalanced draw from the training split of seed "
                                f"{task.dirichlet.split_seed}")
                     + "; channel statistics of the task's training images",
        "counts": {split: len(tensors[f"{split}_labels"]) for split in SPLITS},
    })
    return out_dir


def _stratified_sample(images: ImageSet, counts: Sequence[tuple[int | None, str]],
                       rng: np.random.Generator) -> ImageSet:
    """``counts[c][0]`` images of class c drawn with ``rng`` (all of them if None), in their
    original order; ``counts[c][1]`` names the config key that asked for them."""
    if all(count is None for count, _ in counts):
        return images
    labels = images.labels.numpy()
    chosen = []
    for label, (name, (count, where)) in enumerate(zip(images.class_names, counts, strict=True)):
        members = np.flatnonzero(labels == label)
        if count is not None and count > len(members):
            raise ConfigError(f"{where}: {count} images per class asked for, but class {name!r} "
                              f"has only {len(members)}")
        chosen.append(members if count is None else rng.permutation(members)[:count])
    return images.take(np.sort(np.concatenate(chosen)))


def _dirichlet_sample(images: ImageSet, draw: DirichletDraw, rng: np.random.Generator,
                      where: str) -> tuple[ImageSet, dict[str, Any]]:
    """The class-imbalanced draw of ``draw`` from ``images`` (in their original order) and its
    record: the Dirichlet proportions, the images available and kept per class."""
    labels = images.labels.cpu().numpy()
    available = np.bincount(labels, minlength=images.num_classes)
    for name, count in zip(images.class_names, available, strict=True):
        if count < draw.min_per_class:
            raise ConfigError(f"{where}.min_per_class: {draw.min_per_class} images per class "
                              f"asked for, but class {name!r} has only {count} in the "
                              "training split")
    proportions = rng.dirichlet(np.full(images.num_classes, draw.alpha))
    kept = np.floor(proportions / proportions.max() * available).astype(np.int64)
    counts = np.maximum(kept, draw.min_per_class)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:count]
              for label, count in enumerate(counts)]
    return images.take(np.sort(np.concatenate(chosen))), {
        **draw.to_config(), "proportions": proportions.tolist(),
        "available_per_class": available.tolist(), "kept_per_class": counts.tolist()}

"""In-memory image sets: uint8 tensors kept on the device, normalised per batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..artifacts import load_tensors, read_json
from ..errors import ArtifactError, ConfigError
from .registry import images_path, labels_fingerprint, make_splits, split_path


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images (uint8, N x 3 x H x W) with int64 labels, class names and normalisation statistics.

    ``labels[i]`` indexes ``class_names``; ``mean``/``std`` (shape 3, in [0, 1] units) are the
    statistics the images are normalised with, normally those of the dataset's train split.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def take(self, index: torch.Tensor | Sequence[int]) -> ImageSet:
        """The images at ``index`` (positions in this set), same classes."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return ImageSet(self.images[index], self.labels[index], self.class_names, self.mean,
                        self.std)

    def sample(self, limit: int | None, seed: int) -> ImageSet:
        """A seeded random subset of ``limit`` images, in their original order (the whole set
        when ``limit`` is None or not smaller than it)."""
        return self.sample_and_rest(limit, seed)[0]

    def sample_and_rest(self, limit: int | None, seed: int) -> tuple[ImageSet, ImageSet | None]:
        """:meth:`sample`, and the images it left out, in their original order (None when it
        left none out)."""
        if limit is None or limit >= len(self):
            return self, None
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return (self.take(order[:limit].sort().values.to(self.device)),
                self.take(order[limit:].sort().values.to(self.device)))

    def subset(self, classes: Sequence[int], relabel: bool = True) -> ImageSet:
        """The images of ``classes``; with ``relabel`` their labels become 0..k-1 in the given
        order (and ``class_names`` follows), otherwise labels and names are kept."""
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad or len(set(classes)) != len(classes):
            raise ConfigError(f"subset classes {classes}: need distinct values in "
                              f"0..{self.num_classes - 1}")
        wanted = torch.tensor(classes, dtype=torch.long, device=self.device)
        picked = self.take(torch.isin(self.labels, wanted).nonzero().flatten())
        if not relabel:
            return picked
        new_label = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        new_label[wanted] = torch.arange(len(classes), device=self.device)
        return ImageSet(picked.images, new_label[picked.labels],
                        [self.class_names[c] for c in classes], self.mean, self.std)

    def unit_batch(self, index: torch.Tensor | slice | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 images in [0, 1], not normalised, and labels at ``index``: the input of
        models that normalise by themselves (composed models whose parts come from models
        trained on different datasets)."""
        index = slice(None) if index is None else index
        return self.images[index].float().div_(255), self.labels[index]

    def float_batch(self, index: torch.Tensor | slice | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images ``(x / 255 - mean) / std`` and labels at ``index``."""
        x, labels = self.unit_batch(index)
        x = x.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))
        return x, labels

    def to(self, device: str | torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.class_names,
                        self.mean.to(device), self.std.to(device))


def combine(sets: Sequence[ImageSet], mean: torch.Tensor | None = None,
            std: torch.Tensor | None = None) -> ImageSet:
    """Concatenate sets as one task whose classes are the sets' classes in order: set k's
    labels are shifted by the class count of the sets before it. Normalised with ``mean``/
    ``std`` if given, else with the first set's (so the parts of a task split all agree).

    Example, a CIFAR weak-model task: ``combine([c100.subset(nine), c10.subset([tc])])``.
    """
    if not sets:
        raise ConfigError("combine needs at least one image set")
    shapes = {tuple(s.images.shape[1:]) for s in sets}
    if len(shapes) != 1:
        raise ConfigError(f"combine: image shapes differ: {sorted(shapes)}")
    offsets = torch.cumsum(torch.tensor([0] + [s.num_classes for s in sets[:-1]]), 0).tolist()
    first = sets[0]
    return ImageSet(
        torch.cat([s.images for s in sets]),
        torch.cat([s.labels + offset for s, offset in zip(sets, offsets, strict=True)]),
        [name for s in sets for name in s.class_names],
        first.mean if mean is None else torch.as_tensor(mean, device=first.device),
        first.std if std is None else torch.as_tensor(std, device=first.device))


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Train/validation (seeded split of the official train set) and the official test set."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def subset(self, classes: Sequence[int], relabel: bool = True) -> DatasetSplits:
        return DatasetSplits(self.train.subset(classes, relabel), self.val.subset(classes, relabel),
                             self.test.subset(classes, relabel), self.meta)


def load_dataset(root: Path, name: str, seed: int, device: str | torch.device = "cpu"
                 ) -> DatasetSplits:
    """Load a prepared dataset (or derived task) onto ``device`` with the train/val split of
    ``seed`` (made with the default validation fraction if it does not exist yet)."""
    official_train, test, meta = load_prepared(root, name, device)
    split_file = split_path(root, name, seed)
    fingerprint = labels_fingerprint(official_train.labels.cpu().numpy())
    if _split_metadata(split_file).get("train_labels_md5") != fingerprint:
        make_splits(root, name, seed)  # missing, or drawn from data prepared before
    split = load_tensors(split_file, device=device)
    return DatasetSplits(train=official_train.take(split["train_index"]),
                         val=official_train.take(split["val_index"]), test=test, meta=meta)


def load_prepared(root: Path, name: str, device: str | torch.device = "cpu"
                  ) -> tuple[ImageSet, ImageSet, dict[str, Any]]:
    """The official train and test sets of a prepared dataset (or derived task), unsplit, with
    its meta.json."""
    tensors = load_tensors(images_path(root, name), device=device)
    meta_file = Path(root) / name / "meta.json"
    meta = read_json(meta_file)
    train_count = len(tensors["train_labels"])
    if meta.get("counts", {}).get("train") != train_count:
        raise ArtifactError(f"{meta_file}: does not describe the {train_count} prepared training "
                            f"images; prepare {name} again")
    mean = torch.tensor(meta["channels_mean"], dtype=torch.float32, device=device)
    std = torch.tensor(meta["channels_std"], dtype=torch.float32, device=device)
    names = list(meta["class_names"])
    return (ImageSet(tensors["train_images"], tensors["train_labels"], names, mean, std),
            ImageSet(tensors["test_images"], tensors["test_labels"], names, mean, std), meta)


def _split_metadata(path: Path) -> dict[str, str]:
    """Metadata of a split file; empty if it is missing or unreadable (then it is remade)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError):
        return {}

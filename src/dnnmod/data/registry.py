"""The dataset registry, ``prepare`` (download + parse + save) and seeded train/val splits.

Layout under the data root, per dataset ``name``::

    name/raw/...                     downloaded files, kept so a rerun needs no network
    name/images.safetensors          uint8 train_images (N,3,H,W), int64 train_labels,
                                     test_images, test_labels
    name/meta.json                   classes, image size, per-channel mean/std, provenance
    name/splits/seed{S}.safetensors  int64 train_index, val_index into the official train set
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import load_tensors, save_tensors, write_json
from ..errors import ArtifactError, ChecksumError, ConfigError
from ..plugins import GROUPS, Registry
from .download import fetch, md5_bytes, md5_file, mirror_url
from .formats import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    TINYIMAGENET_CLASSES,
    ParsedDataset,
    gunzip,
    parse_cifar10,
    parse_cifar100,
    parse_fashion_mnist,
    parse_svhn,
    parse_tinyimagenet,
)
from .synthetic import SHAPE_CLASSES, SHAPES_DEFAULTS, make_digits, make_shapes, shapes_per_class

log = logging.getLogger(__name__)

PREPARE_COMMAND = "dnnmod data prepare --dataset {name}"


@dataclass(frozen=True)
class RemoteFile:
    """One published file. ``md5_of_content``: the md5 is of the gunzipped content, so a
    recompressed copy (as Debian ships Fashion-MNIST) verifies too."""

    filename: str
    url: str
    md5: str
    md5_of_content: bool = False

    def verify(self, path: Path) -> None:
        actual = md5_bytes(gunzip(path)) if self.md5_of_content else md5_file(path)
        if actual != self.md5:
            what = "decompressed content" if self.md5_of_content else "file"
            raise ChecksumError(
                f"{path}: md5 of the {what} is {actual}, expected {self.md5} ({self.filename})")


@dataclass(frozen=True)
class ClassInventory:
    """A dataset's classes and its images per class in each official split (train, test), as a
    study config is checked before anything is downloaded. A count is None where it is known
    only once the dataset is prepared."""

    class_names: tuple[str, ...]
    per_class: Mapping[str, tuple[int | None, ...]]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. ``class_names`` are those ``prepare`` writes (it refuses files
    naming others); ``per_class`` is the official release's images per class by split (train,
    test), or ``count_per_class`` gives them from a generator's options."""

    name: str
    num_classes: int
    image_size: int
    source: str  # "download", "sklearn" or "generated"
    files: Mapping[str, RemoteFile] = field(default_factory=dict)
    parse: Callable[[dict[str, Path]], ParsedDataset] | None = None
    generate: Callable[..., ParsedDataset] | None = None
    default_options: Mapping[str, Any] = field(default_factory=dict)
    local_dir: Path | None = None  # offline copy used when present
    transform: str = "none"
    class_names: tuple[str, ...] = ()
    per_class: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    count_per_class: Callable[..., Mapping[str, tuple[int, ...]]] | None = None

    def inventory(self, entry: Mapping[str, Any] | None = None) -> ClassInventory:
        """What the study's ``datasets.<name>`` entry makes of this dataset: generator options
        set the counts; files whose checksums the entry overrides are not the official release,
        so their counts are left unknown (their classes are taken to be the official ones: the
        job that derives a task checks them against the files)."""
        entry = entry or {}
        if self.count_per_class is not None:
            per_class = self.count_per_class(**{**self.default_options,
                                                **(entry.get("options") or {})})
        elif not official_content(entry.get("files")):
            per_class = {split: (None,) * self.num_classes for split in self.per_class}
        else:
            per_class = self.per_class
        return ClassInventory(self.class_names, dict(per_class))


def official_content(overrides: Mapping[str, Mapping[str, str]] | None) -> bool:
    """Whether files with these ``url``/``md5`` overrides hold the official release: a file
    must match its published checksum unless the override names another."""
    return not any("md5" in override for override in (overrides or {}).values())


def _remote(url: str, md5: str, **kwargs) -> RemoteFile:
    return RemoteFile(url.rsplit("/", 1)[-1], url, md5, **kwargs)


def _uniform(num_classes: int, train: int, test: int) -> dict[str, tuple[int, ...]]:
    """Images per class of a release with ``train`` and ``test`` images of every class."""
    return {"train": (train,) * num_classes, "test": (test,) * num_classes}


_FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

def _named_spec(name: str, loaded: Any) -> DatasetSpec:
    """A ``dnnmod.datasets`` entry point's object: a DatasetSpec of the entry point's name."""
    if not isinstance(loaded, DatasetSpec):
        raise ValueError(f"{loaded!r} is not a dnnmod.data.registry.DatasetSpec")
    if loaded.name != name:
        raise ValueError(f"its DatasetSpec is named {loaded.name!r}, not {name!r}")
    return loaded


# dnnmod's own datasets, registered as dnnmod.datasets entry points in its pyproject.toml.
CIFAR10 = DatasetSpec("cifar10", 10, 32, "download", {"archive": _remote(
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a")}, parse_cifar10,
    class_names=tuple(CIFAR10_CLASSES), per_class=_uniform(10, 5000, 1000))

CIFAR100 = DatasetSpec("cifar100", 100, 32, "download", {"archive": _remote(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85")}, parse_cifar100, transform="fine labels",
    class_names=tuple(CIFAR100_CLASSES), per_class=_uniform(100, 500, 100))

SVHN = DatasetSpec("svhn", 10, 32, "download", {
    "train": _remote("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                     "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": _remote("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                    "eb5a983be6a315427106f1b82d2da7d1"),
}, parse_svhn, transform="label 10 -> 0", class_names=tuple(DIGIT_CLASSES), per_class={
    # digits 0..9 (0 stored as label 10) of train_32x32.mat and test_32x32.mat
    "train": (4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659),
    "test": (1744, 5099, 4149, 2882, 2523, 2384, 1977, 2019, 1660, 1595)})

TINYIMAGENET = DatasetSpec("tinyimagenet", 200, 64, "download", {"archive": _remote(
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    "90528d7ca1a48142e341f4ef8d21d0de")}, parse_tinyimagenet,
    transform="JPEG decoded to RGB; labelled val/ set is the test set",
    class_names=tuple(TINYIMAGENET_CLASSES), per_class=_uniform(200, 500, 50))

FASHION_MNIST = DatasetSpec("fashion_mnist", 10, 32, "download", {
    key: _remote(_FASHION_BASE + filename, md5, md5_of_content=True)
    for key, filename, md5 in [
        ("train_images", "train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        ("train_labels", "train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9"),
        ("test_images", "t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a"),
        ("test_labels", "t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965"),
    ]}, parse_fashion_mnist, local_dir=Path("/usr/share/datasets/fashion-mnist"),
    transform="28x28 grey zero-padded 2 px each side to 32x32, replicated to 3 channels",
    class_names=tuple(FASHION_MNIST_CLASSES), per_class=_uniform(10, 6000, 1000))

DIGITS = DatasetSpec("digits", 10, 32, "sklearn", generate=make_digits,
    transform="8x8 values 0..16 -> 4x4 blocks, x255/16, 3 channels; "
              "stratified 80/20 train/test split, seed 0",
    class_names=tuple(DIGIT_CLASSES), per_class={
        # scikit-learn's 1,797 digits through make_digits' fixed split
        "train": (142, 146, 142, 146, 145, 145, 145, 143, 139, 144),
        "test": (36, 36, 35, 37, 36, 37, 36, 36, 35, 36)})

SHAPES = DatasetSpec("shapes", 10, 32, "generated", generate=make_shapes,
    default_options=SHAPES_DEFAULTS, class_names=tuple(SHAPE_CLASSES),
    count_per_class=shapes_per_class)

#: dataset name → :class:`DatasetSpec`, from the ``dnnmod.datasets`` entry points (the specs
#: above, and any plug-in package's: docs/plugins.md)
DATASETS: Registry[DatasetSpec] = Registry(GROUPS["datasets"], "dataset", _named_spec)


def get_spec(name: str) -> DatasetSpec:
    return DATASETS[name]  # UnknownNameError listing the known ones


def images_path(root: Path, name: str) -> Path:
    """The prepared tensors of ``name``; ArtifactError naming the command if missing. A name
    that is not registered may be a task derived from prepared datasets (dnnmod.data.tasks)."""
    path = Path(root) / name / "images.safetensors"
    if name not in DATASETS and path.is_file():
        return path
    get_spec(name)
    if not path.is_file():
        raise ArtifactError(f"{path}: dataset {name!r} is not prepared; run "
                            f"`{PREPARE_COMMAND.format(name=name)}` (dnnmod.data.prepare)")
    return path


def prepare(name: str, root: Path, *, mirror: str | None = None,
            files: Mapping[str, Mapping[str, str]] | None = None, local_dir: Path | None = None,
            options: Mapping[str, Any] | None = None, progress: bool | None = None) -> Path:
    """Download (or generate), verify, parse and save dataset ``name``; return its directory.

    ``files`` overrides ``url``/``md5`` per file, keyed by the spec's file key (``archive``,
    ``train``, ``test_images``...) or file name. ``mirror`` replaces the base of every URL.
    Files found in ``local_dir`` (or the spec's offline directory) are verified and used
    without network. ``options`` are generator options (shapes: train_count, test_count,
    seed). Embedded datasets (digits, shapes) ignore ``mirror`` and ``local_dir``.
    """
    spec = get_spec(name)
    out_dir = Path(root) / name
    if spec.source == "download":
        if options:
            raise ConfigError(f"dataset {name!r} takes no options; got {sorted(options)}")
        paths, provenance, parsed = _download_and_parse(spec, out_dir, mirror, files or {},
                                                        local_dir, progress)
        source = {"kind": "files", "files": provenance}  # each entry has a url or a path
    else:
        if files:  # mirror and local_dir may be global settings: they do not apply here
            raise ConfigError(f"dataset {name!r} is {spec.source}: it has no files to override")
        unknown = set(options or {}) - set(spec.default_options)
        if unknown:
            raise ConfigError(f"dataset {name!r}: unknown options {sorted(unknown)}; "
                              f"known: {sorted(spec.default_options)}")
        used = {**spec.default_options, **(options or {})}
        parsed = spec.generate(**used)
        source = {"kind": spec.source, "options": used}
    _check(spec, parsed, official=official_content(files))
    tensors = {key: torch.from_numpy(np.ascontiguousarray(getattr(parsed, key)))
               for key in ("train_images", "train_labels", "test_images", "test_labels")}
    save_tensors(out_dir / "images.safetensors", tensors, metadata={"dataset": name})
    mean, std = channel_stats(parsed.train_images)
    write_json(out_dir / "meta.json", {
        "name": name,
        "num_classes": spec.num_classes,
        "class_names": list(parsed.class_names),
        "image_size": spec.image_size,
        "channels_mean": mean,
        "channels_std": std,
        "source": source,
        "transform": spec.transform,
        "counts": {"train": len(parsed.train_labels), "test": len(parsed.test_labels)},
    })
    return out_dir


def _download_and_parse(spec: DatasetSpec, out_dir: Path, mirror: str | None,
                        overrides: Mapping[str, Mapping[str, str]], local_dir: Path | None,
                        progress: bool | None):
    """The dataset's files, fetched into ``out_dir/raw`` where needed, and their parsed content.

    A refused download or a file that fails parsing leaves nothing behind: a downloaded file
    that cannot be parsed (possible when its md5 was overridden) is deleted, and so are the
    folders this call created, when empty.
    """
    raw_dir = out_dir / "raw"
    created = [folder for folder in (out_dir, raw_dir) if not folder.exists()]
    try:
        paths, provenance = _obtain_files(spec, raw_dir, mirror, overrides, local_dir, progress)
        try:
            return paths, provenance, spec.parse(paths)
        except Exception:
            for path in paths.values():
                if path.parent == raw_dir:
                    path.unlink(missing_ok=True)
            raise
    except BaseException:
        for folder in reversed(created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _obtain_files(spec: DatasetSpec, raw_dir: Path, mirror: str | None,
                  overrides: Mapping[str, Mapping[str, str]], local_dir: Path | None,
                  progress: bool | None) -> tuple[dict[str, Path], dict[str, dict]]:
    by_name = {remote.filename: key for key, remote in spec.files.items()}
    unknown = set(overrides) - set(spec.files) - set(by_name)
    if unknown:
        raise ConfigError(f"dataset {spec.name!r}: unknown files {sorted(unknown)} in overrides; "
                          f"known: {sorted(spec.files)}")
    paths, provenance = {}, {}
    for key, remote in spec.files.items():
        override = {**overrides.get(remote.filename, {}), **overrides.get(key, {})}
        if set(override) - {"url", "md5"}:
            raise ConfigError(f"dataset {spec.name!r}, file {key!r}: only url and md5 can be "
                              f"overridden; got {sorted(override)}")
        remote = dataclasses.replace(remote, **override)
        url = mirror_url(remote.url, mirror) if mirror else remote.url
        if local_dir is not None:  # a directory the user named must hold the right content
            local = _find_local(local_dir, remote.filename)
            if local is None:
                raise ArtifactError(f"{local_dir}: no {remote.filename} for dataset "
                                    f"{spec.name!r}")
            remote.verify(local)
        else:
            local = _verified_offline_copy(spec, remote)
        if local is not None:
            paths[key] = local
            provenance[key] = {"path": str(local), "md5": remote.md5}
            continue
        dest = raw_dir / remote.filename
        # Content checksums are verified here so that a bad file is deleted, not kept.
        fetch(url, dest, None if remote.md5_of_content else remote.md5, progress=progress)
        if remote.md5_of_content:
            try:
                remote.verify(dest)
            except (ChecksumError, ArtifactError):
                dest.unlink(missing_ok=True)
                raise
        paths[key] = dest
        provenance[key] = {"url": url, "md5": remote.md5}
    return paths, provenance


def _verified_offline_copy(spec: DatasetSpec, remote: RemoteFile) -> Path | None:
    """The file from the spec's system-wide offline directory when it verifies, else None.

    A system copy is a convenience: one that does not match (another release, or checksums
    overridden in config) is passed over for the download, with a log line saying so.
    """
    local = _find_local(spec.local_dir, remote.filename)
    if local is None:
        return None
    try:
        remote.verify(local)
    except (ChecksumError, ArtifactError) as err:
        log.warning("not using the offline copy: %s; downloading instead", err)
        return None
    return local


def _find_local(directory: Path | None, filename: str) -> Path | None:
    """``filename`` in ``directory``, also under its compressed or decompressed name."""
    if directory is None:
        return None
    stem = filename.removesuffix(".gz")
    for candidate in (filename, stem, stem + ".gz"):
        if (Path(directory) / candidate).is_file():
            return Path(directory) / candidate
    return None


def _check(spec: DatasetSpec, parsed: ParsedDataset, official: bool = True) -> None:
    """Shapes and labels of ``parsed``; and, for the official release (``official``), the
    class names the registry gives, by which study configs were checked."""
    size = spec.image_size
    for split in ("train", "test"):
        images, labels = getattr(parsed, f"{split}_images"), getattr(parsed, f"{split}_labels")
        if images.dtype != np.uint8 or images.shape[1:] != (3, size, size):
            raise ArtifactError(f"{spec.name} {split}: images {images.dtype} {images.shape}, "
                                f"expected uint8 (N, 3, {size}, {size})")
        if labels.shape != images.shape[:1] or labels.min(initial=0) < 0 \
                or labels.max(initial=0) >= spec.num_classes:
            raise ArtifactError(f"{spec.name} {split}: labels outside 0..{spec.num_classes - 1} "
                                "or not one per image")
    if len(parsed.class_names) != spec.num_classes:
        raise ArtifactError(f"{spec.name}: {len(parsed.class_names)} class names, "
                            f"expected {spec.num_classes}")
    if official and tuple(parsed.class_names) != spec.class_names:
        index, name, expected = next(
            (i, a, b) for i, (a, b) in enumerate(zip(parsed.class_names, spec.class_names,
                                                     strict=True)) if a != b)
        raise ArtifactError(f"{spec.name}: the files name class {index} {name!r}, where the "
                            f"registry (dnnmod.data.registry) names it {expected!r}")


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 images (N, C, H, W) in [0, 1], via histograms
    (no float copy of the whole set)."""
    values = np.arange(256) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = np.bincount(images[:, channel].ravel(), minlength=256)
        mean = float(counts @ values / counts.sum())
        means.append(mean)
        stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())))
    return means, stds


def split_path(root: Path, name: str, seed: int) -> Path:
    return Path(root) / name / "splits" / f"seed{seed}.safetensors"


def make_splits(root: Path, name: str, seed: int, validation_fraction: float = 0.2) -> Path:
    """Split the official train set into train/val, stratified by class and seeded; return the
    split file. Each class gives ``round(fraction * count)`` images to validation."""
    if not 0 < validation_fraction < 1:
        raise ConfigError(f"validation_fraction must be in (0, 1); got {validation_fraction}")
    labels = load_tensors(images_path(root, name))["train_labels"].numpy()
    return _write_splits(split_path(root, name, seed), name, labels, seed, validation_fraction)


def labels_fingerprint(labels: np.ndarray) -> str:
    """Identifies the training labels a split was drawn from (a re-prepare invalidates it)."""
    return md5_bytes(np.ascontiguousarray(labels, dtype=np.int64).tobytes())


def _write_splits(path: Path, name: str, labels: np.ndarray, seed: int,
                  validation_fraction: float) -> Path:
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:round(validation_fraction * n)]
           for c, n in zip(*np.unique(labels, return_counts=True), strict=True)]
    val_index = np.sort(np.concatenate(val))
    train_index = np.setdiff1d(np.arange(len(labels)), val_index)
    save_tensors(path, {"train_index": torch.from_numpy(train_index).long(),
                        "val_index": torch.from_numpy(val_index).long()},
                 metadata={"dataset": name, "seed": str(seed),
                           "validation_fraction": str(validation_fraction),
                           "train_labels_md5": labels_fingerprint(labels), "stratified": "true"})
    return path

"""Small datasets written in the official download formats, for a local mirror.

A paper-shaped run (``dnnmod study shrink``) must take the same path as the paper study: the
registry's download, checksum and parser code. These writers produce byte-for-byte the
layouts the parsers read from the real files, only with few images:

- CIFAR-10 / CIFAR-100: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` holding
  Python 2 pickles (protocol 2, byte strings, numpy's array under ``numpy.core.multiarray``);
- SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB 5, ``X`` as 32x32x3xN, digit 0
  stored as label 10);
- Fashion-MNIST: the four gzipped IDX files.

Images are learnable: each class has a smooth random colour pattern, and every image is its
class's pattern, shifted a little, plus noise. ``write_archives`` also writes a manifest of
the md5 checksums the registry checks (Fashion-MNIST's: of the decompressed content).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import write_bytes, write_json
from ..errors import ConfigError
from .download import md5_bytes
from .formats import CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES
from .registry import DATASETS

MANIFEST = "manifest.json"

CIFAR10_TRAIN_BATCHES = 5


@dataclass(frozen=True)
class ArchiveSizes:
    """Images per class in each official split of a 10-class dataset. A dataset of more
    classes gets as many images in all (every per-class step of the pipeline, such as scoring
    each class's module on every image, costs classes x images), but at least
    MIN_TRAIN_PER_CLASS and MIN_TEST_PER_CLASS a class."""

    train_per_class: int
    test_per_class: int

    def __post_init__(self) -> None:
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise ConfigError(f"images per class must be at least 1; got {self}")

    def for_classes(self, num_classes: int) -> ArchiveSizes:
        return ArchiveSizes(
            max(MIN_TRAIN_PER_CLASS, self.train_per_class * 10 // num_classes),
            max(MIN_TEST_PER_CLASS, self.test_per_class * 10 // num_classes))


# A class keeps one validation image at the default validation fraction 0.2, and two test
# images (a per-class precision and recall that is not all-or-nothing).
MIN_TRAIN_PER_CLASS = 5
MIN_TEST_PER_CLASS = 2


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2 did when the CIFAR files were written: every str and bytes as a
    BINSTRING (Python 3 would call _codecs.encode for bytes at protocol 2)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_binstring(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_binstring


def py2_pickle(obj: object) -> bytes:
    """``obj`` as the official CIFAR batches are pickled (numpy under its Python 2 name)."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def class_images(labels: np.ndarray, num_classes: int, seed: int, draw: int,
                 size: int = 32, channels: int = 3) -> np.ndarray:
    """uint8 images (N, channels, size, size), one per label: the class's pattern (a 4x4 grid
    of random colours, upsampled; the same for every ``draw`` of ``seed``), shifted by up to
    2 pixels, plus Gaussian noise (``draw``'s own)."""
    grids = np.random.default_rng(seed).uniform(0, 255, (num_classes, channels, 4, 4))
    patterns = grids.repeat(size // 4, axis=2).repeat(size // 4, axis=3)
    rng = np.random.default_rng([seed, draw])
    shifts = rng.integers(-2, 3, (len(labels), 2))
    noise = rng.normal(0, 40, (len(labels), channels, size, size))
    images = np.empty((len(labels), channels, size, size), np.uint8)
    for i, (label, (dy, dx)) in enumerate(zip(labels, shifts, strict=True)):
        shifted = np.roll(patterns[label], (dy, dx), axis=(1, 2))
        images[i] = np.clip(shifted + noise[i], 0, 255).astype(np.uint8)
    return images


def _labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Every class ``per_class`` times, shuffled (the official files are not class-sorted)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _cifar_data(labels: np.ndarray, num_classes: int, seed: int, draw: int) -> np.ndarray:
    return class_images(labels, num_classes, seed, draw).reshape(len(labels), -1)


def cifar10_archive(sizes: ArchiveSizes, seed: int = 0) -> dict[str, bytes]:
    """{filename: content}: cifar-10-python.tar.gz with its five training batches."""
    train = _labels(10, sizes.train_per_class, seed)
    test = _labels(10, sizes.test_per_class, seed + 1)
    members = {}
    for number, part in enumerate(np.array_split(np.arange(len(train)), CIFAR10_TRAIN_BATCHES),
                                  start=1):
        members[f"cifar-10-batches-py/data_batch_{number}"] = py2_pickle({
            "batch_label": f"training batch {number} of {CIFAR10_TRAIN_BATCHES}",
            "labels": train[part].tolist(),
            "data": _cifar_data(train[part], 10, seed, draw=number),
            "filenames": [f"image_{number}_{i}.png" for i in range(len(part))]})
    members["cifar-10-batches-py/test_batch"] = py2_pickle({
        "batch_label": "testing batch 1 of 1", "labels": test.tolist(),
        "data": _cifar_data(test, 10, seed, draw=0), "filenames": [
            f"test_{i}.png" for i in range(len(test))]})
    members["cifar-10-batches-py/batches.meta"] = py2_pickle({
        "label_names": CIFAR10_CLASSES, "num_cases_per_batch": len(train) // 5, "num_vis": 3072})
    return {"cifar-10-python.tar.gz": _tar_gz(members)}


def cifar100_archive(sizes: ArchiveSizes, seed: int = 0) -> dict[str, bytes]:
    """{filename: content}: cifar-100-python.tar.gz (train, test, meta)."""
    members = {}
    for split, per_class, offset in (("train", sizes.train_per_class, 0),
                                     ("test", sizes.test_per_class, 1)):
        labels = _labels(100, per_class, seed + offset)
        members[f"cifar-100-python/{split}"] = py2_pickle({
            "batch_label": f"{split}ing batch 1 of 1", "fine_labels": labels.tolist(),
            # the parser reads fine labels only; these fill the field the real files have
            # the parser reads the fine labels only; these fill the field the real files have
            "coarse_labels": (labels // 5).tolist(),
            "data": _cifar_data(labels, 100, seed, draw=offset),
            "filenames": [f"{split}_{i}.png" for i in range(len(labels))]})
    members["cifar-100-python/meta"] = py2_pickle({
        "fine_label_names": CIFAR100_CLASSES,
        "coarse_label_names": [f"superclass_{c}" for c in range(20)]})
    return {"cifar-100-python.tar.gz": _tar_gz(members)}


def _svhn_mat(labels: np.ndarray, seed: int, draw: int) -> bytes:
    from scipy.io import savemat  # scipy is slow to import; only SVHN needs it

    images = class_images(labels, 10, seed, draw).transpose(2, 3, 1, 0)  # (32, 32, 3, N)
    buffer = io.BytesIO()
    savemat(buffer, {"X": np.ascontiguousarray(images),
                     "y": np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)})
    return buffer.getvalue()


def svhn_files(sizes: ArchiveSizes, seed: int = 0) -> dict[str, bytes]:
    """{filename: content}: train_32x32.mat and test_32x32.mat."""
    return {"train_32x32.mat": _svhn_mat(_labels(10, sizes.train_per_class, seed), seed, 0),
            "test_32x32.mat": _svhn_mat(_labels(10, sizes.test_per_class, seed + 1), seed, 1)}


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file (MNIST layout) of ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        dim.to_bytes(4, "big") for dim in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fashion_mnist_files(sizes: ArchiveSizes, seed: int = 0) -> dict[str, bytes]:
    """{filename: content}: the four gzipped IDX files, 28x28 grey images."""
    files = {}
    for prefix, per_class, offset in (("train", sizes.train_per_class, 0),
                                      ("t10k", sizes.test_per_class, 1)):
        labels = _labels(len(FASHION_MNIST_CLASSES), per_class, seed + offset)
        images = class_images(labels, 10, seed, offset, size=28, channels=1)[:, 0]
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images), mtime=0)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels), mtime=0)
    return files


WRITERS = {"cifar10": cifar10_archive, "cifar100": cifar100_archive, "svhn": svhn_files,
           "fashion_mnist": fashion_mnist_files}


def write_archives(out_dir: Path, sizes: ArchiveSizes, datasets: list[str] | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Write the official files of ``datasets`` (default all four) into ``out_dir`` and the
    manifest ``out_dir/manifest.json``; return the manifest: under ``per_class`` dataset →
    images per class {train, test}, under ``datasets`` dataset → file key →
    {filename, md5}, the md5 being the one the registry checks for that file."""
    names = list(WRITERS) if datasets is None else datasets
    unknown = sorted(set(names) - set(WRITERS))
    if unknown:
        raise ConfigError(f"no official-format writer for {', '.join(unknown)}; "
                          f"known: {', '.join(WRITERS)}")
    out_dir = Path(out_dir)
    files: dict[str, dict[str, dict[str, str]]] = {}
    counts: dict[str, ArchiveSizes] = {}
    for name in names:
        # a seed of its own per dataset: CIFAR-10's classes must not look like SVHN's digits
        counts[name] = sizes.for_classes(DATASETS[name].num_classes)
        contents = WRITERS[name](counts[name],
                                 seed * len(WRITERS) + list(WRITERS).index(name))
        files[name] = {}
        for key, remote in DATASETS[name].files.items():
            data = contents[remote.filename]
            write_bytes(out_dir / remote.filename, data)
            checked = gzip.decompress(data) if remote.md5_of_content else data
            files[name][key] = {"filename": remote.filename, "md5": md5_bytes(checked)}
    manifest = {"seed": seed, "datasets": files,
                "per_class": {name: {"train": size.train_per_class, "test": size.test_per_class}
                              for name, size in counts.items()}}
    write_json(out_dir / MANIFEST, manifest)
    return manifest

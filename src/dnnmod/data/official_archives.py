"""Small datasets written in the official download formats, for a local mirror.

A paper-shaped run (``dnnmod study shrink``) must take the same path as the paper study: the
registry's download, checksum and parser code. These writers produce byte-for-byte the
layouts the parsers read from the real files, only with few images:

- CIFAR-10 / CIFAR-100: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` holding
  Python 2 pickles (protocol 2, byte strings, numpy's array under ``numpy.core.multiarray``);
- SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB 5, ``X`` as 32x32x3xN, digit 0
  stored as label 10);
- Fashion-MNIST: the four gzipped IDX files.

Images are objects on clutter, so that small models learn them well above chance but not
perfectly (see :func:`class_images`): a class is a shape combined with an appearance, classes
share shapes and appearances (a 100-class set must be told apart by both), and every image has
its own background, position, size, colour jitter, distractor, occluder and noise.
``write_archives`` also writes a manifest of the md5 checksums the registry checks
(Fashion-MNIST's: of the decompressed content).
"""

from __future__ import annotations

import gzip
import io
import math
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


def _shape(kind: int, y: np.ndarray, x: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of shape ``kind`` (0-9) of ``radius`` pixels, at the origin of y, x."""
    r, d, box = radius, np.hypot(y, x), np.maximum(abs(y), abs(x))
    if kind == 0:  # disc
        return d < r
    if kind == 1:  # square
        return box < 0.85 * r
    if kind == 2:  # ring
        return (d < r) & (d > 0.55 * r)
    if kind == 3:  # triangle, apex up
        return (y < 0.8 * r) & (abs(x) < (y + 0.8 * r) * 0.6)
    if kind == 4:  # plus
        return (abs(x) < 0.3 * r) & (abs(y) < r) | (abs(y) < 0.3 * r) & (abs(x) < r)
    if kind == 5:  # diamond
        return abs(x) + abs(y) < r
    if kind == 6:  # diagonal cross
        return ((abs(x - y) < 0.35 * r) | (abs(x + y) < 0.35 * r)) & (box < 0.8 * r)
    if kind == 7:  # lower half disc
        return (d < r) & (y > -0.1 * r)
    if kind == 8:  # square frame
        return (box < r) & (box > 0.6 * r)
    return (abs(y) < 0.35 * r) & (abs(x) < r)  # bar


SHAPES = 10


def _texture(kind: int, y: np.ndarray, x: np.ndarray, phase: int) -> np.ndarray:
    """Boolean fill pattern ``kind`` (0-9) over the whole image: where the object is lit."""
    if kind == 0:  # solid
        return np.ones(y.shape, bool)
    if kind in (1, 2):  # horizontal, vertical stripes of period 4
        return np.sin(((y, x)[kind - 1] + phase) * np.pi / 2) > 0
    if kind == 3:  # checkerboard
        return (np.sin((x + phase) * np.pi / 2) > 0) ^ (np.sin((y + phase) * np.pi / 2) > 0)
    if kind in (4, 5):  # diagonal stripes, both ways, period 6
        return np.sin((x + (y if kind == 4 else -y) + phase) * np.pi / 3) > 0
    if kind == 6:  # concentric rings
        return (np.hypot(y - y.mean(), x - x.mean()) + phase) % 4 < 2
    if kind == 7:  # dots
        return ((x + phase) % 4 < 2) & ((y + phase) % 4 < 2)
    return np.sin(((y, x)[kind - 8] + phase) * np.pi / 4) > 0  # wide stripes, period 8


TEXTURES = 10


def class_factors(num_classes: int) -> tuple[int, int]:
    """(shapes, appearances) of a dataset of ``num_classes``: class c has shape c % shapes and
    appearance c // shapes; shapes is the largest divisor of num_classes up to its square
    root (10 classes: 2 x 5, 100: 10 x 10), so every shape and every appearance is shared by
    several classes."""
    shapes = max(d for d in range(1, math.isqrt(num_classes) + 1) if num_classes % d == 0)
    if num_classes // shapes > TEXTURES:  # then also shapes <= SHAPES
        raise ConfigError(f"cannot draw {num_classes} classes as {shapes} shapes x "
                          f"{num_classes // shapes} appearances of {TEXTURES} textures")
    return shapes, num_classes // shapes


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """RGB in [0, 1] of a colour given by hue (turns), saturation and value."""
    k = (np.array([5.0, 3.0, 1.0]) + (hue % 1.0) * 6) % 6
    return value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1)


def _background(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """A random scene behind the object: 3 x 3 blocks of dull random colours."""
    blocks = np.stack([_hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.2, 0.8))
                       for _ in range(9)], axis=1).reshape(3, 3, 3) * 255
    scale = -(-size // 3)
    scene = blocks.repeat(scale, axis=1).repeat(scale, axis=2)[:, :size, :size]
    return scene.mean(0, keepdims=True) if channels == 1 else scene


def class_images(labels: np.ndarray, num_classes: int, seed: int, draw: int,
                 size: int = 32, channels: int = 3) -> np.ndarray:
    """uint8 images (N, channels, size, size), one per label, the same for the same ``seed``
    and ``draw``.

    Each class is an object: one of the dataset's shapes filled with one of its appearances
    (:func:`class_factors`; which shapes, textures and hues a dataset uses follows ``seed``).
    An appearance is a texture and, in colour, a hue (evenly spaced around the colour wheel);
    the object's dark parts are a shade of its colour. Every image (``draw``'s own random
    numbers) puts it on a random background, shifted by up to 4 pixels, at 0.28-0.38 of the
    image size, with jittered hue, saturation and brightness; half the images get a small
    distractor shape of any kind and colour, 40 % an occluding rectangle; then Gaussian noise
    (sd 20). Chance-level and perfect accuracies are both far from what a small model reaches.
    """
    shapes, appearances = class_factors(num_classes)
    dataset = np.random.default_rng(seed)
    shape_kinds = dataset.permutation(SHAPES)[:shapes]
    textures = dataset.permutation(TEXTURES)[:appearances]
    first_hue = dataset.random()
    rng = np.random.default_rng([seed, draw])
    y, x = np.mgrid[0:size, 0:size].astype(float)
    images = np.empty((len(labels), channels, size, size), np.uint8)
    for i, label in enumerate(labels):
        shape, appearance = label % shapes, label // shapes
        image = _background(rng, size, channels)
        centre = size / 2 + rng.integers(-4, 5, 2)
        mask = _shape(shape_kinds[shape], y - centre[0], x - centre[1],
                      size * rng.uniform(0.28, 0.38))
        lit = _texture(textures[appearance], y, x, int(rng.integers(4)))
        if channels == 3:
            colour = 255 * _hsv(first_hue + appearance / appearances + rng.normal(0, 0.03),
                                rng.uniform(0.6, 1), rng.uniform(0.7, 1))
        else:
            colour = np.array([255 * rng.uniform(0.8, 1)])
        shade = colour * rng.uniform(0.15, 0.4)
        image = np.where(mask, np.where(lit, colour[:, None, None], shade[:, None, None]), image)
        if rng.random() < 0.5:
            offset = rng.uniform(-size / 2, size / 2, 2)
            distractor = _shape(int(rng.integers(SHAPES)), y - size / 2 - offset[0],
                                x - size / 2 - offset[1], size * 0.15)
            image = np.where(distractor, rng.uniform(0, 255, (channels, 1, 1)), image)
        if rng.random() < 0.4:
            height, width = rng.integers(size // 5, size // 3, 2)
            top, left = rng.integers(0, size - height), rng.integers(0, size - width)
            image[:, top:top + height, left:left + width] = rng.uniform(0, 255, (channels, 1, 1))
        images[i] = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
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

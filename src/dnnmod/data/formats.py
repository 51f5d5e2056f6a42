"""Parsers for the official archive formats, each returning :class:`ParsedDataset`.

Images come out as uint8 arrays of shape (N, 3, H, W), labels as int64 arrays. Every parser
turns a malformed or truncated file into :class:`ArtifactError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError

try:  # numpy >= 2 moved the array internals; pickles name either module
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray


@dataclass
class ParsedDataset:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


# Only what numpy needs to rebuild an array: no other callable can run while unpickling.
_ARRAY_GLOBALS = {
    (module, name): obj
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, obj in (("_reconstruct", _multiarray._reconstruct), ("scalar", _multiarray.scalar))
} | {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds plain containers and numpy arrays and refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def load_array_pickle(data: bytes, source: str) -> dict[str, Any]:
    """Unpickle a CIFAR batch (Python 2 or 3 pickle) with str keys, without running code."""
    try:
        obj = ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ArtifactError(f"{source}: not a valid CIFAR pickle ({err})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{source}: expected a dict, found {type(obj).__name__}")
    return {_text(key): value for key, value in obj.items()}


def _text(value: str | bytes) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _field(batch: dict[str, Any], key: str, source: str) -> Any:
    try:
        return batch[key]
    except KeyError:
        raise ArtifactError(f"{source}: missing key {key!r}") from None


def _cifar_batches(archive: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Read the named members (by base name) of a CIFAR tar.gz."""
    found: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names:
                    data = tar.extractfile(member).read()
                    found[base] = load_array_pickle(data, f"{archive.name}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ArtifactError(f"{archive}: truncated or corrupt archive ({err})") from None
    missing = sorted(set(names) - set(found))
    if missing:
        raise ArtifactError(f"{archive}: members missing: {', '.join(missing)}")
    return found


def _cifar_images(batches: list[dict[str, Any]], label_key: str, source: str):
    images = np.concatenate([np.asarray(_field(b, "data", source), np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(_field(b, label_key, source), np.int64) for b in batches])
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
        raise ArtifactError(f"{source}: unexpected CIFAR data shape {images.shape}")
    return images.reshape(-1, 3, 32, 32), labels


def parse_cifar10(files: dict[str, Path]) -> ParsedDataset:
    archive = files["archive"]
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    batches = _cifar_batches(archive, [*train_names, "test_batch", "batches.meta"])
    train = _cifar_images([batches[n] for n in train_names], "labels", archive.name)
    test = _cifar_images([batches["test_batch"]], "labels", archive.name)
    names = [_text(n) for n in _field(batches["batches.meta"], "label_names", archive.name)]
    return ParsedDataset(*train, *test, names)


def parse_cifar100(files: dict[str, Path]) -> ParsedDataset:
    """CIFAR-100 with its 100 fine labels."""
    archive = files["archive"]
    batches = _cifar_batches(archive, ["train", "test", "meta"])
    train = _cifar_images([batches["train"]], "fine_labels", archive.name)
    test = _cifar_images([batches["test"]], "fine_labels", archive.name)
    names = [_text(n) for n in _field(batches["meta"], "fine_label_names", archive.name)]
    return ParsedDataset(*train, *test, names)


def _svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # scipy is slow to import; only SVHN needs it

    try:
        mat = loadmat(path)
        images, labels = mat["X"], mat["y"]
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: not a readable SVHN .mat file ({err})") from None
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.size:
        raise ArtifactError(f"{path}: unexpected SVHN shapes X{images.shape} y{labels.shape}")
    labels = labels.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1), dtype=np.uint8), labels


def parse_svhn(files: dict[str, Path]) -> ParsedDataset:
    return ParsedDataset(*_svhn_split(files["train"]), *_svhn_split(files["test"]),
                         list(DIGIT_CLASSES))


def read_idx(data: bytes, source: str) -> np.ndarray:
    """Decode an uncompressed IDX file of unsigned bytes (MNIST layout)."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ArtifactError(f"{source}: not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise ArtifactError(f"{source}: IDX size does not match its header shape {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def gunzip(path: Path) -> bytes:
    """Content of ``path``, decompressed when it is gzip (magic bytes, not the file name)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise ArtifactError(f"{path}: truncated or corrupt gzip file ({err})") from None


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(digit) for digit in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
# CIFAR-100's fine labels, in the order of its meta file (alphabetical).
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard",
    "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray",
    "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm"]
# Tiny-ImageNet's classes as parse_tinyimagenet names them: the wnids of wnids.txt in sorted
# order (n01443537 ... n12267677), each by the first synonym of its words.txt line.
TINYIMAGENET_CLASSES = [
    "goldfish", "European fire salamander", "bullfrog", "tailed frog", "American alligator",
    "boa constrictor", "trilobite", "scorpion", "black widow", "tarantula", "centipede", "goose",
    "koala", "jellyfish", "brain coral", "snail", "slug", "sea slug", "American lobster",
    "spiny lobster", "black stork", "king penguin", "albatross", "dugong", "Chihuahua",
    "Yorkshire terrier", "golden retriever", "Labrador retriever", "German shepherd",
    "standard poodle", "tabby", "Persian cat", "Egyptian cat", "cougar", "lion", "brown bear",
    "ladybug", "fly", "bee", "grasshopper", "walking stick", "cockroach", "mantis", "dragonfly",
    "monarch", "sulphur butterfly", "sea cucumber", "guinea pig", "hog", "ox", "bison", "bighorn",
    "gazelle", "Arabian camel", "orangutan", "chimpanzee", "baboon", "African elephant",
    "lesser panda", "abacus", "academic gown", "altar", "apron", "backpack", "bannister",
    "barbershop", "barn", "barrel", "basketball", "bathtub", "beach wagon", "beacon", "beaker",
    "beer bottle", "bikini", "binoculars", "birdhouse", "bow tie", "brass", "broom", "bucket",
    "bullet train", "butcher shop", "candle", "cannon", "cardigan", "cash machine", "CD player",
    "chain", "chest", "Christmas stocking", "cliff dwelling", "computer keyboard", "confectionery",
    "convertible", "crane", "dam", "desk", "dining table", "drumstick", "dumbbell", "flagpole",
    "fountain", "freight car", "frying pan", "fur coat", "gasmask", "go-kart", "gondola",
    "hourglass", "iPod", "jinrikisha", "kimono", "lampshade", "lawn mower", "lifeboat",
    "limousine", "magnetic compass", "maypole", "military uniform", "miniskirt", "moving van",
    "nail", "neck brace", "obelisk", "oboe", "organ", "parking meter", "pay-phone", "picket fence",
    "pill bottle", "plunger", "pole", "police van", "poncho", "pop bottle", "potter's wheel",
    "projectile", "punching bag", "reel", "refrigerator", "remote control", "rocking chair",
    "rugby ball", "sandal", "school bus", "scoreboard", "sewing machine", "snorkel", "sock",
    "sombrero", "space heater", "spider web", "sports car", "steel arch bridge", "stopwatch",
    "sunglasses", "suspension bridge", "swimming trunks", "syringe", "teapot", "teddy", "thatch",
    "torch", "tractor", "triumphal arch", "trolleybus", "turnstile", "umbrella", "vestment",
    "viaduct", "volleyball", "water jug", "water tower", "wok", "wooden spoon", "comic book",
    "plate", "guacamole", "ice cream", "ice lolly", "pretzel", "mashed potato", "cauliflower",
    "bell pepper", "mushroom", "orange", "lemon", "banana", "pomegranate", "meat loaf", "pizza",
    "potpie", "espresso", "alp", "cliff", "coral reef", "lakeside", "seashore", "acorn"]


def grey28_to_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) grey → (N, 3, 32, 32): zero-pad 2 px each side, replicate to 3 channels."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.ascontiguousarray(np.repeat(padded[:, None], 3, axis=1))


def parse_fashion_mnist(files: dict[str, Path]) -> ParsedDataset:
    """IDX files (gzip or not) keyed train_images, train_labels, test_images, test_labels."""
    arrays = {key: read_idx(gunzip(path), str(path)) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ArtifactError(f"fashion_mnist {split}: shapes {images.shape}, {labels.shape}")
    return ParsedDataset(grey28_to_rgb32(arrays["train_images"]),
                         arrays["train_labels"].astype(np.int64),
                         grey28_to_rgb32(arrays["test_images"]),
                         arrays["test_labels"].astype(np.int64), FASHION_MNIST_CLASSES)


def _decode_rgb64(data: bytes, source: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))  # some Tiny-ImageNet images are grey
    except (UnidentifiedImageError, OSError) as err:
        raise ArtifactError(f"{source}: cannot decode image ({err})") from None
    if array.shape != (64, 64, 3):
        raise ArtifactError(f"{source}: expected a 64x64 image, found {array.shape}")
    return array.transpose(2, 0, 1)


def parse_tinyimagenet(files: dict[str, Path]) -> ParsedDataset:
    """Train = train/<wnid>/images/*.JPEG; test = the labelled val/ set.

    Classes are the wnids in sorted order (as torchvision's ImageFolder orders them); class
    names are the first synonym in words.txt.
    """
    archive = files["archive"]
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            root = next(n.split("/", 1)[0] for n in names if n.endswith("wnids.txt"))
            wnids = sorted(zf.read(f"{root}/wnids.txt").decode().split())
            index = {wnid: i for i, wnid in enumerate(wnids)}
            words: dict[str, str] = {}
            if f"{root}/words.txt" in names:
                lines = zf.read(f"{root}/words.txt").decode().splitlines()
                words = dict(line.split("\t", 1) for line in lines if "\t" in line)
            train = [(n, index[n.split("/")[2]]) for n in sorted(names)
                     if n.startswith(f"{root}/train/") and n.endswith(".JPEG")]
            val_labels = [line.split("\t")[:2] for line in
                          zf.read(f"{root}/val/val_annotations.txt").decode().splitlines() if line]
            test = [(f"{root}/val/images/{file}", index[wnid]) for file, wnid in val_labels]

            def decode(entries):
                images = np.empty((len(entries), 3, 64, 64), np.uint8)
                for i, (name, _) in enumerate(entries):
                    images[i] = _decode_rgb64(zf.read(name), f"{archive.name}:{name}")
                return images, np.array([label for _, label in entries], np.int64)

            train_arrays, test_arrays = decode(train), decode(test)
    except (zipfile.BadZipFile, KeyError, StopIteration, EOFError, OSError, zlib.error) as err:
        raise ArtifactError(f"{archive}: truncated or corrupt Tiny-ImageNet zip ({err})") from None
    class_names = [words.get(w, w).split(",")[0].strip() for w in wnids]
    return ParsedDataset(*train_arrays, *test_arrays, class_names)

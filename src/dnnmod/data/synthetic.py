"""Datasets that need no network: scikit-learn's bundled digits and generated shapes."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .formats import DIGIT_CLASSES, ParsedDataset

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def make_digits() -> ParsedDataset:
    """scikit-learn's 1797 8x8 digits as 32x32x3 uint8 images.

    Each pixel (0..16) is repeated into a 4x4 block (nearest-neighbour upsampling), scaled to
    0..255 and copied to three channels. There is no official test split, so a fixed
    stratified 80/20 split (``DIGITS_SPLIT_SEED``) stands in for it.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    grey = grey.repeat(4, axis=1).repeat(4, axis=2)
    images = np.ascontiguousarray(np.repeat(grey[:, None], 3, axis=1))
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ParsedDataset(images[train_idx], labels[train_idx], images[test_idx],
                         labels[test_idx], list(DIGIT_CLASSES))


SHAPE_CLASSES = ["circle", "square", "triangle", "ring", "cross", "star", "horizontal_bar",
                 "vertical_bar", "diamond", "ellipse"]
SHAPES_DEFAULTS = {"train_count": 5000, "test_count": 1000, "seed": 0}
SIZE = 32
# Shapes that turn into another class when rotated far (a square by 45° is a diamond, a bar
# by 90° is the other bar) get a small tilt; the others any angle.
_SMALL_TILT = {"square", "horizontal_bar", "vertical_bar", "diamond"}
_TRIANGLE_NORMALS = np.array([[np.cos(a), np.sin(a)] for a in np.deg2rad([90, 210, 330])])


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in shape coordinates (unit radius, y axis up)."""
    if name == "circle":
        return u**2 + v**2 <= 1
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if name == "triangle":  # equilateral, inradius 0.5
        return np.all(u[..., None] * _TRIANGLE_NORMALS[:, 0]
                      + v[..., None] * _TRIANGLE_NORMALS[:, 1] >= -0.5, axis=-1)
    if name == "ring":
        return (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.5**2)
    if name == "cross":
        return ((abs(u) <= 0.28) | (abs(v) <= 0.28)) & (np.maximum(abs(u), abs(v)) <= 1)
    if name == "star":  # five points: radius oscillates between 0.4 and 1
        radius = 0.4 + 0.6 * np.abs(np.cos(2.5 * np.arctan2(v, u))) ** 3
        return u**2 + v**2 <= radius**2
    if name == "horizontal_bar":
        return (abs(u) <= 1) & (abs(v) <= 0.25)
    if name == "vertical_bar":
        return (abs(u) <= 0.25) & (abs(v) <= 1)
    if name == "diamond":
        return abs(u) + abs(v) <= 1
    if name == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1
    raise ValueError(name)


def _render(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one image per label; all random draws happen up front, in a fixed order."""
    n = len(labels)
    radius = rng.uniform(8.0, 14.0, n)
    centre = rng.uniform(-1, 1, (n, 2)) * (SIZE / 2 - radius[:, None] * 0.8) + SIZE / 2
    angle = rng.uniform(-np.pi, np.pi, n)
    tilt = rng.uniform(-np.pi / 9, np.pi / 9, n)
    # A light shape on a dark background in every channel: colours vary freely, but an edge
    # always has the same polarity, so a narrow network learns the shapes in a few epochs.
    foreground = rng.uniform(0.55, 1.0, (n, 3))
    background = rng.uniform(0.0, 0.45, (n, 3))
    noise = 0.04 * rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)

    grid = np.arange(SIZE) + 0.5
    x, y = grid[None, None, :], grid[None, :, None]
    images = np.empty((n, 3, SIZE, SIZE), np.float32)
    for label, name in enumerate(SHAPE_CLASSES):
        idx = np.flatnonzero(labels == label)
        if not len(idx):
            continue
        theta = (tilt if name in _SMALL_TILT else angle)[idx][:, None, None]
        dx = x - centre[idx, 0][:, None, None]
        dy = centre[idx, 1][:, None, None] - y  # image rows grow downwards
        r = radius[idx][:, None, None]
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / r
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / r
        mask = _shape_mask(name, u, v)[:, None]
        images[idx] = np.where(mask, foreground[idx][:, :, None, None],
                               background[idx][:, :, None, None])
    return np.clip(np.rint((images + noise) * 255), 0, 255).astype(np.uint8)


def make_shapes(train_count: int = 5000, test_count: int = 1000, seed: int = 0) -> ParsedDataset:
    """Ten classes of geometric shapes with random colour, size, position and rotation, lighter
    than the background in every channel, with Gaussian pixel noise. Same seed → identical
    images; classes are balanced (label = index mod 10, shuffled). Train and test use
    independent streams.
    """
    given = {"train_count": train_count, "test_count": test_count, "seed": seed}
    bad = {key: value for key, value in given.items()
           if not isinstance(value, int) or isinstance(value, bool) or value < 0}
    if bad or train_count < 1:
        raise ConfigError(f"shapes options must be non-negative integers, train_count >= 1; "
                          f"got {given}")
    splits = []
    for stream, count in enumerate((train_count, test_count)):
        rng = np.random.default_rng([seed, stream])
        labels = rng.permutation(_balanced_labels(count)).astype(np.int64)
        splits += [_render(labels, rng), labels]
    return ParsedDataset(*splits, list(SHAPE_CLASSES))


def _balanced_labels(count: int) -> np.ndarray:
    """``count`` labels, class = index mod the number of classes (before shuffling)."""
    return np.arange(count) % len(SHAPE_CLASSES)


def shapes_per_class(train_count: int = 5000, test_count: int = 1000,
                     seed: int = 0) -> dict[str, tuple[int, ...]]:
    """Images per class in each split of :func:`make_shapes` with these options, without
    rendering any (``seed`` moves images, not counts)."""
    del seed
    return {split: tuple(np.bincount(_balanced_labels(count),
                                     minlength=len(SHAPE_CLASSES)).tolist())
            for split, count in (("train", train_count), ("test", test_count))}

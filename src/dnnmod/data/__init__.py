"""Datasets: checksummed downloads, official-format parsers, seeded splits, in-memory sets."""

from __future__ import annotations

from .dataset import DatasetSplits, ImageSet, combine, load_dataset
from .download import fetch, md5_file, mirror_url
from .formats import ArrayUnpickler, ParsedDataset
from .registry import (
    DATASETS,
    PREPARE_COMMAND,
    DatasetSpec,
    RemoteFile,
    get_spec,
    images_path,
    make_splits,
    prepare,
    split_path,
)

__all__ = [
    "DATASETS",
    "PREPARE_COMMAND",
    "ArrayUnpickler",
    "DatasetSpec",
    "DatasetSplits",
    "ImageSet",
    "ParsedDataset",
    "RemoteFile",
    "combine",
    "fetch",
    "get_spec",
    "images_path",
    "load_dataset",
    "make_splits",
    "md5_file",
    "mirror_url",
    "prepare",
    "split_path",
]

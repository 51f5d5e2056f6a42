"""Datasets: checksummed downloads, official-format parsers, seeded splits, in-memory sets,
and tasks derived from prepared datasets."""

from __future__ import annotations

from .dataset import DatasetSplits, ImageSet, combine, load_dataset, load_prepared
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
from .tasks import Task, TaskPart, derive_task

__all__ = [
    "DATASETS",
    "PREPARE_COMMAND",
    "ArrayUnpickler",
    "DatasetSpec",
    "DatasetSplits",
    "ImageSet",
    "ParsedDataset",
    "RemoteFile",
    "Task",
    "TaskPart",
    "combine",
    "derive_task",
    "fetch",
    "get_spec",
    "images_path",
    "load_dataset",
    "load_prepared",
    "make_splits",
    "md5_file",
    "mirror_url",
    "prepare",
    "split_path",
]

"""The JSON record beside every model file, read without torch (tables and figures only read
records, and importing torch would cost each of their jobs about 2 s).

:mod:`dnnmod.training.model_io` writes the record with the weights and rebuilds models from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dnnmod.artifacts import read_json
from dnnmod.errors import ArtifactError

FORMAT = "dnnmod.model/1"

#: what every model file records: how to rebuild the network (architecture, training kind and
#: its hyperparameters) and what it expects as input (dataset; per-channel mean and std of the
#: training images, ``{"mean": [...], "std": [...]}``, which composing models of several
#: datasets needs)
REQUIRED_KEYS = ("arch", "num_classes", "width", "options", "dataset", "training", "objective",
                 "normalization")


def metadata_path(weights_path: str | os.PathLike) -> Path:
    return Path(weights_path).with_suffix(".json")


def check_required(meta: dict[str, Any], path: Path) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ArtifactError(f"{path}: model metadata lacks {missing} (every model records "
                            f"{list(REQUIRED_KEYS)})")


def read_model_record(weights_path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the model at ``weights_path``, checked to hold :data:`REQUIRED_KEYS`."""
    path = metadata_path(weights_path)
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a dnnmod model "
                            f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    check_required(meta, path)
    return meta

"""Trained models on disk: weights in safetensors, everything else in JSON beside them.

``model.safetensors`` holds the state dict; ``model.json`` (:mod:`dnnmod.training.records`)
holds what is needed to rebuild the network and feed it (``REQUIRED_KEYS``: architecture,
training kind and its hyperparameters, dataset, input normalization) and the provenance
(seed, recipe, metrics, history, wall time, device, weights hash), as :func:`model_record`
builds it. Loading rebuilds the architecture from the JSON, applies the training kind's
``prepare`` (modular training may add trainable parts) and copies tensors in; it never executes
code from either file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dnnmod.artifacts import load_tensors, save_tensors, sha256_file, write_json
from dnnmod.errors import ArtifactError, ConfigError, UnknownNameError
from dnnmod.models import build_model
from dnnmod.training.objectives import get_objective
from dnnmod.training.records import FORMAT, check_required, metadata_path, read_model_record

if TYPE_CHECKING:
    from dnnmod.data import DatasetSplits
    from dnnmod.training.objectives import Objective
    from dnnmod.training.train import Recipe, TrainResult

def model_record(*, arch: str, name: str, width: float, options: dict[str, Any], dataset: str,
                 data: DatasetSplits, seed: int, objective: Objective, recipe: Recipe,
                 result: TrainResult, accuracies: dict[str, float], device: str
                 ) -> dict[str, Any]:
    """The metadata of a model trained by :func:`~dnnmod.training.train.train` on ``data``.

    ``name``: the model's name in the study (paths, tables); ``dataset``: the name ``data`` was
    loaded by; ``accuracies``: per split (``train``, ``val``, ``test``); ``device``: where it
    was trained, in words.
    """
    return {
        "arch": arch, "model": name, "dataset": dataset,
        "num_classes": data.num_classes, "class_names": data.class_names,
        "width": width, "options": options,
        "training": objective.name, "objective": objective.hyperparameters,
        "input_shape": list(data.test.images.shape[1:]),
        "normalization": {"mean": data.train.mean.tolist(), "std": data.train.std.tolist()},
        "seed": seed, "recipe": recipe.to_dict(), "config_hash": result.config_hash,
        "selected_epoch": result.selected_epoch,
        "metrics": {f"{split}_accuracy": value for split, value in accuracies.items()},
        "history": [vars(record) for record in result.history],
        "wall_seconds": result.wall_seconds, "device": device,
        "torch_version": torch.__version__,
    }


def save_model(weights_path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights, then metadata carrying the weights' hash (the metadata commits the pair)."""
    weights_path = Path(weights_path)
    check_required(meta, metadata_path(weights_path))
    save_tensors(weights_path, model.state_dict())
    write_json(metadata_path(weights_path),
               {**meta, "format": FORMAT, "weights_sha256": sha256_file(weights_path)})


def load_model(weights_path: str | os.PathLike, *, arch: str | None = None,
               dataset: str | None = None, device: str | torch.device = "cpu",
               verify_hash: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model; ``arch``/``dataset`` state what the caller expects to get."""
    weights_path = Path(weights_path)
    meta = read_model_record(weights_path)
    for key, expected in (("arch", arch), ("dataset", dataset)):
        if expected is not None and meta[key] != expected:
            raise ArtifactError(f"{weights_path}: holds a {meta['arch']} trained on "
                                f"{meta['dataset']}, but a {key} of {expected!r} was expected")
    if verify_hash and sha256_file(weights_path) != meta["weights_sha256"]:
        raise ArtifactError(f"{weights_path}: content does not match the hash recorded in "
                            f"{metadata_path(weights_path).name} (truncated or replaced?)")
    try:
        objective = get_objective(meta["training"], meta["objective"])
    except (UnknownNameError, ConfigError) as err:
        raise ArtifactError(f"{metadata_path(weights_path)}: {err}") from None
    model = build_model(meta["arch"], meta["num_classes"], meta["width"], **meta["options"])
    model = objective.prepare(model)
    load_state(model, load_tensors(weights_path), source=weights_path)
    return model.to(device).eval(), meta


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes, naming any mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        details = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {wrong_shape[:5]}" if wrong_shape else "",
        ]))
        raise ArtifactError(f"{source}: weights do not fit {type(model).__name__} ({details})")
    model.load_state_dict(state)

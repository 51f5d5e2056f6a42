"""Trained models on disk: weights in safetensors, everything else in JSON beside them.

``model.safetensors`` holds the state dict; ``model.json`` holds what is needed to rebuild the
architecture (arch, num_classes, width, options) and the provenance (dataset, seed, recipe,
metrics, wall time, device, weights hash). Loading rebuilds the architecture from the JSON and
copies tensors in; it never executes code from either file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnnmod.artifacts import load_tensors, read_json, save_tensors, sha256_file, write_json
from dnnmod.errors import ArtifactError
from dnnmod.models import build_model

FORMAT = "dnnmod.model/1"


def metadata_path(weights_path: str | os.PathLike) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_model(weights_path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights, then metadata carrying the weights' hash (the metadata commits the pair)."""
    for key in ("arch", "num_classes", "width", "options", "dataset"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    weights_path = Path(weights_path)
    save_tensors(weights_path, model.state_dict())
    write_json(metadata_path(weights_path),
               {**meta, "format": FORMAT, "weights_sha256": sha256_file(weights_path)})


def load_model(weights_path: str | os.PathLike, *, arch: str | None = None,
               dataset: str | None = None, device: str | torch.device = "cpu",
               verify_hash: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model; ``arch``/``dataset`` state what the caller expects to get."""
    weights_path = Path(weights_path)
    meta = read_json(metadata_path(weights_path))
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{metadata_path(weights_path)}: not a dnnmod model "
                            f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    for key, expected in (("arch", arch), ("dataset", dataset)):
        if expected is not None and meta[key] != expected:
            raise ArtifactError(f"{weights_path}: holds a {meta['arch']} trained on "
                                f"{meta['dataset']}, but a {key} of {expected!r} was expected")
    if verify_hash and sha256_file(weights_path) != meta["weights_sha256"]:
        raise ArtifactError(f"{weights_path}: content does not match the hash recorded in "
                            f"{metadata_path(weights_path).name} (truncated or replaced?)")
    model = build_model(meta["arch"], meta["num_classes"], meta["width"], **meta["options"])
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

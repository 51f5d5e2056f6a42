"""Resumable state for long steps (training, module search), shared by every approach.

A checkpoint holds everything a step needs to continue after its last finished epoch. It is
written atomically after every epoch, to a path outside the rule's declared outputs (so
Snakemake does not delete it when a killed job reruns), and it carries the fingerprint of the
run that wrote it: a checkpoint from another configuration, or a torn one, is never resumed.
Epoch randomness comes from :func:`epoch_generator`, so a resumed run replays exactly the
epochs an uninterrupted run would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dnnmod.artifacts import atomic_write

log = logging.getLogger(__name__)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """An independent random stream per (seed, epoch); seeds the global stream too (dropout)."""
    stream = seed * 1_000_003 + epoch
    torch.manual_seed(stream)
    return torch.Generator().manual_seed(stream)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to the run ``fingerprint``, else None."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: never trust it, never crash on it
        log.warning("ignoring unreadable checkpoint %s (%s); starting from epoch 0", path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s belongs to another run configuration; starting from epoch 0",
                    path)
        return None
    return state

"""Resumable loops for long steps (training epochs, search generations), shared by every approach.

A loop checkpoint holds everything its body needs to continue after the last finished step. It
is written atomically after every step, to a path outside the rule's declared outputs (so
Snakemake does not delete it when a killed job reruns), and it carries the fingerprint of the
run that wrote it: a checkpoint from another configuration, or a torn one, is never resumed.
Step randomness comes from :func:`epoch_generator`, so a resumed run replays exactly the steps
an uninterrupted run would.

A loop body reads top to bottom::

    loop = ResumableLoop(checkpoint, fingerprint, total_steps, desc="train")
    if loop.state is not None:
        ...  # restore weights, optimizer, history from loop.state
    for step in loop.steps():
        ...  # one epoch or generation
        loop.save(step, {...}, postfix={"loss": "0.123"})
    elapsed = loop.wall_seconds  # including the time of the runs before a resume
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dnnmod.artifacts import atomic_write

log = logging.getLogger(__name__)

#: layout of the checkpoints :class:`ResumableLoop` writes (older layouts are not resumed)
CHECKPOINT_FORMAT = "dnnmod.loop/1"


def epoch_generator(seed: int, step: int) -> torch.Generator:
    """An independent random stream per (seed, step); seeds the global stream too (dropout)."""
    stream = seed * 1_000_003 + step
    torch.manual_seed(stream)
    return torch.Generator().manual_seed(stream)


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    # Module-level on purpose: tests replace it to simulate a job killed after a checkpoint.
    with atomic_write(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to the run ``fingerprint``, else None."""
    if path is None or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: never trust it, never crash on it
        log.warning("ignoring unreadable checkpoint %s (%s); starting from the beginning",
                    path, err)
        return None
    if checkpoint.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s belongs to another run configuration; starting from the "
                    "beginning", path)
        return None
    return checkpoint


class ResumableLoop:
    """Steps ``0 .. total_steps - 1`` of a run, continuing after the last checkpointed step.

    ``path`` None: nothing is written or resumed. ``progress`` None shows a progress bar with an
    ETA on a terminal only (silent in logs and CI); True/False force it on/off. ``unit`` names a
    step in the progress bar and the log (``epoch``, ``generation``).
    """

    def __init__(self, path: Path | None, fingerprint: str, total_steps: int, *, desc: str,
                 unit: str = "epoch", progress: bool | None = None) -> None:
        self.path, self.fingerprint, self.total_steps = path, fingerprint, total_steps
        self.desc, self.unit, self.progress = desc, unit, progress
        self._started = time.monotonic()
        self._bar: tqdm | None = None
        checkpoint = load_checkpoint(path, fingerprint)
        if checkpoint is not None and checkpoint.get("format") != CHECKPOINT_FORMAT:
            log.warning("checkpoint %s has another layout (%r); starting from the beginning",
                        path, checkpoint.get("format"))
            checkpoint = None
        #: the state the body saved with its last finished step, or None on a fresh start
        self.state: dict[str, Any] | None = None
        self.first_step, self._earlier_seconds = 0, 0.0
        if checkpoint is not None:
            self.state = checkpoint["state"]
            self.first_step = checkpoint["step"] + 1
            self._earlier_seconds = checkpoint["wall_seconds"]
            log.info("%s: resuming from %s after %s %d", desc, path, unit, self.first_step)

    @property
    def wall_seconds(self) -> float:
        """Seconds spent on this run so far, the runs before a resume included."""
        return self._earlier_seconds + time.monotonic() - self._started

    def steps(self) -> Iterator[int]:
        """The steps still to run; the progress bar lives as long as the iteration."""
        self._bar = tqdm(total=self.total_steps, initial=self.first_step, unit=self.unit,
                         desc=self.desc,
                         disable=None if self.progress is None else not self.progress)
        try:
            yield from range(self.first_step, self.total_steps)
        finally:
            self._bar.close()

    def save(self, step: int, state: dict[str, Any],
             postfix: Mapping[str, object] | None = None) -> None:
        """Record ``step`` as finished: checkpoint ``state`` (restored as :attr:`state` by a
        resumed run) and advance the progress bar, showing ``postfix``."""
        if self.path is not None:
            save_checkpoint(self.path, {
                "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": step,
                "wall_seconds": self.wall_seconds, "state": state,
            })
        if self._bar is not None:
            self._bar.set_postfix(postfix or {})
            self._bar.update(1)

"""Which device a job runs on: a lock-file pool of GPU slots, or the CPU.

Snakemake's ``--resources gpu=N`` caps how many GPU jobs run at once but never says which GPU a
job should use. Each GPU job therefore claims a free slot here: one lock file per visible
device, held with ``flock`` for the life of the process. The kernel releases a flock when its
holder dies, even on SIGKILL, so a killed job never leaves a slot taken. The chosen device is
exported in ``CUDA_VISIBLE_DEVICES`` before CUDA initialises, so the job sees exactly one GPU.
When a scheduler (SLURM, a user) has already set ``CUDA_VISIBLE_DEVICES``, the pool chooses
among those devices only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dnnmod.errors import DnnmodError

log = logging.getLogger(__name__)

DEFAULT_POOL_DIR = Path(os.environ.get("DNNMOD_GPU_POOL", "/tmp/dnnmod-gpu-pool"))
# Set to 1 to exercise the slot pool without GPUs: slots are claimed and held as usual, the
# computation runs on the CPU (how the tests check that concurrent jobs get distinct devices).
SIMULATE_ENV = "DNNMOD_SIMULATE_GPUS"


@dataclass
class DeviceClaim:
    """A claimed device. ``device`` is the torch device string for this process."""

    device: str
    physical_id: str | None = None
    _lock: IO | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None


def visible_gpu_ids() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else those the driver lists.

    The driver is asked through ``nvidia-smi`` rather than torch, because initialising CUDA
    here would pin the process to all devices before we narrow CUDA_VISIBLE_DEVICES.
    """
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is not None:
        return [d.strip() for d in preset.split(",") if d.strip() and d.strip() != "-1"]
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def _try_lock(path: Path) -> IO | None:
    handle = open(path, "a+")  # noqa: SIM115 - the open handle *is* the held lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def claim_gpu_slot(gpu_ids: list[str], pool_dir: Path = DEFAULT_POOL_DIR,
                   wait_seconds: float | None = None, poll_seconds: float = 0.5) -> DeviceClaim:
    """Hold the lock of one free device among ``gpu_ids``, waiting while all are taken.

    Waiting is the normal case when more GPU jobs run than there are devices (e.g. without
    ``--resources gpu=N``): the pool then acts as a queue. Pipelines on one machine share the
    pool when they share ``pool_dir``.
    """
    if not gpu_ids:
        raise DnnmodError("claim_gpu_slot: no GPU ids to choose from")
    pool_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
    announced = False
    while True:
        for gpu in gpu_ids:
            lock = _try_lock(pool_dir / f"gpu{gpu}.lock")
            if lock is not None:
                return DeviceClaim(device="cuda:0", physical_id=gpu, _lock=lock)
        if not announced:
            log.info("all GPU slots %s in %s are busy; waiting for one", gpu_ids, pool_dir)
            announced = True
        if deadline is not None and time.monotonic() > deadline:
            raise DnnmodError(
                f"all GPU slots {gpu_ids} in {pool_dir} stayed busy for {wait_seconds:.0f} s; "
                "run with fewer concurrent GPU jobs (--resources gpu=N) or free a device"
            )
        time.sleep(poll_seconds)


def select_device(request: str = "auto", pool_dir: Path = DEFAULT_POOL_DIR) -> DeviceClaim:
    """Resolve ``auto``/``cpu``/``cuda`` to a device, claiming a GPU slot when one is used.

    ``auto`` takes a free GPU if any, else the CPU with a log line saying so; ``cuda`` fails
    with a clear error when no GPU is visible. Call before anything initialises CUDA.
    """
    if request == "cpu":
        return DeviceClaim(device="cpu")
    if request not in ("auto", "cuda"):
        raise DnnmodError(f"device must be 'auto', 'cpu' or 'cuda', not {request!r}")
    gpu_ids = visible_gpu_ids()
    if not gpu_ids:
        if request == "cuda":
            raise DnnmodError("device 'cuda' requested but no GPU is visible "
                              "(nvidia-smi lists none, or CUDA_VISIBLE_DEVICES is empty)")
        log.warning("no GPU visible: running on the CPU")
        return DeviceClaim(device="cpu")
    claim = claim_gpu_slot(gpu_ids, pool_dir)
    os.environ["CUDA_VISIBLE_DEVICES"] = claim.physical_id
    if os.environ.get(SIMULATE_ENV) == "1":
        log.info("claimed GPU slot %s (simulated: computing on the CPU)", claim.physical_id)
        claim.device = "cpu"
        return claim
    import torch  # after narrowing CUDA_VISIBLE_DEVICES, before CUDA initialises

    if not torch.cuda.is_available():
        claim.release()
        if request == "cuda":
            raise DnnmodError(f"GPU {claim.physical_id} is listed but torch cannot use it "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        log.warning("GPU %s listed but unusable by torch: running on the CPU", claim.physical_id)
        return DeviceClaim(device="cpu")
    log.info("claimed GPU slot %s (CUDA_VISIBLE_DEVICES=%s)", claim.physical_id,
             claim.physical_id)
    return claim


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a torch device or its name; nothing to wait for
    on a CPU), so that a wall-clock timer read next covers it."""
    import torch  # here, so that choosing a device (the CLI's start) does not load torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)

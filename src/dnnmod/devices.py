"""Which device a job runs on: a lock-file pool of GPU slots, the scheduler's GPU, or the CPU.

Snakemake's ``--resources gpu=N`` caps how many GPU jobs run at once but never says which GPU a
job should use. Each GPU job therefore claims a free slot here: one lock file per visible
device, held with ``flock`` for the life of the process. The kernel releases a flock when its
holder dies, even on SIGKILL, so a killed job never leaves a slot taken. The chosen device is
exported in ``CUDA_VISIBLE_DEVICES`` before CUDA initialises, so the job sees exactly one GPU.
When a user has already set ``CUDA_VISIBLE_DEVICES``, the pool chooses among those devices only.

The pool is one per machine, shared by every user on it (the GPUs are), so its directory is
world-writable and sticky like /tmp and its lock files are writable by all. Inside a SLURM job
that the scheduler gave GPUs, the pool is not used at all: slurmd already assigned the devices,
and under cgroup confinement every 1-GPU job on a node sees its own GPU as device 0, so a
host-wide lock on ``gpu0.lock`` would serialise jobs that SLURM meant to run side by side.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dnnmod.errors import DnnmodError

log = logging.getLogger(__name__)

POOL_ENV = "DNNMOD_GPU_POOL"
DEFAULT_POOL_DIR = Path("/tmp/dnnmod-gpu-pool")
# Every user claims slots in the same pool: the directory is like /tmp (anyone may add a lock
# file, nobody may remove another's), the lock files are writable by all.
POOL_DIR_MODE = 0o1777
LOCK_FILE_MODE = 0o666
# Set to 1 to exercise the slot pool without GPUs: slots are claimed and held as usual, the
# computation runs on the CPU (how the tests check that concurrent jobs get distinct devices).
SIMULATE_ENV = "DNNMOD_SIMULATE_GPUS"
# What slurmd sets in a job (or job step) that holds GPUs: the GPUs' node-wide indices.
SLURM_GPU_ENVS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
# The oldest NVIDIA driver that runs a torch build for each CUDA major version (NVIDIA's CUDA
# compatibility tables: 12.x from 525.60.13 on; 13.x from the driver of CUDA 13.0, 580.65.06).
MIN_DRIVER_FOR_CUDA_MAJOR = {12: "525.60.13", 13: "580.65.06"}


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
    listing = _nvidia_smi("index")
    return [] if listing is None else [line.strip() for line in listing if line.strip()]


def _nvidia_smi(query: str) -> list[str] | None:
    """One ``nvidia-smi --query-gpu`` column, a line per GPU; None without a working driver."""
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None


def scheduler_gpu_ids() -> list[str] | None:
    """The GPUs SLURM gave this job, as CUDA_VISIBLE_DEVICES names them; None outside a SLURM
    job holding GPUs (slurmd sets ``SLURM_JOB_GPUS`` or ``SLURM_STEP_GPUS`` only then)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    if not any(os.environ.get(name) for name in SLURM_GPU_ENVS):
        return None
    return visible_gpu_ids()


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _pool_error(path: Path, error: OSError) -> DnnmodError:
    """One line saying which pool file this user cannot use, whose it is, and what to do."""
    try:
        info = path.lstat()
        found = f"owner {_user(info.st_uid)}, mode {stat.filemode(info.st_mode)}"
    except OSError:
        found = "it does not exist"
    pool = path if path.is_dir() else path.parent
    return DnnmodError(
        f"GPU slot pool: user {_user(os.geteuid())} cannot use {path} ({error.strerror}; "
        f"{found}); a pool shared by several users needs `chmod 1777 {pool}` and "
        f"`chmod 666 {pool}/*.lock` by its owner, or set {POOL_ENV} to a pool of your own"
    )


def _prepare_pool(pool_dir: Path) -> None:
    try:
        pool_dir.mkdir(parents=True, exist_ok=True)
        info = pool_dir.stat()
        # The umask narrowed mkdir's mode, and older pools were private: the owner widens it.
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != POOL_DIR_MODE:
            pool_dir.chmod(POOL_DIR_MODE)
    except OSError as error:
        raise _pool_error(pool_dir, error) from error


def _open_lock_file(path: Path) -> IO:
    """The lock file at ``path``, opened for writing, created shared if it is not there.

    An existing file is opened without O_CREAT: with ``fs.protected_regular`` a process may
    not O_CREAT-open another user's file in a sticky directory, even one it may write.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        while True:
            try:
                descriptor = os.open(path, flags)
                break
            except FileNotFoundError:
                pass
            try:
                descriptor = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOCK_FILE_MODE)
                break
            except FileExistsError:
                continue  # another process created it in between: open theirs
        info = os.fstat(descriptor)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != LOCK_FILE_MODE:
            os.fchmod(descriptor, LOCK_FILE_MODE)  # the umask narrowed the creation mode
    except OSError as error:
        raise _pool_error(path, error) from error
    return os.fdopen(descriptor, "r+")


def _try_lock(path: Path) -> IO | None:
    handle = _open_lock_file(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {_user(os.geteuid())}\n")  # who holds it, for a curious user
    handle.flush()
    return handle


def pool_directory() -> Path:
    """The pool of this job: ``$DNNMOD_GPU_POOL``, else ``DEFAULT_POOL_DIR``. Read when a job
    claims a slot, not at import (a fork-server worker imported this in the server)."""
    return Path(os.environ.get(POOL_ENV, DEFAULT_POOL_DIR))


def claim_gpu_slot(gpu_ids: list[str], pool_dir: Path | None = None,
                   wait_seconds: float | None = None, poll_seconds: float = 0.5) -> DeviceClaim:
    """Hold the lock of one free device among ``gpu_ids``, waiting while all are taken.

    Waiting is the normal case when more GPU jobs run than there are devices (e.g. without
    ``--resources gpu=N``): the pool then acts as a queue. Pipelines on one machine share the
    pool when they share ``pool_dir``, whoever runs them.
    """
    if not gpu_ids:
        raise DnnmodError("claim_gpu_slot: no GPU ids to choose from")
    pool_dir = pool_dir or pool_directory()
    _prepare_pool(pool_dir)
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


def cuda_requirement() -> str:
    """What the installed torch build needs of the machine to compute on a GPU."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; install the CUDA build"
    major = int(torch.version.cuda.split(".")[0])
    driver = MIN_DRIVER_FOR_CUDA_MAJOR.get(major)
    needs = f"an NVIDIA driver >= {driver}" if driver else f"a driver for CUDA {major}"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} and needs {needs}"


def _driver_found() -> str:
    versions = _nvidia_smi("driver_version")
    if not versions:
        return "found no working NVIDIA driver (nvidia-smi fails or is missing)"
    return f"found driver {versions[0].strip()}"


def cuda_problem() -> str | None:
    """Why torch cannot compute on a GPU here, or None when it can.

    Asked in a child process: the caller (Snakemake's own process) must not hold a CUDA
    context for the whole run, nor initialise CUDA before its jobs narrow the devices.
    """
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True, text=True, timeout=300,
    )
    if probe.returncode == 0 and probe.stdout.strip() == "True":
        return None
    # torch says why in a warning ("The NVIDIA driver on your system is too old ...").
    reason = next((line.strip() for line in probe.stderr.splitlines()
                   if "CUDA initialization" in line or "NVIDIA driver" in line), None)
    return reason or "torch.cuda.is_available() is False"


def check_gpu_slots(slots: int | None, device: str) -> None:
    """Fail before any job runs when a run asks for GPU slots (``--resources gpu=N``) that
    torch cannot use, instead of every job computing on the CPU for days."""
    if not slots or device == "cpu" or os.environ.get(SIMULATE_ENV) == "1":
        return
    if not visible_gpu_ids():
        problem = ("no GPU is visible (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES is "
                   "empty)")
    else:
        problem = cuda_problem()
        if problem is None:
            return
    raise DnnmodError(
        f"--resources gpu={slots} asks for GPU slots, but torch cannot use a GPU here: "
        f"{problem}; {cuda_requirement()}, {_driver_found()}. Fix the driver, or run on "
        "the CPU with `device: cpu` and no --resources gpu=N"
    )


def select_device(request: str = "auto", pool_dir: Path | None = None) -> DeviceClaim:
    """Resolve ``auto``/``cpu``/``cuda`` to a device, claiming a GPU slot when one is used.

    ``auto`` takes a free GPU if any is visible, else the CPU with a log line saying so;
    ``cuda`` fails with a clear error when no GPU is visible. A visible GPU that torch cannot
    use (a driver too old for its CUDA build) is an error in both cases, never a silent CPU
    run. Inside a SLURM job holding GPUs, the scheduler's assignment is used as it is. Call
    before anything initialises CUDA.
    """
    if request == "cpu":
        return DeviceClaim(device="cpu")
    if request not in ("auto", "cuda"):
        raise DnnmodError(f"device must be 'auto', 'cpu' or 'cuda', not {request!r}")
    assigned = scheduler_gpu_ids()
    gpu_ids = visible_gpu_ids() if assigned is None else assigned
    if not gpu_ids:
        if request == "cuda" or assigned is not None:
            raise DnnmodError(f"device {request!r} needs a GPU, but no GPU is visible "
                              "(nvidia-smi lists none, or CUDA_VISIBLE_DEVICES is empty)")
        log.warning("no GPU visible: running on the CPU")
        return DeviceClaim(device="cpu")
    if assigned is not None:
        # slurmd chose the device (and, with cgroups, confined the job to it): no host lock.
        claim = DeviceClaim(device="cuda:0", physical_id=assigned[0])
        origin = f"assigned by SLURM job {os.environ['SLURM_JOB_ID']}"
    else:
        pool_dir = pool_dir or pool_directory()
        claim = claim_gpu_slot(gpu_ids, pool_dir)
        origin = f"from the pool in {pool_dir}"
    os.environ["CUDA_VISIBLE_DEVICES"] = claim.physical_id
    if os.environ.get(SIMULATE_ENV) == "1":
        log.info("claimed GPU slot %s (simulated: computing on the CPU; %s)",
                 claim.physical_id, origin)
        claim.device = "cpu"
        return claim
    import torch  # after narrowing CUDA_VISIBLE_DEVICES, before CUDA initialises

    if not torch.cuda.is_available():
        claim.release()
        raise DnnmodError(f"GPU {claim.physical_id} is visible but torch cannot use it: "
                          f"{cuda_requirement()}, {_driver_found()}; fix the driver, or "
                          "set device: cpu")
    # dnnmod.report.cost reads this line to know the job ran on a GPU.
    log.info("claimed GPU slot %s (CUDA_VISIBLE_DEVICES=%s, %s)", claim.physical_id,
             claim.physical_id, origin)
    return claim


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a torch device or its name; nothing to wait for
    on a CPU), so that a wall-clock timer read next covers it."""
    import torch  # here, so that choosing a device (the CLI's start) does not load torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)

"""The GPU slot pool, simulated with fake device ids (no GPU needed): several processes and
several users on one machine, jobs inside a SLURM allocation, and runs that ask for GPU slots
where torch cannot use a GPU."""

from __future__ import annotations

import multiprocessing
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from workflow_helpers import TINY, make_project, snakemake, write_config

from dnnmod.devices import (
    check_gpu_slots,
    claim_gpu_slot,
    cuda_requirement,
    select_device,
    visible_gpu_ids,
)
from dnnmod.errors import DnnmodError

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="acting as a second user (setuid to nobody and daemon) needs root")


def skip_where_cuda_works() -> None:
    import torch  # not at the top: spawned workers of the pool tests import this module

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU that torch can use")


def _claim_and_report(pool_dir: str, ids: list[str], barrier, queue) -> None:
    claim = claim_gpu_slot(ids, Path(pool_dir))
    queue.put((os.getpid(), claim.physical_id))
    barrier.wait(timeout=30)  # hold the slot until every process has claimed one
    claim.release()


def test_concurrent_processes_get_distinct_slots(tmp_path):
    ids = ["0", "1", "2", "3"]
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(len(ids)), context.Queue()
    workers = [context.Process(target=_claim_and_report, args=(str(tmp_path), ids, barrier, queue))
               for _ in ids]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    claimed = sorted(queue.get(timeout=5)[1] for _ in ids)
    assert claimed == ids


def test_a_fifth_job_waits_until_a_slot_frees(tmp_path):
    held = [claim_gpu_slot(["0", "1"], tmp_path) for _ in range(2)]
    assert {c.physical_id for c in held} == {"0", "1"}
    with pytest.raises(DnnmodError, match="stayed busy"):
        claim_gpu_slot(["0", "1"], tmp_path, wait_seconds=0.3, poll_seconds=0.05)
    held[1].release()
    assert claim_gpu_slot(["0", "1"], tmp_path, wait_seconds=1).physical_id == "1"


def test_slot_of_a_killed_process_is_free_again(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from dnnmod.devices import claim_gpu_slot;"
        f"c = claim_gpu_slot(['7'], Path({str(tmp_path)!r})); print('held', flush=True);"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DnnmodError):
        claim_gpu_slot(["7"], tmp_path, wait_seconds=0.2, poll_seconds=0.05)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    assert claim_gpu_slot(["7"], tmp_path, wait_seconds=5).physical_id == "7"
    assert time.monotonic() - started < 5


def test_scheduler_assignment_is_respected(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpu_ids() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_ids() == []


def test_no_gpu_falls_back_to_cpu_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with caplog.at_level("WARNING"):
        assert select_device("auto").device == "cpu"
    assert "no GPU visible" in caplog.text
    with pytest.raises(DnnmodError, match="no GPU is visible"):
        select_device("cuda")


# Several users on one machine: the pool is shared (so are the GPUs), and each user may claim
# the slots another user's jobs created.


@pytest.fixture
def shared_tmp():
    """A folder every user may enter and write, like /tmp (pytest's tmp_path is private)."""
    folder = Path(tempfile.mkdtemp(prefix="dnnmod-pool-test-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


def _as_user(user: str, function, *args) -> str:
    """``function(*args)`` in a child process that switched to ``user``: its result, or the
    DnnmodError's message prefixed with 'error: '. Forked, not executed anew, because the
    interpreter may live where another user cannot read it (root's home)."""
    entry = pwd.getpwnam(user)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            try:
                outcome = str(function(*args))
            except DnnmodError as error:
                outcome = f"error: {error}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        outcome = pipe.read()
    os.waitpid(child, 0)
    return outcome


def _claimed_slot(ids: list[str], pool: Path, wait: float) -> str:
    claim = claim_gpu_slot(ids, pool, wait_seconds=wait, poll_seconds=0.05)
    mode = stat.S_IMODE((pool / f"gpu{claim.physical_id}.lock").stat().st_mode)
    claim.release()
    return f"{claim.physical_id} {mode:o}"


@needs_root
def test_users_share_one_pool(shared_tmp):
    pool = shared_tmp / "pool"
    held = claim_gpu_slot(["0"], pool)  # root's job holds GPU 0, in a pool root created
    assert stat.S_IMODE(pool.stat().st_mode) == 0o1777
    # nobody's job opens root's gpu0.lock (busy) and creates gpu1.lock, writable by all.
    assert _as_user("nobody", _claimed_slot, ["0", "1"], pool, 5) == "1 666"
    # A third user opens nobody's lock file, and waits for root's like any other job.
    assert _as_user("daemon", _claimed_slot, ["1"], pool, 5) == "1 666"
    assert "stayed busy" in _as_user("daemon", _claimed_slot, ["0"], pool, 0.2)
    held.release()
    assert _as_user("daemon", _claimed_slot, ["0"], pool, 5) == "0 666"


@needs_root
def test_a_pool_private_to_another_user_is_one_clear_error(shared_tmp):
    # The layout older versions left: a directory and lock files only their creator may write.
    pool = shared_tmp / "pool"
    pool.mkdir(mode=0o755)
    (pool / "gpu0.lock").write_text("")
    (pool / "gpu0.lock").chmod(0o644)
    outcome = _as_user("nobody", _claimed_slot, ["0"], pool, 1)
    assert outcome.startswith("error: GPU slot pool: user nobody cannot use "
                              f"{pool}/gpu0.lock (Permission denied; owner root"), outcome
    assert "chmod 1777" in outcome and "DNNMOD_GPU_POOL" in outcome and "\n" not in outcome
    # The owner's next claim widens the pool, and the other user's claim then works.
    claim_gpu_slot(["0"], pool).release()
    assert _as_user("nobody", _claimed_slot, ["0"], pool, 1) == "0 666"


# Inside a SLURM allocation the scheduler already chose the GPU: no host-wide lock.


def test_a_slurm_job_uses_its_assigned_gpu_without_a_lock(monkeypatch, tmp_path):
    # Under cgroup confinement every 1-GPU job on a node sees its GPU as device 0.
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("DNNMOD_SIMULATE_GPUS", "1")
    pool = tmp_path / "pool"
    first, second = select_device("auto", pool), select_device("auto", pool)
    assert first.physical_id == second.physical_id == "0"
    assert not pool.exists()  # neither job touched the host's pool
    # A SLURM job without GPUs is not an assignment: the usual rules apply.
    monkeypatch.delenv("SLURM_JOB_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert select_device("auto", pool).device == "cpu"


# GPU slots asked for where torch cannot compute on a GPU: one error before any work.


def test_gpu_slots_without_a_gpu_fail_naming_the_requirement(monkeypatch):
    monkeypatch.delenv("DNNMOD_SIMULATE_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    check_gpu_slots(0, "auto")  # no slots asked for
    check_gpu_slots(4, "cpu")  # the CPU on purpose
    with pytest.raises(DnnmodError) as raised:
        check_gpu_slots(4, "auto")
    message = str(raised.value)
    assert message.startswith("--resources gpu=4 asks for GPU slots, but torch cannot use a "
                              "GPU here: no GPU is visible")
    assert cuda_requirement() in message and "device: cpu" in message
    if "built for CUDA 13.0" in message:  # the pinned torch==2.14.1 build
        assert "built for CUDA 13.0 and needs an NVIDIA driver >= 580.65.06" in message


def test_a_visible_gpu_that_torch_cannot_use_is_an_error_not_a_cpu_run(monkeypatch, tmp_path):
    skip_where_cuda_works()
    # A device listed (here: named by CUDA_VISIBLE_DEVICES) that torch cannot initialise, as
    # with a driver older than the torch build needs.
    monkeypatch.delenv("DNNMOD_SIMULATE_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DnnmodError, match="--resources gpu=2 asks for GPU slots, but torch "
                                          "cannot use a GPU here"):
        check_gpu_slots(2, "auto")
    with pytest.raises(DnnmodError, match="GPU 0 is visible but torch cannot use it: torch "):
        select_device("auto", tmp_path / "pool")


def test_snakemake_with_gpu_slots_fails_before_the_first_job(tmp_path, monkeypatch):
    skip_where_cuda_works()
    monkeypatch.delenv("DNNMOD_SIMULATE_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    project = make_project(tmp_path / "project")
    configfile = write_config(project, {**TINY, "device": "auto"})
    run = snakemake(project, "--cores", "1", "--resources", "gpu=1", "--configfile",
                    configfile)
    assert run.returncode != 0
    assert "--resources gpu=1 asks for GPU slots" in run.stdout, run.stdout[-2000:]
    assert not (project / "results").exists() and not (project / "data").exists()

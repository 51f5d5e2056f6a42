"""The GPU slot pool, simulated with fake device ids (no GPU needed)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnnmod.devices import claim_gpu_slot, select_device, visible_gpu_ids
from dnnmod.errors import DnnmodError


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

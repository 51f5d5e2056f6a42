"""The fork server of local workflow runs: a job started by it behaves as the job's own process
would (output, status, working directory, environment, signals), and falls back to being one
when no server fits. The workflow's use of it: tests/test_workflow.py and tests/test_faults.py
(the same seed gives the same bits with and without it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from workflow_helpers import BIN, REPO

from dnnmod import fork_server
from dnnmod.report.cost import measured_jobs

DNNMOD = str(BIN / "dnnmod")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server started as the workflow's onstart hook starts it; the socket path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        server = fork_server.start_for_workflow(tmp_path_factory.mktemp("server") / "log")
        assert server is not None and os.environ[fork_server.SOCKET_ENV] == server.socket
        try:
            yield server.socket
        finally:
            fork_server.stop_for_workflow(server)
    assert fork_server.SOCKET_ENV not in os.environ
    assert not os.path.exists(os.path.dirname(server.socket))


def run(*args: str, socket_path: str | None, cwd: Path | None = None, umask: int = -1,
        **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key != fork_server.SOCKET_ENV}
    if socket_path:
        environment[fork_server.SOCKET_ENV] = socket_path
    return subprocess.run([DNNMOD, *args], cwd=cwd, env={**environment, **env}, umask=umask,
                          capture_output=True, text=True, timeout=120)


def worker_usage(stderr: str) -> list:
    return fork_server.USAGE.findall(stderr)


@pytest.mark.parametrize("args", [("list", "models"), ("list", "bogus"), ("plan", "--help")])
def test_a_started_job_prints_and_exits_as_its_own_process_would(server, args):
    own, started = run(*args, socket_path=None), run(*args, socket_path=server)
    assert started.returncode == own.returncode
    assert started.stdout == own.stdout
    # the worker adds its usage as the last line of the job's standard error (the log)
    assert not worker_usage(own.stderr) and len(worker_usage(started.stderr)) == 1
    assert started.stderr.splitlines()[-1].startswith("dnnmod fork-server worker:")
    assert "\n".join(started.stderr.splitlines()[:-1]) == own.stderr.rstrip("\n")


def test_a_started_job_has_the_jobs_directory_and_environment(server, tmp_path):
    started = run("data", "prepare", "--dataset", "digits", "--root", "data",
                  socket_path=server, cwd=tmp_path, umask=0o077)
    assert started.returncode == 0, started.stderr
    assert worker_usage(started.stderr)
    written = [path for path in (tmp_path / "data/digits").rglob("*") if path.is_file()]
    assert written  # relative to the job's directory, with the job's umask
    assert all(path.stat().st_mode & 0o077 == 0 for path in written)

    # the job's environment: DNNMOD_DEBUG turns a one-line error into a traceback
    quiet = run("data", "prepare", "--dataset", "nope", "--root", "data", socket_path=server,
                cwd=tmp_path)
    loud = run("data", "prepare", "--dataset", "nope", "--root", "data", socket_path=server,
               cwd=tmp_path, DNNMOD_DEBUG="1")
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_without_a_fitting_server_a_job_runs_itself(server, tmp_path):
    missing = run("list", "models", socket_path=str(tmp_path / "no-socket"))
    assert missing.returncode == 0 and "simcnn" in missing.stdout
    assert not worker_usage(missing.stderr)
    # another copy of dnnmod (as a rule's own conda environment would have): refused
    shutil.copytree(REPO / "src/dnnmod", tmp_path / "src/dnnmod")
    other = run("list", "models", socket_path=server, PYTHONPATH=str(tmp_path / "src"))
    assert other.returncode == 0 and "simcnn" in other.stdout
    assert not worker_usage(other.stderr)


def test_a_job_runs_itself_once_dnnmods_source_changed_since_the_server_started(tmp_path):
    # the code a fresh process would import, not the server's: an edit during a run counts
    shutil.copytree(REPO / "src/dnnmod", tmp_path / "src/dnnmod")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        patch.setenv("PYTHONPATH", str(tmp_path / "src"))
        server = fork_server.start(tmp_path / "log")
        try:
            before = run("list", "models", socket_path=server.socket)
            with (tmp_path / "src/dnnmod/cli/data.py").open("a") as source:
                source.write("\n# edited during the run\n")
            after = run("list", "models", socket_path=server.socket)
        finally:
            fork_server.stop(server)
    assert worker_usage(before.stderr) and not worker_usage(after.stderr)
    assert after.returncode == 0 and after.stdout == before.stdout


def test_a_worker_takes_the_thread_counts_of_its_jobs_environment(monkeypatch):
    # A fresh process reads OMP_NUM_THREADS and OPENBLAS_NUM_THREADS (Snakemake sets them to
    # the rule's threads) when torch and OpenBLAS load; a worker's were loaded by the server.
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    torch_threads, blas = torch.get_num_threads(), blas_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
        fork_server._apply_thread_limits(server_threads=3)
        assert torch.get_num_threads() == 1 and blas_threads() <= {1}
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("MKL_NUM_THREADS", "2")
        fork_server._apply_thread_limits(server_threads=3)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("MKL_NUM_THREADS")
        fork_server._apply_thread_limits(server_threads=3)  # no variable: the server's count
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(torch_threads)
        if blas:
            threadpool_limits(limits=max(blas), user_api="blas")


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_job_takes_its_worker_with_it(server, tmp_path, signum):
    # The job: a command that runs until killed, a fork server itself (its socket tells
    # whether its worker still runs). It serves while its parent, the first server, lives.
    inner = tmp_path / "inner"
    environment = {**os.environ, fork_server.SOCKET_ENV: server}
    job = subprocess.Popen([DNNMOD, "fork-server", "--socket", str(inner), "--parent",
                            str(server_pid(server))], env=environment,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: listening(inner))
    job.send_signal(signum)
    # SIGTERM is forwarded and the job dies of it, as its worker did; SIGKILL cannot be
    # caught, so the worker sees the job's end of the connection close and kills itself
    assert job.wait(timeout=30) == -signum
    wait_for(lambda: not listening(inner), timeout=10)


def server_pid(path: str) -> int:
    """The pid of the server listening at ``path`` (the peer of a connection to it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(path)
        credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(credentials[:4], "little")


def test_the_cost_table_adds_a_workers_usage_to_its_job(tmp_path):
    benchmarks, logs = tmp_path / "benchmarks/train", tmp_path / "logs/train"
    benchmarks.mkdir(parents=True)
    logs.mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for job, cpu in (("own", "7.5"), ("started", "0.25"), ("short", "NA"), ("short_own", "NA")):
        (benchmarks / f"{job}.tsv").write_text(
            f"{header}10.0\t0:00:10\t{'NA' if cpu == 'NA' else 30.0}\t0\t0\t0\t0\t0\t0\t{cpu}\n")
    usage = "dnnmod fork-server worker: cpu_seconds=9.125 max_rss_mb=512.5\n"
    (logs / "own.log").write_text("training\n")
    (logs / "started.log").write_text(f"training\n{usage}")
    (logs / "short.log").write_text(usage)
    jobs = {path.name: usage for path, usage, _ in measured_jobs(tmp_path)}
    assert jobs["own"] == {"wall_seconds": 10.0, "cpu_seconds": 7.5, "max_rss_mb": 30.0}
    assert jobs["started"] == {"wall_seconds": 10.0, "cpu_seconds": 9.375, "max_rss_mb": 542.5}
    # not sampled by Snakemake: the worker's numbers alone; with no worker, one busy core
    assert jobs["short"] == {"wall_seconds": 10.0, "cpu_seconds": 9.125, "max_rss_mb": 512.5}
    assert jobs["short_own"] == {"wall_seconds": 10.0, "cpu_seconds": 10.0, "max_rss_mb": 0.0}


# What the jobs do that loads libraries on first use: make an optimizer (torch.optim imports
# torch._dynamo) and a checkpoint, save and load a module set (jsonschema), write a table
# (pandas' CSV writer and Styler, tabulate) and a figure (the PNG and PDF backends, PIL,
# fontTools).
_JOB_WORK = """
import json, sys, tempfile
from pathlib import Path
from dnnmod import fork_server
fork_server.preload()
before = set(sys.modules)
import pandas as pd
import torch
from dnnmod.models import build_model
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.modules.structure import trace_structure
from dnnmod.report.figures import pyplot, save_figure
from dnnmod.report.tables import write_table
from dnnmod.resumable import save_checkpoint
from dnnmod.training.train import Recipe, _make_optimizer
root = Path(tempfile.mkdtemp())
model = build_model("lenet5", 10, width=0.25)
for optimizer in ("sgd", "adam"):
    _make_optimizer(model, Recipe(epochs=1, batch_size=2, lr=0.1, optimizer=optimizer))
save_checkpoint(root / "checkpoint.pt", {"weights": model.state_dict()})
structure = trace_structure(model)
group = structure.groups[0]
ModuleSet(approach="test", classes=[0, 1], masks={group.name: torch.ones(2, group.size)},
          head=OwnLogitHead([0, 1], 10), combination="argmax",
          base=base_identity({"arch": "lenet5", "num_classes": 10, "width": 0.25}),
          structure=structure, provenance={"approach": "test", "hyperparameters": {},
                                           "seed": 0, "wall_seconds": 0.0},
          ).save(root / "modules.safetensors")
ModuleSet.load(root / "modules.safetensors")
write_table(pd.DataFrame({"approach": ["a", "a"], "seed": [0, 1], "accuracy": [0.5, 0.7]}),
            root / "table.csv", "A table", ["approach"], ["accuracy"])
figure, axes = pyplot().subplots()
axes.plot([0, 1], [1, 0], label="a")
axes.legend()
save_figure(figure, root / "figure.png")
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_server_has_imported_what_jobs_load_on_first_use():
    """The worker of a training job used to import torch._dynamo (about 1.4 s) when it made
    its optimizer; what a job imports after the server's preload, it pays for every time."""
    result = subprocess.run([BIN / "python", "-c", _JOB_WORK], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []

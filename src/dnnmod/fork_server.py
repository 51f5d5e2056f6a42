"""A fork server for local workflow runs: jobs start from a process that has already imported
torch and the library, instead of paying those imports again in each.

Every Snakemake job is one ``dnnmod`` process, and about 2-3 s of each (on 2 cores) is start-up:
the Python interpreter, torch (about 2 s alone), dnnmod's modules, pandas, matplotlib. A study of
hundreds of small jobs spends a third of its job time there (benchmarks/job_fixed_cost.py).

When Snakemake runs jobs on this machine, the workflow's ``onstart`` hook starts ``dnnmod
fork-server`` (``start_for_workflow``), which imports everything once and listens on a Unix
socket in a private temporary folder; ``$DNNMOD_FORK_SERVER`` names the socket. Each job's
``dnnmod`` process then sends its arguments, working directory, environment and standard
streams (the file descriptors themselves) to the server, which forks a worker that runs the
command as the job's process would have and sends back its exit status. The job's process waits,
forwards signals to the worker (a killed job kills its worker) and exits with the worker's
status; a worker whose job process dies kills itself.

What stays the same: the command, its inputs, environment, working directory, umask, output
files and logs, the thread counts Snakemake sets for the rule, fresh random states; so the
results are the same bits (docs/results/fork_server.md: the demo, with and without). Not
carried over: resource limits (``ulimit``) and the signals other than SIGTERM, SIGINT and
SIGHUP (a job stopped with Ctrl-Z leaves its worker running).
What differs: the worker is the server's child, not the job's, so Snakemake's benchmark files
measure only the waiting job process. The worker therefore writes its own CPU time and peak
memory as the last line of its log (``USAGE``), and E8's cost table adds them
(dnnmod.report.cost). A worker killed outright (SIGKILL, the OOM killer) leaves its job to exit
with status 1 and a line saying so, where a fresh process would die of the signal.

A job falls back to running itself, silently, when no server answers within STARTED_TIMEOUT,
or the server differs from what the job's own process would be: another Python or copy of
dnnmod (a rule run in its own conda environment), dnnmod's source files changed since the server
started, another import path or other PYTHON* variables. Cluster jobs never use it: the hook
starts no server unless jobs run locally.
Switch it off with ``fork_server: false`` in the study config.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import pkgutil
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The environment variable that names the server's socket, set for the jobs of a local run.
SOCKET_ENV = "DNNMOD_FORK_SERVER"
#: The worker's resource line at the end of its log (read by dnnmod.report.cost).
#: Not anchored at a line's start: a job's standard error may end without a newline.
USAGE = re.compile(r"dnnmod fork-server worker: cpu_seconds=([0-9.]+) max_rss_mb=([0-9.]+)$",
                   re.MULTILINE)
#: Libraries the jobs import inside functions (dnnmod's own modules are all imported), and
#: those that libraries import on first use: torch.optim's ``Optimizer`` imports
#: ``torch._dynamo`` when a process makes its first optimizer (about 1.4 s of every training
#: job), a module set's metadata check jsonschema, the tables pandas' CSV writer, Styler and
#: tabulate, a checkpoint torch's serialization settings.
PRELOAD_LIBRARIES = ("jsonschema", "pandas.io.formats.csvs", "pandas.io.formats.style",
                     "safetensors.torch", "scipy.io", "sklearn.datasets",
                     "sklearn.model_selection", "tabulate", "threadpoolctl", "torch._dynamo",
                     "torch.utils.serialization", "torch_pruning")
FOLDER_PREFIX = "dnnmod-fork-"  # of the private folder of a workflow's server socket
#: Seconds a job waits for its worker to start before it runs itself (a stopped server).
STARTED_TIMEOUT = 30.0
_HEADER = struct.Struct("!I")  # the length of a request's JSON
_STREAMS = (0, 1, 2)


def _identity() -> dict[str, Any]:
    """What must match between a job's process and the server, or the job runs itself: the
    Python, the copy of dnnmod and the state of its source files (edited during a run, they are
    what a fresh process would import), the import path and the interpreter's variables
    (PYTHON*), all of which a process takes in when it starts."""
    import dnnmod

    package = Path(dnnmod.__file__).resolve().parent
    files = [entry.stat() for entry in package.rglob("*.py")]
    return {"executable": os.path.realpath(sys.executable), "source": str(package),
            "source_state": [len(files), max(stat.st_mtime_ns for stat in files),
                             sum(stat.st_size for stat in files)],
            "path": sys.path[1:],  # [0] is the script's folder or the working directory
            "python_variables": {key: value for key, value in os.environ.items()
                                 if key.startswith("PYTHON")}}


# ---------------------------------------------------------------------------- the job's side

def delegate(path: str, argv: list[str]) -> int | None:
    """Run ``dnnmod argv`` in a worker of the server at ``path``; its exit status, or None
    when there is no usable server (the caller then runs the command itself)."""
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "umask": umask, **_identity()}).encode()
    except OSError:  # no server; or no working directory, which the job reports itself
        return None
    with client:
        try:
            socket.send_fds(client, [_HEADER.pack(len(request)) + request], list(_STREAMS))
            client.settimeout(STARTED_TIMEOUT)
            replies = client.makefile("rb")
            started = _read_reply(replies)
            client.settimeout(None)
        except OSError:  # gone, or stuck: a worker that starts later finds the job gone
            return None
        if started is None or "pid" not in started:
            return None  # refused (another Python, dnnmod or import path) or gone: run here
        worker, received = started["pid"], []

        def forward(signum: int, _frame: Any) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        finished = _read_reply(replies)
    if finished is not None:
        return int(finished["status"])
    if received:  # the worker died of the signal the job got: so does the job
        signal.signal(received[-1], signal.SIG_DFL)
        os.kill(os.getpid(), received[-1])
    print("dnnmod: error: the job's fork-server worker ended without an exit status (killed?)",
          file=sys.stderr)
    return 1


def _read_reply(replies) -> dict[str, Any] | None:
    line = replies.readline()
    return json.loads(line) if line else None


# ------------------------------------------------------------------------- the server's side

def preload() -> None:
    """Import every dnnmod module and the libraries its jobs import lazily, and draw one
    figure as the figure jobs write theirs (PNG and PDF: the backends, PIL's image plugins,
    fontTools and the fonts are loaded on the first)."""
    import dnnmod
    from dnnmod.report.figures import pyplot

    for module in pkgutil.walk_packages(dnnmod.__path__, "dnnmod."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in PRELOAD_LIBRARIES:
        importlib.import_module(name)
    plt = pyplot()
    figure, axes = plt.subplots()
    axes.plot([0, 1], [0, 1], label="line")
    axes.set_title("title")
    axes.legend()
    for file_format in ("png", "pdf"):
        figure.savefig(io.BytesIO(), format=file_format)
    plt.close(figure)


def serve(path: str, parent: int) -> None:
    """Serve jobs at socket ``path`` while process ``parent`` (the Snakemake run) lives."""
    import torch

    started = time.perf_counter()
    preload()
    if torch.cuda.is_initialized():  # a forked worker cannot use its parent's CUDA
        raise RuntimeError("CUDA was initialised while importing; the fork server cannot serve")
    identity, threads = _identity(), torch.get_num_threads()
    # Workers share the server's memory until they write to it; a garbage collection in a
    # worker would touch (and so copy) every object the imports made. Frozen, it skips them.
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}.binding")
    listener.listen(64)
    os.rename(f"{path}.binding", path)  # the socket appears when it accepts
    listener.settimeout(1.0)  # to notice a dead parent and reap workers
    print(f"dnnmod fork-server: serving at {path} (pid {os.getpid()}); its imports took "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    try:
        while os.getppid() == parent:
            _reap()
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(None)
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                _work(connection, identity, threads)  # never returns
            connection.close()
    finally:  # the workflow's hooks remove the folder; a killed Snakemake runs none
        os.unlink(path)
        if os.path.basename(os.path.dirname(path)).startswith(FOLDER_PREFIX):
            os.rmdir(os.path.dirname(path))


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _send(connection: socket.socket, message: dict[str, Any]) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def _receive(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, len(_STREAMS))
    while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
        chunk = connection.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the connection closed before a whole request came")
        data += chunk
    return json.loads(data[_HEADER.size:]), fds


def _work(connection: socket.socket, identity: dict[str, str], server_threads: int) -> None:
    """The forked worker: become the job's process, run its command, report, exit."""
    status = 1
    try:
        try:
            request, fds = _receive(connection)
        except ConnectionError:  # a probe, or a job's process that died mid-request
            os._exit(0)
        if len(fds) != len(_STREAMS) or any(request[key] != value
                                            for key, value in identity.items()):
            for fd in fds:
                os.close(fd)
            _send(connection, {"refused": "another Python or dnnmod"})
            os._exit(0)
        for target, fd in zip(_STREAMS, fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        _apply_thread_limits(server_threads)
        _reseed()
        sys.argv = ["dnnmod", *request["argv"]]
        _send(connection, {"pid": os.getpid()})
        threading.Thread(target=_die_with_job, args=(connection,), daemon=True).start()
        status = _run(request["argv"])
        _report_usage()
        _send(connection, {"status": status})
    except BaseException:  # noqa: BLE001 - a worker must never return into the server's loop
        traceback.print_exc()
    finally:
        os._exit(status)


def _apply_thread_limits(server_threads: int) -> None:
    """The thread counts a fresh process would take from the job's environment (Snakemake sets
    OMP_NUM_THREADS and the BLAS variables to the rule's threads). The libraries read them when
    they load, which was in the server: set here, a job of 1 thread would otherwise run the
    server's default, and two such jobs on 2 cores would each spin 2 OpenMP threads."""
    import torch
    from threadpoolctl import threadpool_limits

    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's order
        if os.environ.get(variable, "").isdigit() and int(os.environ[variable]) > 0:
            torch.set_num_threads(int(os.environ[variable]))
            break
    else:
        torch.set_num_threads(server_threads)
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "")
    if blas.isdigit() and int(blas) > 0:
        threadpool_limits(limits=int(blas), user_api="blas")


def _reseed() -> None:
    """Fresh random states, as a fresh process starts with (Python's ``random`` reseeds itself
    after a fork); dnnmod seeds what it draws, so only unseeded draws see the difference."""
    import numpy
    import torch

    torch.seed()
    numpy.random.seed()


def _die_with_job(connection: socket.socket) -> None:
    """The job's process sends nothing after its request: end of stream means it died."""
    try:
        while connection.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _run(argv: list[str]) -> int:
    """``dnnmod argv``, with the exit status the command's own process would have had."""
    import logging

    from dnnmod.cli import main

    for handler in logging.root.handlers[:]:  # the server's, so that main sets the job's own
        logging.root.removeHandler(handler)
    try:
        status = main(argv)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        # as Python does: die of SIGINT, so that the job's process reports it
        traceback.print_exc()
        _shut_down()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise
    except BaseException:  # noqa: BLE001 - an uncaught error: the traceback and status 1
        traceback.print_exc()
        status = 1
    _shut_down()
    return status


def _shut_down() -> None:
    """What a fresh process does when it ends: the exit handlers (logging's flush among them),
    then its standard streams flushed."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()


def _report_usage() -> None:
    """CPU seconds and peak memory of this worker and its children, as the log's last line."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(usage.ru_utime + usage.ru_stime for usage in (own, children))
    rss_mb = max(own.ru_maxrss, children.ru_maxrss) / 1024  # KiB on Linux
    print(f"dnnmod fork-server worker: cpu_seconds={cpu:.3f} max_rss_mb={rss_mb:.1f}",
          file=sys.stderr, flush=True)


# ----------------------------------------------------------------- the workflow's hooks

@dataclass(frozen=True)
class Server:
    """A running ``dnnmod fork-server`` and the socket its jobs connect to."""

    process: subprocess.Popen
    socket: str


def start(log: Path, *, command: list[str] | None = None,
          timeout: float = 60.0) -> Server | None:
    """Start ``dnnmod fork-server`` for this process's jobs (they find it through
    ``$DNNMOD_FORK_SERVER`` = ``Server.socket``); None, and jobs start as their own processes,
    when it cannot. ``command``: how the jobs call dnnmod (default: the ``dnnmod`` on the PATH,
    as the workflow's rules do)."""
    if command is None:
        executable = shutil.which("dnnmod")
        if executable is None:
            return None
        command = [executable]
    folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)  # private (0700): one user's jobs only
    path = os.path.join(folder, "socket")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen([*command, "fork-server", "--socket", path,
                                    "--parent", str(os.getpid())],
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                   start_new_session=True)  # a terminal's Ctrl-C goes to jobs
    server = Server(process, path)
    deadline = time.monotonic() + timeout
    while not os.path.exists(server.socket):
        if server.process.poll() is not None or time.monotonic() > deadline:
            stop(server)
            return None
        time.sleep(0.05)
    return server


def stop(server: Server | None) -> None:
    """Stop a server ``start`` started; remove its socket folder."""
    if server is None:
        return
    if server.process.poll() is None:
        server.process.terminate()
        server.process.wait()
    shutil.rmtree(os.path.dirname(server.socket), ignore_errors=True)


def start_for_workflow(log: Path) -> Server | None:
    """``start``, and point this process's jobs (its environment) at the server."""
    server = start(log)
    if server is not None:
        os.environ[SOCKET_ENV] = server.socket
    return server


def stop_for_workflow(server: Server | None) -> None:
    """``stop``, and this process's jobs start as their own processes again."""
    os.environ.pop(SOCKET_ENV, None)
    stop(server)

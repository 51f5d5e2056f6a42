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

What stays the same: the command, its inputs, environment, working directory, output files and
logs; so the results are the same bits (docs/results/fork_server.md: the demo, with and without).
What differs: the worker is the server's child, not the job's, so Snakemake's benchmark files
measure only the waiting job process. The worker therefore writes its own CPU time and peak
memory as the last line of its log (``USAGE``), and E8's cost table adds them
(dnnmod.report.cost).

A job falls back to running itself, silently, when there is no server at the socket, or the
server runs another Python or another copy of dnnmod (a rule run in its own conda
environment). Cluster jobs never use it: the hook starts no server unless jobs run locally.
Switch it off with ``fork_server: false`` in the study config.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
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
from pathlib import Path
from typing import Any

#: The environment variable that names the server's socket, set for the jobs of a local run.
SOCKET_ENV = "DNNMOD_FORK_SERVER"
#: The worker's resource line at the end of its log (read by dnnmod.report.cost).
USAGE = re.compile(r"^dnnmod fork-server worker: cpu_seconds=([0-9.]+) max_rss_mb=([0-9.]+)$",
                   re.MULTILINE)
#: Libraries the jobs import inside functions (dnnmod's own modules are all imported).
PRELOAD_LIBRARIES = ("safetensors.torch", "scipy.io", "sklearn.datasets",
                     "sklearn.model_selection", "threadpoolctl", "torch_pruning")
_HEADER = struct.Struct("!I")  # the length of a request's JSON
_STREAMS = (0, 1, 2)


def _identity() -> dict[str, str]:
    """What must match between a job's process and the server: the Python and the dnnmod."""
    import dnnmod

    return {"executable": os.path.realpath(sys.executable),
            "source": os.path.realpath(dnnmod.__file__)}


# ---------------------------------------------------------------------------- the job's side

def delegate(path: str, argv: list[str]) -> int | None:
    """Run ``dnnmod argv`` in a worker of the server at ``path``; its exit status, or None
    when there is no usable server (the caller then runs the command itself)."""
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
    except OSError:
        return None
    with client:
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              **_identity()}).encode()
        try:
            socket.send_fds(client, [_HEADER.pack(len(request)) + request], list(_STREAMS))
        except OSError:
            return None
        replies = client.makefile("rb")
        started = _read_reply(replies)
        if started is None or "pid" not in started:
            return None  # refused (another Python or dnnmod) or gone: run here
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
    """Import every dnnmod module and the libraries its jobs import lazily."""
    import dnnmod
    from dnnmod.report.figures import pyplot

    for module in pkgutil.walk_packages(dnnmod.__path__, "dnnmod."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in PRELOAD_LIBRARIES:
        importlib.import_module(name)
    pyplot()


def serve(path: str, parent: int) -> None:
    """Serve jobs at socket ``path`` while process ``parent`` (the Snakemake run) lives."""
    import torch

    started = time.perf_counter()
    preload()
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
        os.environ.clear()
        os.environ.update(request["env"])
        _apply_thread_limits(server_threads)
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
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise
    except BaseException:  # noqa: BLE001 - an uncaught error: the traceback and status 1
        traceback.print_exc()
        status = 1
    logging.shutdown()
    return status


def _report_usage() -> None:
    """CPU seconds and peak memory of this worker and its children, as the log's last line."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(usage.ru_utime + usage.ru_stime for usage in (own, children))
    rss_mb = max(own.ru_maxrss, children.ru_maxrss) / 1024  # KiB on Linux
    sys.stdout.flush()
    print(f"dnnmod fork-server worker: cpu_seconds={cpu:.3f} max_rss_mb={rss_mb:.1f}",
          file=sys.stderr, flush=True)


# ----------------------------------------------------------------- the workflow's hooks

def start_for_workflow(log: Path, *, command: list[str] | None = None,
                       timeout: float = 60.0) -> subprocess.Popen | None:
    """Start ``dnnmod fork-server`` for this process's jobs and point them at it
    (``$DNNMOD_FORK_SERVER``); None, and jobs start as their own processes, when it cannot.
    ``command``: how the jobs call dnnmod (default: the ``dnnmod`` on the PATH, as the
    workflow's rules do)."""
    if command is None:
        executable = shutil.which("dnnmod")
        if executable is None:
            return None
        command = [executable]
    folder = tempfile.mkdtemp(prefix="dnnmod-fork-")  # private (0700): one user's jobs only
    path = os.path.join(folder, "socket")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        server = subprocess.Popen([*command, "fork-server", "--socket", path,
                                   "--parent", str(os.getpid())],
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                  start_new_session=True)  # a terminal's Ctrl-C goes to jobs
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_for_workflow(server)
            return None
        time.sleep(0.05)
    os.environ[SOCKET_ENV] = path
    return server


def stop_for_workflow(server: subprocess.Popen | None) -> None:
    """Stop the server ``start_for_workflow`` started; remove its socket folder."""
    path = os.environ.pop(SOCKET_ENV, None)
    if server is None:
        return
    if server.poll() is None:
        server.terminate()
        server.wait()
    socket_folder = os.path.dirname(path or server.args[server.args.index("--socket") + 1])
    shutil.rmtree(socket_folder, ignore_errors=True)

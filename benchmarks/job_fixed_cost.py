"""What a workflow job pays for being a fresh process: the demo's job kinds on tiny inputs.

Every Snakemake job is one ``dnnmod`` process, so each pays its imports (torch, scikit-learn,
pandas, matplotlib) and one-off set-up (FLOP counting) again. Here the job kinds run on inputs
so small that their own work is a small part of the time (a width-1/16 simcnn, one epoch of
the digits' 1,150 training images), so the wall time of each is mostly that fixed cost:

    help         dnnmod --help
    train        dnnmod train, 1 epoch
    evaluate     dnnmod evaluate-modules (E2's metrics: FLOPs, P/R/F1)
    table        dnnmod table modularization, with its figure
    e1 table     dnnmod table base-models

With ``--baseline-src DIR`` every command also runs with another source tree first on the
import path (``PYTHONPATH=DIR``, e.g. a ``git worktree`` of an earlier commit); with
``--fork-server`` it also runs started by a fork server, as a local workflow run starts its jobs
(dnnmod.fork_server). The variants run in turn (A B A B ...), so they are timed under the same
machine load; each row gives the median of each and the median ratio of each to this tree's
own process.

    git worktree add /tmp/before <rev>
    python benchmarks/job_fixed_cost.py --baseline-src /tmp/before/src --runs 5
    python benchmarks/job_fixed_cost.py --fork-server --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dnnmod import fork_server

DNNMOD = [sys.executable, "-m", "dnnmod.cli"]
TINY_RECIPE = {"epochs": 1, "batch_size": 64, "lr": 0.05}


def dnnmod(*args: str, cwd: Path, env: dict[str, str] | None = None) -> float:
    """Run one dnnmod command in a fresh process (``env``: added to the environment); its wall
    time in seconds."""
    started = time.perf_counter()
    subprocess.run([*DNNMOD, *args], cwd=cwd, env={**os.environ, **(env or {})}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def make_inputs(work: Path, env: dict[str, str] | None) -> None:
    """Digits, a tiny trained simcnn, its GradSplitter modules and their metrics, written by
    the source tree that reads them (artifact formats change between commits)."""
    work.mkdir()
    dnnmod("data", "prepare", "--dataset", "digits", "--root", "data", cwd=work, env=env)
    dnnmod("data", "split", "--dataset", "digits", "--root", "data", "--seed", "0", cwd=work,
           env=env)
    train(work, env)
    dnnmod("modularize", "--approach", "gradsplitter", "--model", "model.safetensors",
           "--seed", "0", "--data-root", "data", "--device", "cpu", "--out",
           "modules.safetensors", "--hyperparameters", json.dumps(
               {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1, "head_epochs": 0,
                "max_train_samples": 128}), cwd=work, env=env)
    evaluate(work, env)


def train(work: Path, env: dict[str, str] | None = None) -> float:
    return dnnmod("train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
                  "--recipe", json.dumps(TINY_RECIPE), "--seed", "0", "--data-root", "data",
                  "--device", "cpu", "--threads", "1", "--out", "model.safetensors",
                  cwd=work, env=env)


def evaluate(work: Path, env: dict[str, str] | None = None) -> float:
    return dnnmod("evaluate-modules", "--modules", "modules.safetensors", "--model",
                  "model.safetensors", "--data-root", "data", "--device", "cpu",
                  "--out", "metrics.json", cwd=work, env=env)


JOBS = {
    "help": lambda work, env: dnnmod("--help", cwd=work, env=env),
    "train": train,
    "evaluate": evaluate,
    "table": lambda work, env: dnnmod("table", "modularization", "--metrics", "metrics.json",
                                      "--out", "e2.csv", "--figure", "e2.png", cwd=work,
                                      env=env),
    "e1 table": lambda work, env: dnnmod("table", "base-models", "--models",
                                         "model.safetensors", "--out", "e1.csv", cwd=work,
                                         env=env),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-src", help="another source tree to time against")
    parser.add_argument("--fork-server", action="store_true",
                        help="also time the jobs started by a fork server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        variants: dict[str, dict[str, str]] = {"this": {}}
        server = None
        if args.baseline_src:
            variants["baseline"] = {"PYTHONPATH": str(Path(args.baseline_src).resolve())}
        if args.fork_server:
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
            server = fork_server.start(Path(folder) / "fork_server.log")
            if server is None:
                sys.exit("could not start the fork server (see its log)")
            variants["fork server"] = {fork_server.SOCKET_ENV: server.socket}
        try:
            time_jobs(Path(folder), variants, args.runs)
        finally:
            fork_server.stop(server)


def time_jobs(folder: Path, variants: dict[str, dict[str, str]], runs: int) -> None:
    """Each job kind ``runs`` times in each variant, in turn; medians and ratios to "this"."""
    for name, env in variants.items():  # the fork server reads what its own tree wrote
        if name != "fork server":
            make_inputs(folder / name, env)
    places = {name: folder / ("this" if name == "fork server" else name) for name in variants}
    others = [name for name in variants if name != "this"]
    print(f"{'job':<10} " + " ".join(f"{name + ' (s)':>16}" for name in variants)
          + "".join(f"   {name}/this" for name in others))
    for job_name, job in JOBS.items():
        times = {name: [] for name in variants}
        for _ in range(runs):
            for name, env in variants.items():
                times[name].append(job(places[name], env))
        row = f"{job_name:<10} " + " ".join(f"{statistics.median(times[name]):>16.2f}"
                                            for name in variants)
        for name in others:
            ratios = [a / b for a, b in zip(times[name], times["this"], strict=True)]
            row += f"   {statistics.median(ratios):>{len(name) + 5}.2f}"
        print(row)


if __name__ == "__main__":
    main()

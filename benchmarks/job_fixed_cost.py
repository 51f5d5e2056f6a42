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
import path (``PYTHONPATH=DIR``, e.g. a ``git worktree`` of an earlier commit), in turn with
this one (A B A B ...), so the two are timed under the same machine load; each row gives the
median of both and their ratio.

    git worktree add /tmp/before <rev>
    python benchmarks/job_fixed_cost.py --baseline-src /tmp/before/src --runs 5
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

DNNMOD = [sys.executable, "-m", "dnnmod.cli"]
TINY_RECIPE = {"epochs": 1, "batch_size": 64, "lr": 0.05}


def dnnmod(*args: str, cwd: Path, src: str | None = None) -> float:
    """Run one dnnmod command in a fresh process; its wall time in seconds."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    started = time.perf_counter()
    subprocess.run([*DNNMOD, *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def make_inputs(work: Path, src: str | None) -> None:
    """Digits, a tiny trained simcnn, its GradSplitter modules and their metrics, written by
    the source tree that reads them (artifact formats change between commits)."""
    work.mkdir()
    dnnmod("data", "prepare", "--dataset", "digits", "--root", "data", cwd=work, src=src)
    dnnmod("data", "split", "--dataset", "digits", "--root", "data", "--seed", "0", cwd=work,
           src=src)
    train(work, src)
    dnnmod("modularize", "--approach", "gradsplitter", "--model", "model.safetensors",
           "--seed", "0", "--data-root", "data", "--device", "cpu", "--out",
           "modules.safetensors", "--hyperparameters", json.dumps(
               {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1, "head_epochs": 0,
                "max_train_samples": 128}), cwd=work, src=src)
    evaluate(work, src)


def train(work: Path, src: str | None = None) -> float:
    return dnnmod("train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
                  "--recipe", json.dumps(TINY_RECIPE), "--seed", "0", "--data-root", "data",
                  "--device", "cpu", "--threads", "1", "--out", "model.safetensors",
                  cwd=work, src=src)


def evaluate(work: Path, src: str | None = None) -> float:
    return dnnmod("evaluate-modules", "--modules", "modules.safetensors", "--model",
                  "model.safetensors", "--data-root", "data", "--device", "cpu",
                  "--out", "metrics.json", cwd=work, src=src)


JOBS = {
    "help": lambda work, src: dnnmod("--help", cwd=work, src=src),
    "train": train,
    "evaluate": evaluate,
    "table": lambda work, src: dnnmod("table", "modularization", "--metrics", "metrics.json",
                                      "--out", "e2.csv", "--figure", "e2.png", cwd=work,
                                      src=src),
    "e1 table": lambda work, src: dnnmod("table", "base-models", "--models",
                                         "model.safetensors", "--out", "e1.csv", cwd=work,
                                         src=src),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-src", help="another source tree to time against")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        sources = {"this": None}
        if args.baseline_src:
            sources["baseline"] = str(Path(args.baseline_src).resolve())
        for source, src in sources.items():
            make_inputs(Path(folder) / source, src)
        print(f"{'job':<10} " + " ".join(f"{name + ' (s)':>14}" for name in sources)
              + ("   this/baseline" if args.baseline_src else ""))
        for name, job in JOBS.items():
            times = {source: [] for source in sources}
            for _ in range(args.runs):
                for source, src in sources.items():
                    times[source].append(job(Path(folder) / source, src))
            medians = {source: statistics.median(values) for source, values in times.items()}
            row = f"{name:<10} " + " ".join(f"{medians[s]:>14.2f}" for s in sources)
            if args.baseline_src:
                ratios = [a / b for a, b in zip(times["this"], times["baseline"], strict=True)]
                row += f"   {statistics.median(ratios):.2f}"
            print(row)


if __name__ == "__main__":
    main()

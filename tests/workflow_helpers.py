"""Running the real workflow from tests: a fresh project copy, a tiny study, Snakemake."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "study": "tiny",
    "seeds": [0],
    "device": "cpu",
    "datasets": {"digits": {}},
    "models": {"simcnn": {"arch": "simcnn", "width": 0.0625}},
    # Two epochs with augmentation: the reproducibility test needs the data order and the
    # augmentation of a later epoch to depend on the seed alone.
    "recipes": {"tiny": {"epochs": 2, "batch_size": 64, "lr": 0.05,
                         "augmentation": ["crop", "flip"]}},
    "base_models": [{"dataset": "digits", "models": ["simcnn"], "recipe": "tiny"}],
    "approaches": {"gradsplitter": {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1,
                                    "head_epochs": 0, "max_train_samples": 128}},
    "modularize": [{"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"]},
                   {"approach": "random_gradsplitter", "dataset": "digits",
                    "models": ["simcnn"]}],
    "threads": {"train": 1},
}


def _environment() -> dict[str, str]:
    """Jobs call ``dnnmod`` and ``snakemake`` from the test interpreter's environment."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake run in this process, in ``project``: the workflow's parse imports torch and
    the library (~4 s per process), which this process has already paid for. Jobs still run
    as their own processes. Use :func:`snakemake_process` where a separate Snakemake process
    is the point (signals, a clean environment)."""
    from snakemake.cli import main

    output = io.StringIO()
    saved_directory, saved_environment = os.getcwd(), dict(os.environ)
    os.environ.update(_environment())
    os.chdir(project)
    try:
        # Snakemake reports errors on stdout or stderr depending on where they arise: read both.
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                main(list(args))
                returncode = 0
            except SystemExit as stop:
                returncode = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(saved_directory)
        os.environ.clear()
        os.environ.update(saved_environment)
    return subprocess.CompletedProcess(["snakemake", *args], returncode, output.getvalue())


def snakemake_process(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake as its own process, as a user runs it."""
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=project, env=_environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def make_project(root: Path) -> Path:
    """A fresh copy of the workflow at ``root``, as a user's clone would hold it."""
    root.mkdir(parents=True)
    for file in ("Snakefile", "environment.yml"):
        shutil.copy(REPO / file, root)
    for folder in ("workflow", "config"):
        shutil.copytree(REPO / folder, root / folder)
    return root


def copy_project(source: Path, destination: Path) -> Path:
    """A copy of a project and everything it has computed (data, results, Snakemake's
    records), timestamps kept, so Snakemake finds the copied outputs up to date."""
    shutil.copytree(source, destination, symlinks=True, copy_function=shutil.copy2,
                    ignore=shutil.ignore_patterns("locks", "incomplete"))
    return destination


def write_config(project: Path, config: dict, name: str = "tiny.yaml") -> str:
    (project / "config" / name).write_text(yaml.safe_dump(config))
    return f"config/{name}"

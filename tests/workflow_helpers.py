"""Running the real workflow from tests: a fresh project copy, a tiny study, Snakemake."""

from __future__ import annotations

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
    "recipes": {"tiny": {"epochs": 1, "batch_size": 128, "lr": 0.05}},
    "base_models": [{"dataset": "digits", "models": ["simcnn"], "recipe": "tiny"}],
    "approaches": {"gradsplitter": {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1,
                                    "head_epochs": 0, "max_train_samples": 128},
                   "random": {"match": "gradsplitter"}},
    "modularize": [{"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"]},
                   {"approach": "random", "dataset": "digits", "models": ["simcnn"]}],
    "threads": {"train": 1},
}


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # Snakemake reports errors on stdout or stderr depending on where they arise: read both.
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=project, env=env,
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


def write_config(project: Path, config: dict, name: str = "tiny.yaml") -> str:
    (project / "config" / name).write_text(yaml.safe_dump(config))
    return f"config/{name}"

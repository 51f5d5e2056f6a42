"""Lint and format checks, run with the tests so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [
    ["ruff", "check", "src", "tests", "benchmarks"],
    ["snakefmt", "--check", "Snakefile", "workflow/rules"],
    ["snakemake", "--lint", "--configfile", "config/demo.yaml"],
])
def test_clean(command):
    run = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    if command[0] == "snakemake":
        assert "Lints for" not in run.stdout, run.stdout[-3000:]

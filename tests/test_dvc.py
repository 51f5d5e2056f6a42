"""DVC round trip: run a tiny study, push to a local remote, pull into a fresh clone and
regenerate the tables and the report there without retraining anything; metrics and plots
shown, and diffed between two commits."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from workflow_helpers import BIN, REPO, TINY, copy_project, snakemake, write_config

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def sh(cwd: Path, *command: str) -> str:
    env = {**os.environ, **GIT_IDENTITY, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(command)}:\n{run.stdout[-3000:]}"
    return run.stdout


@pytest.mark.slow
def test_push_pull_and_regenerate_without_retraining(tiny_study, tmp_path):
    # The session's finished TINY run: `dvc repro` hands it to Snakemake, which finds it up to
    # date, and DVC records its outputs.
    origin = copy_project(tiny_study, tmp_path / "origin")
    for file in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / file, origin)
    shutil.copytree(REPO / "src", origin / "src",  # the DVC stage depends on the library
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    configfile = write_config(origin, TINY)
    dvc_yaml = (origin / "dvc.yaml").read_text()
    (origin / "dvc.yaml").write_text(dvc_yaml.replace("study: paper", "study: tiny").replace(
        "configfile: config/config.yaml", f"configfile: {configfile}"))
    sh(origin, "git", "init", "-q")
    sh(origin, "dvc", "init", "-q")
    sh(origin, "dvc", "remote", "add", "-d", "local", str(tmp_path / "storage"))
    sh(origin, "dvc", "repro")
    sh(origin, "git", "add", "-A")
    sh(origin, "git", "commit", "-qm", "tiny study")
    sh(origin, "dvc", "push")
    # A second commit changing only the E8 constants: only the cost table and report rerun,
    # and `dvc metrics diff` shows the CO2e that changed between the two commits.
    write_config(origin, {**TINY, "energy": {"grid_gco2e_per_kwh": 100.0}})
    sh(origin, "dvc", "repro")
    sh(origin, "git", "commit", "-qam", "cleaner grid")
    diff = sh(origin, "dvc", "metrics", "diff", "HEAD~1", "HEAD")
    assert "results/tiny/metrics/e8_cost.json" in diff and "scenario/reuse.co2e_g" in diff
    assert "e1_base_models.json" not in diff  # nothing else changed
    sh(origin, "dvc", "push")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    sh(clone, "dvc", "pull")
    # Pulled files carry new timestamps in no particular order: mark them up to date.
    sh(clone, str(BIN / "snakemake"), "--touch", "--cores", "1", "--configfile", configfile)
    assert "Nothing to be done" in snakemake(clone, "-n", "--configfile", configfile).stdout

    run = snakemake(clone, "--cores", "2", "--configfile", configfile, "--forcerun",
                    "table_base_models", "table_modularization")
    assert run.returncode == 0, run.stdout[-3000:]
    ran = {line.split()[1].rstrip(":") for line in run.stdout.splitlines()
           if line.startswith(("rule ", "localrule "))}
    assert ran <= {"table_base_models", "table_modularization", "table_cost", "study_report",
                   "all"}, ran
    for table in ("e1_base_models.csv", "e2_modularization.csv"):
        produced = (clone / "results/tiny/tables" / table).read_text()
        assert produced == (origin / "results/tiny/tables" / table).read_text()
    assert "tiny" in sh(clone, "dvc", "metrics", "show")
    assert "dvc_plots/index.html" in sh(clone, "dvc", "plots", "show")

    # `make report`'s command on the pulled results: only the cost table and the report run.
    (clone / "results/tiny/report.html").unlink()
    report = snakemake(clone, "--cores", "1", "--configfile", configfile, "--allowed-rules",
                       "table_cost", "study_report", "--forcerun", "table_cost",
                       "study_report", "--", "results/tiny/report.html")
    assert report.returncode == 0, report.stdout[-3000:]
    ran = {line.split()[1].rstrip(":") for line in report.stdout.splitlines()
           if line.startswith(("rule ", "localrule "))}
    assert ran == {"table_cost", "study_report"}, ran
    assert "e2_accuracy_vs_krr" in (clone / "results/tiny/report.html").read_text()

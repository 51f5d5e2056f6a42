"""Reproducibility and fault tolerance of the real workflow: same seed → same results,
kill -9 at any point → a rerun completes, resuming long steps from their checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from workflow_helpers import BIN, TINY, make_project, snakemake, write_config

from dnnmod.fork_server import USAGE
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.training.model_io import load_model

MODEL = "results/tiny/models/digits/simcnn/st/seed{seed}/model.json"
MODULES = "results/tiny/modules/digits/simcnn/gradsplitter/seed{seed}"


def run_study(project: Path, config: dict, *targets: str) -> None:
    configfile = write_config(project, config)
    run = snakemake(project, *targets, "--cores", "2", "--rerun-incomplete", "--configfile",
                    configfile)
    assert run.returncode == 0, run.stdout[-3000:]


def results_of(project: Path, seed: int) -> dict:
    model = json.loads((project / MODEL.format(seed=seed)).read_text())
    modules = json.loads((project / MODULES.format(seed=seed) / "metrics.json").read_text())
    return {"weights": model["weights_sha256"], "metrics": model["metrics"],
            "history": [r["val_accuracy"] for r in model["history"]],
            "modules": {k: modules[k] for k in ("composed_accuracy", "krr", "overlap",
                                                "module_size", "modules")}}


@pytest.mark.slow
def test_same_seed_gives_identical_results_and_another_seed_does_not(tiny_study, tmp_path):
    # TINY trains two epochs with augmentation; the session's run of it is the first run,
    # its jobs started by the fork server (dnnmod.fork_server). The second is a fresh project,
    # data preparation and splits included, each job its own process, run as far as the
    # compared results for seeds 0 and 1 at once (one Snakemake run: the two seeds' chains of
    # jobs share the 2 cores).
    second = make_project(tmp_path / "b")
    run_study(second, {**TINY, "seeds": [0, 1], "fork_server": False},
              f"{MODULES.format(seed=0)}/metrics.json", f"{MODULES.format(seed=1)}/metrics.json")
    train_log = "results/tiny/logs/train/digits/simcnn/st/seed0.log"
    assert USAGE.search((tiny_study / train_log).read_text())
    assert not USAGE.search((second / train_log).read_text())
    assert results_of(tiny_study, 0) == results_of(second, 0)
    assert results_of(tiny_study, 0)["weights"] != results_of(second, 1)["weights"]
    assert (second / MODEL.format(seed=1)).is_file()  # the seed is part of every path


def start_and_kill_when(project: Path, configfile: str, appears: str, timeout: float = 300):
    """Start the workflow, SIGKILL its whole process group once ``appears`` exists."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "2", "--rerun-incomplete", "--configfile",
         configfile], cwd=project, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (project / appears).exists():
            assert process.poll() is None, f"workflow ended before {appears} appeared"
            assert time.monotonic() < deadline, f"{appears} did not appear"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # A killed Snakemake leaves its lock behind; unlocking is the documented first step.
    assert snakemake(project, "--unlock", "--configfile", configfile).returncode == 0


@pytest.mark.slow
def test_killed_runs_resume_training_and_module_search(tmp_path):
    project = make_project(tmp_path / "project")
    config = {**TINY,
              # The first kill comes when the first epoch's checkpoint appears; the 7 epochs
              # after it (about 5 s) leave the 50 ms poll ample time to kill mid-training.
              "recipes": {"tiny": {"epochs": 8, "batch_size": 64, "lr": 0.05}},
              "approaches": {"gradsplitter": {"init_head_epochs": 1, "rounds": 4,
                                              "mask_epochs": 1, "head_epochs": 1,
                                              "max_train_samples": 256}}}
    configfile = write_config(project, config)
    resume = "results/tiny/resume"
    start_and_kill_when(project, configfile, f"{resume}/models/digits/simcnn/st/seed0.pt")
    start_and_kill_when(project, configfile,
                        f"{resume}/modules/digits/simcnn/gradsplitter/seed0.pt")
    run_study(project, config)

    logs = project / "results/tiny/logs"
    assert "train: resuming from" in (logs / "train/digits/simcnn/st/seed0.log").read_text()
    assert "gradsplitter: resuming from" in (
        logs / "modularize/digits/simcnn/gradsplitter/seed0.log").read_text()
    meta = json.loads((project / MODEL.format(seed=0)).read_text())
    assert [r["epoch"] for r in meta["history"]] == list(range(1, 9))
    # Nothing half-written survives, and every artifact verifies on load.
    assert not [p for p in (project / "results").rglob("*.tmp")]
    assert not [p for p in (project / "data").rglob("*.tmp")]
    model, meta = load_model(project / MODEL.format(seed=0).replace(".json", ".safetensors"))
    modules = ModuleSet.load(project / MODULES.format(seed=0) / "modules.safetensors", base=meta)
    assert len(modules.provenance["history"]) == 1 + 4 * 2


def _claims(log_file: Path) -> tuple[str, float, float]:
    """(slot, held from, held until) of a job, from its log's claim line and last line."""
    lines = [line for line in log_file.read_text().splitlines() if line[:4].isdigit()]

    def stamp(line: str) -> float:
        return (time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
                + int(line[20:23]) / 1000)

    claim = next(line for line in lines if "claimed GPU slot" in line)
    return claim.split("claimed GPU slot ")[1].split()[0], stamp(claim), stamp(lines[-1])


@pytest.mark.slow
def test_concurrent_gpu_jobs_get_distinct_devices(tmp_path, monkeypatch):
    # Simulated pool of two GPUs: snakemake --resources gpu=2 with four GPU jobs.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("DNNMOD_SIMULATE_GPUS", "1")
    monkeypatch.setenv("DNNMOD_GPU_POOL", str(tmp_path / "pool"))
    project = make_project(tmp_path / "project")
    models = {name: {"arch": arch, "width": 0.0625} for name, arch in
              (("simcnn", "simcnn"), ("vgg16", "vgg16"), ("simple", "simple_simcnn"),
               ("lenet5", "lenet5"))}
    config = {**TINY, "device": "auto", "models": models, "modularize": [],
              "recipes": {"tiny": {"epochs": 6, "batch_size": 64, "lr": 0.05}},
              "base_models": [{"dataset": "digits", "models": list(models), "recipe": "tiny"}]}
    configfile = write_config(project, config)
    run = snakemake(project, "--cores", "4", "--resources", "gpu=2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    jobs = [_claims(project / f"results/tiny/logs/train/digits/{name}/st/seed0.log")
            for name in models]
    assert {slot for slot, _, _ in jobs} <= {"0", "1"}
    overlapping = [(a, b) for i, a in enumerate(jobs) for b in jobs[i + 1:]
                   if a[1] < b[2] and b[1] < a[2]]
    assert overlapping, "the two GPU slots were never busy at the same time"
    assert all(a[0] != b[0] for a, b in overlapping), jobs

"""The Snakemake workflow for real: a tiny study end to end, config validation, dry runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from workflow_helpers import REPO, TINY, make_project, snakemake, write_config

from dnnmod.fork_server import USAGE


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project")


@pytest.mark.slow
def test_tiny_study_runs_end_to_end(tiny_study):
    project = tiny_study
    model_dir = project / "results/tiny/models/digits/simcnn/st/seed0"
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["arch"] == "simcnn" and meta["seed"] == 0 and len(meta["history"]) == 2
    assert (model_dir / "model.safetensors").stat().st_size > 0
    assert (project / "data/digits/splits/seed0.safetensors").is_file()
    table = (project / "results/tiny/tables/e1_base_models.csv").read_text().splitlines()
    assert table[0].startswith("training,model,arch,dataset") and len(table) == 2
    metrics = json.loads((project / "results/tiny/metrics/e1_base_models.json").read_text())
    assert set(metrics) == {"digits/simcnn/st/seed0"}
    for kind in ("logs", "benchmarks"):
        assert (project / f"results/tiny/{kind}/train/digits/simcnn/st").is_dir()
    assert not (project / "results/tiny/resume/models/digits/simcnn/st/seed0.pt").exists()

    modules = project / "results/tiny/modules/digits/simcnn/gradsplitter/seed0"
    assert json.loads((modules / "modules.json").read_text())["approach"] == "gradsplitter"
    module_metrics = json.loads((modules / "metrics.json").read_text())
    assert 0 < module_metrics["krr"] <= 1 and len(module_metrics["modules"]) == 10
    e2 = (project / "results/tiny/tables/e2_modularization.csv").read_text().splitlines()
    assert e2[0].startswith("approach,training,model,arch,dataset,seed") and len(e2) == 3
    random = modules.parent.parent / "random_gradsplitter/seed0"
    assert json.loads((random / "modules.json").read_text())["provenance"]["matched"] == {
        "approach": "gradsplitter", "base_weights_sha256": meta["weights_sha256"]}
    # The control keeps exactly as many kernels as the modules it matches.
    assert json.loads((random / "metrics.json").read_text())["krr"] == module_metrics["krr"]
    for suffix in ("png", "pdf"):
        assert (project / f"results/tiny/figures/e2_accuracy_vs_krr.{suffix}").stat().st_size
    # Only GradSplitter and its control: no pair of approaches a paper orders
    orderings = (project / "results/tiny/tables/e2_orderings.csv").read_text().splitlines()
    assert orderings[0].startswith("model,dataset,claim") and len(orderings) == 1

    # Its jobs were started by the fork server, which the run stopped at its end.
    server_log = (project / "results/tiny/logs/fork_server.log").read_text()
    socket_path = re.search(r"serving at (\S+) ", server_log).group(1)
    assert not Path(socket_path).parent.exists()
    for log in (project / "results/tiny/logs").rglob("*.log"):
        if log.name != "fork_server.log":
            assert USAGE.search(log.read_text()), log

    again = snakemake(project, "--cores", "2", "--configfile", "config/tiny.yaml")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout


def test_config_that_breaks_the_schema_fails_before_any_job(project):
    configfile = write_config(project, {**TINY, "seeds": "zero"})
    run = snakemake(project, "-n", "--configfile", configfile)
    assert run.returncode != 0
    assert "seeds" in run.stdout and "is not of type 'array'" in run.stdout
    assert not (project / "results").exists()


def test_a_study_config_replaces_the_paper_config(project):
    # Without "threads", the schema default (2) applies, not config/config.yaml's 4.
    configfile = write_config(project, {k: v for k, v in TINY.items() if k != "threads"})
    run = snakemake(project, "-n", "--cores", "8", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    train_job = run.stdout[run.stdout.index("rule train_base_model"):]
    assert "threads: 2" in train_job.split("\n\n")[0]


@pytest.mark.parametrize("change, message", [
    ({"datasets": {"imagenet": {}}}, "datasets.imagenet: unknown dataset 'imagenet'"),
    ({"models": {"simcnn": {"arch": "alexnet"}}}, "models.simcnn.arch: unknown model 'alexnet'"),
    ({"base_models": [{"dataset": "digits", "models": ["vgg"], "recipe": "tiny"}]},
     "base_models[0].models: 'vgg' is not defined under models"),
    ({"modularize": [{"approach": "netsplitter", "dataset": "digits", "models": ["simcnn"]}]},
     "modularize[0].approach: unknown approach 'netsplitter'"),
    ({"approaches": {"gradsplitter": {"alfa": 0.2}}},
     "approaches.gradsplitter: unknown keys ['alfa']"),
    ({"approaches": {"gradsplitter": {"rounds": "three"}}},
     "approaches.gradsplitter.rounds: expected int, got 'three'"),
    ({"approaches": {"gradsplitter": {"mask_epochs": -1}}},
     "approaches.gradsplitter.mask_epochs: -1 is out of range"),
    ({"models": {"simcnn": {"arch": "simcnn", "options": {"batchnorm": False}}}},
     "models.simcnn.options: simcnn has no option 'batchnorm'"),
    ({"modularize": [{"approach": "random_gradsplitter", "dataset": "digits",
                      "models": ["simcnn"]}]},
     "approaches.random_gradsplitter: reads the gradsplitter modules of simcnn on digits"),
    ({"modularize": [{"approach": "gradsplitter", "dataset": "digits", "models": ["vgg16"]}]},
     "modularize[0]: vgg16 on digits is not a base model"),
    ({"recipes": {"tiny": {"epochs": 1, "batch_size": 8, "lr": 0.1, "schedule": "cosine",
                           "augmentation": ["crop"], "selection": "best"}}},
     "selection"),
])
def test_unresolvable_names_are_reported_with_their_key(project, change, message):
    configfile = write_config(project, {**TINY, **change})
    run = snakemake(project, "-n", "--configfile", configfile)
    assert run.returncode != 0
    assert message in run.stdout


@pytest.mark.parametrize("configfile", ["config/demo.yaml", "config/demo_long.yaml",
                                        "config/medium.yaml", "config/fidelity.yaml",
                                        "config/config.yaml"])
def test_every_shipped_config_builds_its_dag(configfile):
    run = snakemake(REPO, "-n", "--configfile", configfile, "--directory", str(REPO))
    assert run.returncode == 0, run.stdout[-3000:]


def test_slurm_profile_dry_run(project):
    run = snakemake(project, "-n", "--profile", "workflow/profiles/slurm")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "train_base_model" in run.stdout

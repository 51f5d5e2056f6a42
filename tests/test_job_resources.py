"""What each job asks a cluster for: defaults, the config's overrides and their precedence."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from workflow_helpers import TINY, make_project, snakemake, write_config

from dnnmod.errors import ConfigError
from dnnmod.job_resources import (
    GPU_RULES,
    check_resources_config,
    gpu_job,
    gpu_rule_resources,
    light_rule_resources,
)

CONFIG = {"threads": {"train": 4}, "models": {"vgg16": {}, "resnet20": {}},
          "approaches": {"cnnsplitter": {}}}


def job(config, rule, **wildcards):
    return gpu_job(config, rule, SimpleNamespace(**wildcards))


def test_every_gpu_rule_has_paper_scale_defaults():
    assert job(CONFIG, "train_base_model", model="vgg16") == {
        "runtime": 720, "mem_mb": 16000, "cpus": 4}
    assert job(CONFIG, "evaluate_modules", model="vgg16", approach="mwt") == {
        "runtime": 60, "mem_mb": 8000, "cpus": 4}
    # CNNSplitter's search (12-28 h per model on one GPU) gets 36 h, its evaluation does not.
    assert job(CONFIG, "modularize", model="vgg16", approach="cnnsplitter")["runtime"] == 2160
    assert job(CONFIG, "evaluate_modules", model="vgg16", approach="cnnsplitter")["runtime"] == 60
    assert job(CONFIG, "compose_new_tasks", approach="mwt")["runtime"] == 120
    assert job(CONFIG, "reuse_replace", stronger="vgg16", approach="pan_rajan")["runtime"] == 120


def test_the_most_specific_entry_wins_key_by_key():
    config = {**CONFIG, "resources": {
        "gpu_jobs": {"runtime": 30, "mem_mb": 2000},
        "rules": {"modularize": {"runtime": 600}},
        "models": {"vgg16": {"modularize": {"runtime": 900, "mem_mb": 24000}}},
        "approaches": {"cnnsplitter": {"modularize": {"runtime": 3000, "cpus": 8}}}}}
    assert job(config, "train_base_model", model="resnet20") == {
        "runtime": 30, "mem_mb": 2000, "cpus": 4}  # gpu_jobs over the defaults
    assert job(config, "modularize", model="resnet20", approach="mwt")["runtime"] == 600
    assert job(config, "modularize", model="vgg16", approach="mwt") == {
        "runtime": 900, "mem_mb": 24000, "cpus": 4}
    assert job(config, "modularize", model="vgg16", approach="cnnsplitter") == {
        "runtime": 3000, "mem_mb": 24000, "cpus": 8}
    # A small study's gpu_jobs line also caps CNNSplitter's built-in 36 h.
    assert job(config, "modularize_sensitivity", model="resnet20",
               approach="cnnsplitter")["runtime"] == 30
    resources = gpu_rule_resources(config, "modularize")
    wildcards = SimpleNamespace(model="vgg16", approach="mwt")
    assert resources["gpu"] == 1 and resources["runtime"](wildcards) == 900


@pytest.mark.parametrize("resources, message", [
    ({"rules": {"table_cost": {"runtime": 5}}},
     "resources.rules.table_cost: 'table_cost' is not a GPU rule; GPU rules: "
     "cnnsplitter_layer_sensitivity, compose_new_tasks"),
    ({"models": {"alexnet": {"modularize": {"runtime": 5}}}},
     "resources.models.alexnet: no model 'alexnet' under models"),
    ({"approaches": {"cnnsplitter": {"train_base_model": {"runtime": 5}}}},
     "resources.approaches.cnnsplitter.train_base_model: the jobs of train_base_model are not "
     "chosen by approach"),
    ({"models": {"vgg16": {"compose_new_tasks": {"runtime": 5}}}},
     "resources.models.vgg16.compose_new_tasks: the jobs of compose_new_tasks are not chosen "
     "by model"),
])
def test_a_name_resources_cannot_apply_to_is_one_clear_error(resources, message):
    with pytest.raises(ConfigError) as raised:
        check_resources_config({**CONFIG, "resources": resources})
    assert str(raised.value).startswith(message)


def test_light_jobs_run_locally_unless_a_partition_is_named():
    assert light_rule_resources(CONFIG) == {}
    config = {**CONFIG, "resources": {"light": {"partition": "cpu", "runtime": 10}}}
    assert light_rule_resources(config) == {"slurm_partition": "cpu", "runtime": 10,
                                            "mem_mb": 4000}


def test_the_workflow_gives_every_gpu_rule_its_resources():
    # Each rule that requests a GPU asks dnnmod.job_resources for its values by its own name.
    rules = Path(__file__).resolve().parents[1] / "workflow" / "rules"
    named = {name for path in rules.glob("*.smk")
             for name in re.findall(r'gpu_rule_resources\(config, "(\w+)"\)', path.read_text())}
    assert named == set(GPU_RULES)


def test_a_dry_run_shows_each_job_its_resources(tmp_path):
    project = make_project(tmp_path / "project")
    configfile = write_config(project, {**TINY, "resources": {
        "gpu_jobs": {"runtime": 30, "mem_mb": 2000},
        "approaches": {"gradsplitter": {"modularize": {"runtime": 90, "cpus": 2}}},
        "light": {"partition": "cpu"}}})
    run = snakemake(project, "-n", "--cores", "4", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    # One block per job, each opened by its time stamp line; a job by its rule and wildcards.
    blocks = {(rule.group(1), re.search(r"wildcards: (.*)", block).group(1)): block
              for block in re.split(r"\n(?=\[\w{3} )", run.stdout)
              if (rule := re.search(r"^(?:local)?rule (\w+):$", block, flags=re.MULTILINE))
              and "wildcards:" in block}

    def resources(rule, wildcard=""):
        block = next(text for (name, wildcards), text in blocks.items()
                     if name == rule and wildcard in wildcards)
        return dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block)[1]))

    def priority(rule, wildcard=""):
        block = next(text for (name, wildcards), text in blocks.items()
                     if name == rule and wildcard in wildcards)
        found = re.search(r"priority: (\d+)", block)  # Snakemake shows none for 0
        return int(found[1]) if found else 0

    # Longest first among ready jobs: data, then trainings, then searches, then the rest.
    assert (priority("prepare_dataset") == priority("split_dataset") > priority("train_base_model")
            > priority("modularize", "approach=gradsplitter")
            > priority("evaluate_modules") == 0)

    assert resources("train_base_model")["runtime"] == "30"
    assert resources("train_base_model")["gpu"] == "1"
    assert "slurm_partition" not in resources("train_base_model")
    assert resources("modularize", "approach=random")["runtime"] == "30"
    assert resources("modularize", "approach=gradsplitter")["runtime"] == "90"
    assert resources("prepare_dataset")["slurm_partition"] == "cpu"
    assert resources("prepare_dataset")["runtime"] == "30"

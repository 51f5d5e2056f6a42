"""What each job of the workflow asks a cluster scheduler for, from the study config.

A GPU rule's job asks for one GPU, a wall time (``runtime``, minutes), memory (``mem_mb``) and
CPUs (``cpus``: the job's threads, so torch's thread count and SLURM's ``--cpus-per-task``).
Each value comes from the most specific entry of the config's ``resources`` that sets it::

    resources.approaches.<approach>.<rule>   the rule's jobs that run this approach
    resources.models.<model>.<rule>          the rule's jobs on this model
    resources.rules.<rule>                   every job of the rule
    resources.gpu_jobs                       every GPU job (a small study's one line)
    APPROACH_DEFAULTS, GPU_RULES[rule]       below (paper scale); cpus: threads.train

Light rules (data preparation, tables, figures, the report) use no GPU and take seconds to
minutes: they run on the host that runs Snakemake (on SLURM, the submitting host, which usually
also has the internet access a download needs), or as jobs on ``resources.light.partition``
when the config names one, with one CPU. Local runs ignore wall times and memory unless
Snakemake is given limits for them (``--resources mem_mb=...``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from dnnmod.errors import ConfigError


class RuleDefaults(NamedTuple):
    runtime: int  # minutes
    mem_mb: int
    approach: bool  # each job runs one approach (the rule's {approach} wildcard)
    model: str | None  # the wildcard that names each job's model, if any


# Paper scale on one GPU: trainings (200 epochs) and module searches take hours, evaluations
# and reuse experiments read finished models and modules.
GPU_RULES = {
    "train_base_model": RuleDefaults(720, 16000, False, "model"),
    "train_weak_model": RuleDefaults(720, 16000, False, "model"),
    "train_new_task_scratch": RuleDefaults(720, 16000, False, "model"),
    "train_sensitivity_model": RuleDefaults(720, 16000, False, "model"),
    "modularize": RuleDefaults(720, 16000, True, "model"),
    "modularize_sensitivity": RuleDefaults(720, 16000, True, "model"),
    # CNNSplitter's layer sensitivity sweep: 9 ratios x conv layers x classes forward passes
    # of the validation images (SimCNN on CIFAR-10: 1,170 passes of 10,000 images)
    "cnnsplitter_layer_sensitivity": RuleDefaults(240, 8000, False, "model"),
    "evaluate_modules": RuleDefaults(60, 8000, True, "model"),
    "evaluate_decomposition": RuleDefaults(60, 8000, True, "model"),
    "patch_weak_models": RuleDefaults(120, 8000, True, "model"),
    "reuse_subtasks": RuleDefaults(240, 8000, True, "model"),
    "reuse_replace": RuleDefaults(120, 8000, True, "stronger"),
    "compose_new_tasks": RuleDefaults(120, 8000, True, None),
}
# CNNSplitter's genetic search is estimated at 12-28 h per model on one GPU at paper scale: 36 h
# covers the slowest with a margin, and fits the 48 h limit common on GPU partitions.
APPROACH_DEFAULTS = {"cnnsplitter": {"modularize": {"runtime": 2160},
                                     "modularize_sensitivity": {"runtime": 2160}}}
# Light jobs are single-threaded.
LIGHT_DEFAULTS = {"partition": None, "runtime": 30, "mem_mb": 4000}


def check_resources_config(config: Mapping[str, Any]) -> None:
    """Every rule, approach and model that ``resources`` names exists and can be selected."""
    resources = config.get("resources", {})
    for rule in resources.get("rules", {}):
        _check_rule(f"resources.rules.{rule}", rule, None)
    for kind, known in (("approaches", config.get("approaches", {})),
                        ("models", config.get("models", {}))):
        for name, per_rule in resources.get(kind, {}).items():
            if kind == "models" and name not in known:
                raise ConfigError(f"resources.models.{name}: no model {name!r} under models; "
                                  f"known: {', '.join(sorted(known))}")
            for rule in per_rule:
                _check_rule(f"resources.{kind}.{name}.{rule}", rule, kind)


def _check_rule(where: str, rule: str, selector: str | None) -> None:
    if rule not in GPU_RULES:
        raise ConfigError(f"{where}: {rule!r} is not a GPU rule; GPU rules: "
                          f"{', '.join(sorted(GPU_RULES))} (light rules: resources.light)")
    defaults = GPU_RULES[rule]
    if (selector == "approaches" and not defaults.approach
            or selector == "models" and defaults.model is None):
        raise ConfigError(f"{where}: the jobs of {rule} are not chosen by "
                          f"{selector[:-2] if selector == 'approaches' else 'model'}")


def gpu_job(config: Mapping[str, Any], rule: str, wildcards) -> dict[str, int]:
    """runtime, mem_mb and cpus of one job of GPU rule ``rule``."""
    defaults = GPU_RULES[rule]
    resources = config.get("resources", {})
    model = getattr(wildcards, defaults.model) if defaults.model is not None else None
    approach = wildcards.approach if defaults.approach else None
    values: dict[str, int] = {"runtime": defaults.runtime, "mem_mb": defaults.mem_mb,
                              "cpus": config["threads"]["train"]}
    for entry in (APPROACH_DEFAULTS.get(approach, {}).get(rule, {}),
                  resources.get("gpu_jobs", {}),
                  resources.get("rules", {}).get(rule, {}),
                  resources.get("models", {}).get(model, {}).get(rule, {}),
                  resources.get("approaches", {}).get(approach, {}).get(rule, {})):
        values.update(entry)
    return values


def gpu_rule_resources(config: Mapping[str, Any], rule: str) -> dict[str, Any]:
    """A GPU rule's ``resources:``, each value a function of the job's wildcards."""

    def value(key: str) -> Callable:
        return lambda wildcards: gpu_job(config, rule, wildcards)[key]

    return {"gpu": 1, "runtime": value("runtime"), "mem_mb": value("mem_mb")}


def gpu_rule_threads(config: Mapping[str, Any], rule: str) -> Callable:
    """A GPU rule's ``threads:``: the CPUs of each job."""
    return lambda wildcards: gpu_job(config, rule, wildcards)["cpus"]


def light_jobs(config: Mapping[str, Any]) -> dict[str, Any]:
    """partition (None: run where Snakemake runs), runtime and mem_mb of light jobs."""
    return {**LIGHT_DEFAULTS, **config.get("resources", {}).get("light", {})}


def light_rule_resources(config: Mapping[str, Any]) -> dict[str, Any]:
    """A light rule's ``resources:`` when light jobs go to a partition (nothing otherwise)."""
    light = light_jobs(config)
    if light["partition"] is None:
        return {}
    return {"slurm_partition": light["partition"], "runtime": light["runtime"],
            "mem_mb": light["mem_mb"]}

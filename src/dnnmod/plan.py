"""``dnnmod plan``: what a study costs before it is launched.

The jobs are the workflow's own: Snakemake builds the study's DAG in this process (every job,
as ``--forceall`` would run it), with each job's rule, wildcards, parameters, threads and
dependencies. Each job's time on a device is

    fixed cost of its kind of job + max(steps x cost of a step, FLOPs / FLOP rate)

summed over its phases. FLOPs come from the model's analytic forward count
(:func:`dnnmod.modules.extract.count_flops`) times the images, passes and epochs the rule's
work takes (:data:`RULE_WORK`); a backward pass counts two forward passes. Rates, step costs
and fixed costs are per device class in ``reference/device_rates.csv`` (each with its source;
a local run's jobs, started by the fork server of dnnmod.fork_server, pay ``forked_job_s``, a
cluster's (``--cluster``) the whole ``job_s``);
``--calibrate`` measures this machine's CPU row in under a minute. A modular training kind
(MwT, MODA) multiplies a step's cost by ``step_launches.<kind>``, its step's kernels over
standard training's (counted on the CPU: benchmarks/training_step_dispatch.py), and its FLOPs'
time by ``train_slowdown.<kind>``; CNNSplitter's fitness runs kept-channel sub-networks, on a
GPU as grouped convolutions (:data:`GROUPED_PASS_OVERHEAD`). The wall time on N devices
is a list schedule of the DAG: a job starts when its inputs are done and a device (for a CPU
study, ``threads`` of the N cores) is free, longest remaining path first.

What is not modelled: data downloads (network), early stopping (trainings count all epochs),
CNNSplitter's composition scoring (no FLOPs; it grows with the survivors, not the images), and
the module extraction of the evaluation jobs (counted in their fixed cost).
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dnnmod.controls import control_of
from dnnmod.errors import ConfigError, DnnmodError

RATES_FILE = "device_rates.csv"
#: Quantities a device row gives, by what they measure.
QUANTITIES = ("job_s.gpu_rule", "job_s.data_rule", "job_s.report_rule",
              "forked_job_s.gpu_rule", "forked_job_s.data_rule", "forked_job_s.report_rule",
              "flops_per_s.train",
              "flops_per_s.masked", "flops_per_s.inference", "step_s.train", "step_s.masked",
              "train_slowdown.mwt", "train_slowdown.moda", "step_launches.mwt",
              "step_launches.moda")
#: FLOPs of CNNSplitter's grouped kept-channel pass (its device path) over the kept-channel
#: sub-networks': kept channels padded to shared widths, 1.009-1.016x counted on the paper's
#: models (benchmarks/cnnsplitter_generation.py --counts, docs/results/cnnsplitter_device_path.md)
GROUPED_PASS_OVERHEAD = 1.02
#: More threads than any job asks for.
MAX_THREADS = 4096
#: Training-set sizes of the registered datasets that are downloaded (official archives), used
#: when a dataset is not prepared yet under the study's data root: (train, test) images.
OFFICIAL_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000),
                  "svhn": (73_257, 26_032), "tinyimagenet": (100_000, 10_000),
                  "fashion_mnist": (60_000, 10_000), "digits": (1_437, 360)}


# --- the rate table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    value: float
    arch: re.Pattern | None  # the architectures it is for (None: any)
    source: str


class DeviceRates:
    """One device class's rows of the rate table."""

    def __init__(self, device: str, rows: Mapping[str, list[Rate]]) -> None:
        self.device, self.rows = device, dict(rows)
        missing = [q for q in QUANTITIES if not any(r.arch is None for r in rows.get(q, []))]
        if missing:
            raise ConfigError(f"rate table: device {device!r} has no general row for "
                              f"{', '.join(missing)}")

    def get(self, quantity: str, arch: str | None = None) -> float:
        """The most specific row: one whose arch pattern matches ``arch``, else the general."""
        rows = self.rows[quantity]
        for rate in rows:
            if rate.arch is not None and arch is not None and rate.arch.search(arch):
                return rate.value
        return next(rate.value for rate in rows if rate.arch is None)

    def replace(self, values: Mapping[str, float], source: str) -> DeviceRates:
        """A copy whose general rows of ``values``' quantities are replaced."""
        rows = {q: [r for r in found if r.arch is not None] for q, found in self.rows.items()}
        for quantity, value in values.items():
            rows[quantity] = [*rows.get(quantity, []), Rate(value, None, source)]
        for quantity, found in self.rows.items():
            if quantity not in values:
                rows[quantity] += [r for r in found if r.arch is None]
        return DeviceRates(self.device, rows)


def read_rates(path: Path | None = None) -> dict[str, DeviceRates]:
    """The rate table (the package's ``reference/device_rates.csv`` unless ``path``), by
    device class; ConfigError naming the line at fault."""
    text = (path.read_text() if path is not None else
            resources.files("dnnmod.reference").joinpath(RATES_FILE).read_text())
    where = str(path) if path is not None else RATES_FILE
    rows: dict[str, dict[str, list[Rate]]] = defaultdict(lambda: defaultdict(list))
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames != ["device", "quantity", "arch", "value", "source"]:
        raise ConfigError(f"{where}: expected the columns device,quantity,arch,value,source; "
                          f"got {reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
        if row["quantity"] not in QUANTITIES:
            raise ConfigError(f"{where}:{line}: unknown quantity {row['quantity']!r}; known: "
                              f"{', '.join(QUANTITIES)}")
        try:
            value = float(row["value"])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}:{line}: value {row['value']!r} is not a number") from None
        if not value > 0 or not row["source"]:
            raise ConfigError(f"{where}:{line}: needs a positive value and its source")
        arch = re.compile(row["arch"]) if row["arch"] else None
        rows[row["device"]][row["quantity"]].append(Rate(value, arch, row["source"]))
    return {device: DeviceRates(device, found) for device, found in rows.items()}


# --- the workflow's jobs ----------------------------------------------------------------------


@dataclass
class PlanJob:
    index: int
    rule: str
    wildcards: dict[str, str]
    params: dict[str, Any]
    inputs: list[str]
    outputs: list[str]
    gpu: bool  # a job of a GPU rule (resources: gpu=1)
    threads: int
    runs: bool  # False for a target rule without an action (``all``)
    benchmark: str | None  # the file its rule's ``benchmark:`` writes
    runtime: int | None  # minutes: the wall time a GPU job asks a cluster for (job_resources)
    dependencies: list[int] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    flops: float = 0.0  # on the planned device
    seconds: float = 0.0


@dataclass(frozen=True)
class Phase:
    kind: str  # train, masked or inference: the FLOP rate and step cost it is timed by
    flops: float
    steps: int  # optimizer steps (0: no per-step cost)
    arch: str  # the architecture it runs, for architecture-specific rates
    # a modular training kind (mwt, moda): its rows train_slowdown.<kind> (the compute term's
    # factor) and step_launches.<kind> (the launch-bound term's) apply to the phase
    training: str | None = None
    # the share of ``flops`` a CPU and a GPU compute: kept-channel sub-networks run on a CPU
    # (dnnmod.modules.inference.kept_channel_pass), grouped kept-channel passes on a GPU
    cpu_share: float = 1.0
    gpu_share: float = 1.0

    def device_flops(self, device: str) -> float:
        return self.flops * (self.cpu_share if device == "cpu" else self.gpu_share)


@dataclass
class Study:
    """The study's DAG and what the Snakefile knows about it."""

    config: dict[str, Any]
    tasks: dict[str, Any]  # the derived tasks the workflow makes (configured and E3's)
    jobs: list[PlanJob]
    workdir: Path  # the project folder: the config's relative paths start there


def workflow_jobs(configfile: Path, snakefile: Path) -> Study:
    """Every job of the study in ``configfile``, from Snakemake's own DAG (built in this
    process, every job as ``--forceall`` would run it), dependencies as job indices."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    if not snakefile.is_file():
        raise ConfigError(f"{snakefile}: no Snakefile; run dnnmod plan in the project folder "
                          "or name it with --snakefile")
    if not configfile.is_file():
        raise ConfigError(f"{configfile}: no such config file")
    # Snakemake logs its progress ("Building DAG of jobs...") to the root logger that
    # dnnmod's command line configures: not part of the plan
    snakemake_log = logging.getLogger("snakemake.logging")
    propagate, snakemake_log.propagate = snakemake_log.propagate, False
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            workflow_api = api.workflow(
                # Snakemake caps a job's threads at the cores it is given: enough for any
                # job's configured threads (the schedule caps them at --devices)
                resource_settings=ResourceSettings(cores=MAX_THREADS),
                config_settings=ConfigSettings(configfiles=[configfile.resolve()]),
                storage_settings=StorageSettings(), snakefile=snakefile.resolve(),
                workdir=snakefile.resolve().parent)
            dag_api = workflow_api.dag(DAGSettings(forceall=True))
            workflow = workflow_api._workflow
            workflow.dag_settings = dag_api.dag_settings
            workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
            workflow._build_dag()
            dag = workflow.dag
            order = list(dag.toposorted())
            snake_jobs = [job for level in order for job in level]
            index = {job: i for i, job in enumerate(snake_jobs)}
            jobs = [PlanJob(i, job.rule.name, dict(job.wildcards_dict), dict(job.params.items()),
                            [str(f) for f in job.input], [str(f) for f in job.output],
                            "gpu" in job.rule.resources, int(job.threads), not job.is_norun,
                            str(job.benchmark) if job.benchmark else None,
                    job.resources.get("runtime") if "gpu" in job.rule.resources else None,
                            sorted(index[d] for d in dag.dependencies[job]))
                    for i, job in enumerate(snake_jobs)]
            globals_ = workflow.globals
            return Study(dict(workflow.config), dict(globals_["TASKS"]), jobs,
                         snakefile.resolve().parent)
    except DnnmodError:
        raise
    except Exception as err:  # Snakemake wraps the Snakefile's own checks: one line of it
        message = next((line.strip() for line in str(err).splitlines()
                        if "Error" in line and ":" in line), str(err).strip())
        raise ConfigError(f"{configfile}: the workflow refuses this config: "
                          f"{message or type(err).__name__}") from None
    finally:
        snakemake_log.propagate = propagate


# --- sizes: images per split and FLOPs per image ----------------------------------------------


@dataclass(frozen=True)
class Split:
    train: int
    val: int
    test: int
    classes: int
    image_size: int


class Sizes:
    """Images and classes of each dataset and task, and forward FLOPs of each model."""

    def __init__(self, study: Study) -> None:
        self.config, self.tasks = study.config, study.tasks
        self.root = study.workdir / self.config["data"]["root"]
        self._splits: dict[str, Split] = {}
        self._flops: dict[tuple, int] = {}

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = self._split(name)
        return self._splits[name]

    def _split(self, name: str) -> Split:
        from dnnmod.data.registry import DATASETS

        fraction = self.config["data"]["validation_fraction"]
        meta_path = self.root / name / "meta.json"
        if meta_path.is_file():  # prepared (or derived): its record says how many
            meta = json.loads(meta_path.read_text())
            train, test = meta["counts"]["train"], meta["counts"]["test"]
            classes, size = meta["num_classes"], meta["image_size"]
        elif name in DATASETS:
            spec = DATASETS[name]
            classes, size = spec.num_classes, spec.image_size
            if name in OFFICIAL_SIZES:
                train, test = OFFICIAL_SIZES[name]
            else:  # generated: its options say how many
                options = {**spec.default_options,
                           **self.config["datasets"].get(name, {}).get("options", {})}
                train, test = options["train_count"], options["test_count"]
        elif name in self.tasks:
            train, test, classes, size = self._task(name)
        else:
            raise ConfigError(f"plan: {name!r} is neither a dataset nor a task of the study")
        val = round(train * fraction)
        return Split(train - val, val, test, classes, size)

    def _task(self, name: str) -> tuple[int, int, int, int]:
        from dnnmod.data.tasks import Task

        task = Task.from_config(name, self.tasks[name])
        counts = {"train": 0, "test": 0}
        classes = 0
        for position, part in enumerate(task.parts):
            source = self.split(part.dataset)
            per_class = {"train": (source.train + source.val) / source.classes,
                         "test": source.test / source.classes}
            for split in counts:
                drawn, _ = part.count(task, position, split)
                counts[split] += len(part.classes) * (per_class[split] if drawn is None
                                                      else min(drawn, per_class[split]))
            classes += len(part.classes)
        size = self.split(task.parts[0].dataset).image_size
        return round(counts["train"]), round(counts["test"]), classes, size

    def forward_flops(self, arch: str, width: float, options: Mapping[str, Any], classes: int,
                      image_size: int) -> int:
        """FLOPs of one forward pass of one image (the analytic count of the layer hooks)."""
        key = (arch, width, json.dumps(options, sort_keys=True), classes, image_size)
        if key not in self._flops:
            from dnnmod.models import build_model
            from dnnmod.modules.extract import count_flops

            model = build_model(arch, classes, width, **options)
            self._flops[key] = count_flops(model, (1, 3, image_size, image_size))
        return self._flops[key]


# --- the work of each rule --------------------------------------------------------------------

#: Light rules that load or write datasets (they import torch); the other light rules build
#: tables, figures and the report.
DATA_RULES = ("prepare_dataset", "split_dataset", "derive_task")
TRAINING_RULES = ("train_base_model", "train_weak_model", "train_new_task_scratch",
                  "train_sensitivity_model")


@dataclass(frozen=True)
class Model:
    """The trained model a job runs: its architecture, forward FLOPs and data."""

    arch: str
    flops: int  # one forward pass of one image
    data: Split  # of the dataset or task it was trained on


class Context:
    def __init__(self, study: Study, sizes: Sizes) -> None:
        self.study, self.sizes = study, sizes

    def trained_data(self, job: PlanJob) -> str:
        """The dataset or task a training job trains on (its images' folder)."""
        return Path(job.inputs[0]).parent.name

    def model(self, job: PlanJob) -> Model:
        """The model a training job trains, or the first trained model a job reads."""
        if job.rule not in TRAINING_RULES:
            producer = self._first_training(job)
            return self.model(producer)
        data = self.sizes.split(self.trained_data(job))
        options = json.loads(job.params["options"])
        flops = self.sizes.forward_flops(job.params["arch"], float(job.params["width"]),
                                         options, data.classes, data.image_size)
        return Model(job.params["arch"], flops, data)

    def model_job(self, job: PlanJob) -> PlanJob:
        """The training job of the model a job reads."""
        return job if job.rule in TRAINING_RULES else self._first_training(job)

    def _first_training(self, job: PlanJob) -> PlanJob:
        seen, queue = set(), list(job.dependencies)
        while queue:
            index = queue.pop(0)
            dependency = self.study.jobs[index]
            if dependency.rule in TRAINING_RULES:
                return dependency
            if index not in seen:
                seen.add(index)
                queue += dependency.dependencies
        raise ConfigError(f"plan: job {job.rule} {job.wildcards} reads no trained model")

    def hyperparameters(self, job: PlanJob) -> dict[str, Any]:
        from dnnmod.approaches import get_approach

        return get_approach(job.wildcards.get("approach", "cnnsplitter")).resolve(
            json.loads(job.params["hyperparameters"]))


def _training(job: PlanJob, context: Context) -> list[Phase]:
    model = context.model(job)
    recipe = json.loads(job.params["recipe"])
    epochs, batch = recipe["epochs"], recipe["batch_size"]
    data = model.data
    training = job.wildcards.get("training", "st")
    # forward + backward (two forwards) of every training image, one forward of each
    # validation image, every epoch; the test images once
    train = Phase("train", 3 * model.flops * data.train * epochs,
                  epochs * math.ceil(data.train / batch), model.arch,
                  None if training == "st" else training)
    evaluation = Phase("inference", model.flops * (data.val * epochs + data.test), 0, model.arch)
    return [train, evaluation]


def _gradsplitter(job: PlanJob, context: Context, hp: Mapping[str, Any]) -> list[Phase]:
    from dnnmod.approaches.gradsplitter import schedule

    model = context.model(job)
    modules = model.data.classes
    images = model.data.train if hp["max_train_samples"] is None else min(
        hp["max_train_samples"], model.data.train)
    phases = schedule(dict(hp))
    mask_epochs = sum(p.epochs for p in phases if p.kind == "mask")
    head_phases = sum(1 for p in phases if p.kind == "head")
    per_pass = model.flops * modules  # all modules over one image: one batched masked pass
    # a mask epoch: forward + the backward to the inputs and kernel scores (weights frozen);
    # a head phase caches its masked logits once; every mask epoch and head phase validates
    return [Phase("masked", 2 * per_pass * images * mask_epochs,
                  mask_epochs * math.ceil(images / hp["batch_size"]), model.arch),
            Phase("inference", per_pass * (images * head_phases
                                           + model.data.val * (mask_epochs + head_phases)),
                  0, model.arch)]


def _cnnsplitter(job: PlanJob, context: Context, hp: Mapping[str, Any]) -> list[Phase]:
    model = context.model(job)
    classes, val = model.data.classes, model.data.val
    fitness = val if hp["fitness_samples"] is None else min(hp["fitness_samples"], val)
    held_out = val - fitness
    if hp["selection_samples"] is not None:
        held_out = min(held_out, hp["selection_samples"])
    # a solution keeps a ratio r of each layer's kernels: as a kept-channel sub-network (on a
    # CPU) its convolutions cost about r^2 of the model's, in the grouped kept-channel pass (on
    # a GPU) that and the padding to shared widths
    ratios = [*hp["sensitive_keep_ratios"], *hp["other_keep_ratios"]]
    kept = (sum(ratios) / len(ratios)) ** 2
    solutions = classes * (hp["population"]
                           + hp["generations"] * (hp["population"] - hp["elites"]))
    return [Phase("inference",  # every new solution's fitness, each generation's selection
                  model.flops * (solutions * fitness + classes * hp["generations"] * held_out),
                  0, model.arch, cpu_share=kept, gpu_share=kept * GROUPED_PASS_OVERHEAD),
            Phase("inference", model.flops * 2 * val, 0, model.arch)]  # scores, importance


def _cnnsplitter_sweep(job: PlanJob, context: Context) -> list[Phase]:
    """Each conv layer pruned alone at every swept ratio below 1, for every class's module:
    about a whole forward pass each (one layer narrower), on the search's fitness images."""
    from torch import nn

    from dnnmod.approaches.cnnsplitter import SWEEP_RATIOS
    from dnnmod.models import build_model

    model = context.model(job)
    hp = context.hyperparameters(job)
    val = model.data.val
    fitness = val if hp["fitness_samples"] is None else min(hp["fitness_samples"], val)
    producer = context.model_job(job)
    # convs, an upper bound on the conv groups (coupled convs share one)
    layers = sum(isinstance(layer, nn.Conv2d) for layer in build_model(
        producer.params["arch"], model.data.classes, float(producer.params["width"]),
        **json.loads(producer.params["options"])).modules())
    passes = layers * (len(SWEEP_RATIOS) - 1) * model.data.classes + 1  # + the whole model
    # and one pass over the validation split for kernel importance
    return [Phase("inference", model.flops * (fitness * passes + val), 0, model.arch)]


def _statistics_pass(job: PlanJob, context: Context, passes: float) -> list[Phase]:
    """Decompositions that read activations: ``passes`` forward passes of the training
    images (MwT's and MODA's rates, Pan & Rajan's CI and TI)."""
    model = context.model(job)
    return [Phase("inference", passes * model.flops * model.data.train, 0, model.arch)]


def _modularize(job: PlanJob, context: Context) -> list[Phase]:
    approach = job.wildcards["approach"]
    hp = context.hyperparameters(job)
    if approach == "gradsplitter":
        return _gradsplitter(job, context, hp)
    if approach == "cnnsplitter":
        return _cnnsplitter(job, context, hp)
    if control_of(approach):  # a random control draws kernels: no passes
        return []
    if approach == "pan_rajan":
        return _statistics_pass(job, context, 2.0)
    if approach in ("mwt", "moda"):
        return _statistics_pass(job, context, 1.0)
    raise ConfigError(f"plan: no cost model for approach {approach!r}")


def _module_passes(job: PlanJob, context: Context, passes_per_module: float) -> list[Phase]:
    """Every module (one per class) and the model over the test images, ``passes_per_module``
    times (evaluations, patching, replacement, sub-task reuse)."""
    model = context.model(job)
    return [Phase("inference", model.flops * model.data.test
                  * (passes_per_module * model.data.classes + 1), 0, model.arch)]


def _reuse_subtasks(job: PlanJob, context: Context) -> list[Phase]:
    from dnnmod.approaches import get_approach

    settings = json.loads(job.params["settings"])
    model = context.model(job)
    classes = model.data.classes
    subsets = settings["union_subsets"]
    # the modules and the model over the test images, then each sampled sub-task's union
    # network over them
    phases = [Phase("inference", model.flops * model.data.test * (classes + 1 + subsets), 0,
                    model.arch)]
    if subsets and get_approach(job.wildcards["approach"]).fine_tunes_union:
        # every parameter trained on the sub-task's training images: |T| of the N classes,
        # (N + 2) / 2 on average over sizes 2..N
        images = model.data.train * (classes + 2) / (2 * classes)
        epochs = settings["fine_tune_epochs"] * subsets
        phases.append(Phase("train", 3 * model.flops * images * epochs,
                            epochs * math.ceil(images / settings["fine_tune_batch_size"]),
                            model.arch))
    return phases


def _compose_new_tasks(job: PlanJob, context: Context) -> list[Phase]:
    model = context.model(job)
    pairs = json.loads(job.params["pairs"])
    learning = json.loads(job.params["continuous_learning"] or "null")
    # each pair: its two modules over the pair's test and selection images (2 of 10 classes)
    per_pair_images = 2 * (model.data.test + model.data.val) / model.data.classes
    phases = [Phase("inference", len(pairs) * 2 * model.flops * per_pair_images, 0, model.arch)]
    if learning:
        images = 2 * (model.data.train / model.data.classes) * len(pairs)
        phases.append(Phase("train", 3 * model.flops * images * learning["epochs"],
                            learning["epochs"] * math.ceil(images / learning["batch_size"]),
                            model.arch))
    return phases


def _patch_weak_models(job: PlanJob, context: Context) -> list[Phase]:
    """Each weak model over its task's images, and the strong model's target-class module
    over each task's images once (the moda protocol trains its calibration layer on those
    scores, not through the models)."""
    strong = context.model(job)
    flops, tasks = 0.0, set()
    for index in job.dependencies:
        dependency = context.study.jobs[index]
        if dependency.rule != "train_weak_model":
            continue
        weak = context.model(dependency)
        images = weak.data.train + weak.data.val + weak.data.test
        flops += weak.flops * images
        if dependency.params["task"] not in tasks:
            tasks.add(dependency.params["task"])
            flops += strong.flops * images
    return [Phase("inference", flops, 0, strong.arch)]


#: Rule -> the phases of one job's work. A GPU rule missing here is refused (test_plan holds
#: every GPU rule of the workflow to one); light rules have none (fixed cost only).
RULE_WORK: dict[str, Callable[[PlanJob, Context], list[Phase]]] = {
    **{rule: _training for rule in TRAINING_RULES},
    "modularize": _modularize,
    "modularize_sensitivity": _modularize,
    "cnnsplitter_layer_sensitivity": _cnnsplitter_sweep,
    "evaluate_modules": lambda job, context: _module_passes(job, context, 1.0),
    "evaluate_decomposition": lambda job, context: _module_passes(job, context, 1.0),
    "reuse_replace": lambda job, context: _module_passes(job, context, 2.0),
    "reuse_subtasks": _reuse_subtasks,
    "patch_weak_models": _patch_weak_models,
    "compose_new_tasks": _compose_new_tasks,
}


def job_seconds(job: PlanJob, rates: DeviceRates, forked: bool = False) -> float:
    """A job's time alone on one device of the rate table's class; ``forked``: started by the
    fork server (dnnmod.fork_server), its fixed cost without the interpreter and imports."""
    if not job.runs:
        return 0.0
    fixed_cost = "forked_job_s" if forked else "job_s"
    if not job.gpu:
        return rates.get(f"{fixed_cost}.data_rule" if job.rule in DATA_RULES
                         else f"{fixed_cost}.report_rule")
    fixed = rates.get(f"{fixed_cost}.gpu_rule")
    # a CPU job's threads each bring a core's rate; a GPU job has one device
    threads = job.threads if rates.device == "cpu" else 1
    seconds = fixed
    for phase in job.phases:
        rate = rates.get(f"flops_per_s.{phase.kind}", phase.arch) * threads
        compute = phase.device_flops(rates.device) / rate
        # a GPU's kernel launches bound a small model's steps (inference runs in large chunks)
        steps = 0.0 if phase.kind == "inference" else \
            phase.steps * rates.get(f"step_s.{phase.kind}")
        if phase.training:  # its objective's extra compute, and its extra kernels a step
            compute *= rates.get(f"train_slowdown.{phase.training}", phase.arch)
            steps *= rates.get(f"step_launches.{phase.training}", phase.arch)
        seconds += max(compute, steps)
    return seconds


# --- the schedule -----------------------------------------------------------------------------


def remaining_path(jobs: list[PlanJob]) -> list[float]:
    """Each job's seconds plus the longest chain of jobs that wait for it."""
    dependents: dict[int, list[int]] = defaultdict(list)
    for job in jobs:
        for dependency in job.dependencies:
            dependents[dependency].append(job.index)
    tail = [0.0] * len(jobs)
    for job in reversed(jobs):  # jobs are in topological order
        tail[job.index] = job.seconds + max((tail[d] for d in dependents[job.index]),
                                            default=0.0)
    return tail


def critical_path(jobs: list[PlanJob]) -> float:
    return max(remaining_path(jobs), default=0.0)


def wall_time(jobs: list[PlanJob], devices: int, cpu_study: bool) -> float:
    """Seconds until the last job ends: a list schedule, longest remaining path first.

    A GPU study: each GPU job holds one of ``devices`` GPUs; light jobs run on the host beside
    them (seconds each, not limited). A CPU study: every job holds its threads of ``devices``
    cores (at most all of them), as ``snakemake --cores devices`` runs it.
    """
    priority = remaining_path(jobs)
    waiting = {job.index: len(job.dependencies) for job in jobs}
    dependents: dict[int, list[int]] = defaultdict(list)
    for job in jobs:
        for dependency in job.dependencies:
            dependents[dependency].append(job.index)

    def need(job: PlanJob) -> int:
        if cpu_study:
            return min(job.threads, devices)
        return 1 if job.gpu else 0

    ready = [(-priority[j.index], j.index) for j in jobs if not j.dependencies]
    heapq.heapify(ready)
    running: list[tuple[float, int]] = []
    free, now, finished = devices, 0.0, 0
    while finished < len(jobs):
        held = []
        while ready:  # start every ready job that fits, highest priority first
            entry = heapq.heappop(ready)
            job = jobs[entry[1]]
            if need(job) <= free:
                free -= need(job)
                heapq.heappush(running, (now + job.seconds, job.index))
            else:
                held.append(entry)
        for entry in held:
            heapq.heappush(ready, entry)
        now, index = heapq.heappop(running)
        free += need(jobs[index])
        finished += 1
        for dependent in dependents[index]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, (-priority[dependent], dependent))
    return now


# --- the plan ---------------------------------------------------------------------------------


@dataclass
class Plan:
    device: str
    devices: int
    jobs: list[PlanJob]
    wall_seconds: float
    critical_seconds: float
    forked: bool  # jobs started by the fork server (a local run), not each its own process

    def device_hours(self, job: PlanJob) -> float:
        """What a job holds of the devices, in hours: a CPU study's jobs their threads' cores,
        a GPU study's GPU jobs one GPU (its light jobs run on the host)."""
        if self.device == "cpu":
            return job.seconds * job.threads / 3600
        return job.seconds / 3600 if job.gpu else 0.0

    def stages(self) -> list[dict[str, Any]]:
        """Per rule, and per approach within a rule that has one: jobs, FLOPs, device-hours
        (each job's time alone, summed), heaviest first."""
        rows: dict[tuple[str, str | None], dict[str, Any]] = {}
        for job in self.jobs:
            for key in {(job.rule, None), (job.rule, job.wildcards.get("approach"))}:
                row = rows.setdefault(key, {"rule": key[0], "approach": key[1], "jobs": 0,
                                            "gpu": job.gpu, "flops": 0.0,
                                            "device_hours": 0.0})
                row["jobs"] += 1
                row["flops"] += job.flops
                row["device_hours"] += self.device_hours(job)
        rules = sorted((r for r in rows.values() if r["approach"] is None),
                       key=lambda r: (-r["device_hours"], r["rule"]))
        return [row for rule in rules for row in [rule, *sorted(
            (r for r in rows.values() if r["rule"] == rule["rule"] and r["approach"]),
            key=lambda r: -r["device_hours"])]]


def make_plan(configfile: Path, device: str, devices: int, rates: DeviceRates,
              snakefile: Path = Path("Snakefile"), cluster: bool = False) -> Plan:
    """The plan of a local run (jobs started by the fork server unless the config switches it
    off), or with ``cluster`` of a cluster run (each job its own process)."""
    if devices < 1:
        raise ConfigError(f"plan: --devices must be at least 1; got {devices}")
    study = workflow_jobs(configfile, snakefile)
    forked = not cluster and study.config.get("fork_server", True)
    context = Context(study, Sizes(study))
    for job in study.jobs:
        if job.gpu and job.rule not in RULE_WORK:
            raise ConfigError(f"plan: GPU rule {job.rule!r} has no cost model "
                              "(dnnmod.plan.RULE_WORK)")
        job.phases = RULE_WORK[job.rule](job, context) if job.gpu else []
        job.flops = sum(phase.device_flops(device) for phase in job.phases)
        job.seconds = job_seconds(job, rates, forked)
    cpu_study = device == "cpu"
    return Plan(device, devices, study.jobs, wall_time(study.jobs, devices, cpu_study),
                critical_path(study.jobs), forked)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


#: The plan's tolerance, as benchmarks/plan_accuracy.py checks it on measured CPU runs.
TOLERANCE = 0.35


def format_plan(plan: Plan, configfile: Path) -> str:
    """The plan as a table: a row per rule (stage), under it a row per approach of a rule
    that takes at least 5 % of the device-hours; totals and the wall time."""
    stages = plan.stages()
    total_hours = sum(plan.device_hours(job) for job in plan.jobs)
    unit = "core-h" if plan.device == "cpu" else f"{plan.device}-h"
    lines = [f"plan of {configfile} on {plan.devices} x {plan.device}, "
             + ("jobs started by the fork server" if plan.forked
                else "each job its own process"),
             f"{'stage (rule)':<28} {'jobs':>6} {'device':>6} {'FLOP':>10} {unit:>10}"]
    shown = {row["rule"] for row in stages if row["approach"] is None
             and row["device_hours"] >= 0.05 * total_hours}
    for row in stages:
        if row["approach"] is not None and row["rule"] not in shown:
            continue
        name = row["rule"] if row["approach"] is None else f"  {row['approach']}"
        lines.append(f"{name:<28} {row['jobs']:>6} {'gpu' if row['gpu'] else 'cpu':>6} "
                     f"{row['flops']:>10.2e} {row['device_hours']:>10.2f}")
    gpu_jobs = sum(1 for job in plan.jobs if job.gpu)
    low, high = 1 - TOLERANCE, 1 + TOLERANCE
    # a cluster ends a job at its runtime: where the plan's upper bound passes it, it resumes
    # from its checkpoint (retries) or, past them, fails
    over: dict[str, list[PlanJob]] = defaultdict(list)
    for job in plan.jobs:
        if job.runtime is not None and job.seconds * high > 60 * job.runtime:
            over[job.rule].append(job)
    lines += [f"{'total':<28} {len(plan.jobs):>6} {gpu_jobs:>6} "
              f"{sum(job.flops for job in plan.jobs):>10.2e} {total_hours:>10.2f}",
              f"device-hours: {total_hours:.1f} {unit} (range {total_hours * low:.1f}-"
              f"{total_hours * high:.1f})",
              f"wall time on {plan.devices} x {plan.device}: {_duration(plan.wall_seconds)} "
              f"(range {_duration(plan.wall_seconds * low)}-"
              f"{_duration(plan.wall_seconds * high)}; critical path "
              f"{_duration(plan.critical_seconds)}); light jobs "
              + ("share the cores" if plan.device == "cpu" else "run on the host beside")]
    for rule, jobs in sorted(over.items()):
        longest = max(jobs, key=lambda job: job.seconds)
        lines.append(f"{len(jobs)} {rule} jobs may pass their runtime (resources, "
                     f"{longest.runtime} min): up to {_duration(longest.seconds * high)} "
                     f"({', '.join(longest.wildcards.values())})")
    return "\n".join(lines)


# --- calibration ------------------------------------------------------------------------------

#: The calibration's model: the demo's simcnn (8-64 channels a layer), whose thin layers run at
#: a lower FLOP rate than wider ones, so the rates it measures err on the slow side.
CALIBRATION_MODEL = ("simcnn", 0.125)
TINY_RECIPE = {"epochs": 1, "batch_size": 64, "lr": 0.05}


def _timed(step: Callable[[], Any], repeats: int, rounds: int = 3) -> float:
    """Seconds per call: the best of ``rounds`` means of ``repeats`` calls (the machine's
    rate; what else runs meanwhile only slows a round down)."""
    step()  # warm-up: allocations, oneDNN's kernel choice
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def _kernel_rates() -> dict[str, float]:
    """FLOP rates of one core in this process, counted as the plan counts them: a training
    step of the calibration model (batch 32: the demo's), a forward pass (batch 128: the
    evaluations' chunks), and GradSplitter's mask step over 10 modules (batch 32)."""
    import torch
    from torch import nn

    from dnnmod.models import build_model
    from dnnmod.modules.extract import count_flops

    torch.set_num_threads(1)
    torch.manual_seed(0)
    arch, width = CALIBRATION_MODEL
    model = build_model(arch, 10, width)
    flops = count_flops(model, (1, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    single = torch.randn(1, 3, 32, 32), torch.randint(0, 10, (1,))

    def single_step() -> None:  # the least a step costs: one image
        loss = nn.functional.cross_entropy(model(single[0]), single[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train = _timed(train_step, 10)
    step = _timed(single_step, 10)
    model.eval()
    batch = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        forward = _timed(lambda: model(batch), 10)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # GradSplitter's batched masked pass: the frozen model over 10 modules' copies of a
    # batch, forward and backward to the inputs (the masks' gradients come from there)
    copies = torch.randn(10 * 32, 3, 32, 32, requires_grad=True)

    def mask_step() -> None:
        model(copies).sum().backward()

    masked = _timed(mask_step, 5)
    return {"flops_per_s.train": 3 * flops * 32 / train, "step_s.train": step,
            "flops_per_s.inference": flops * 128 / forward,
            "flops_per_s.masked": 2 * flops * 10 * 32 / masked, "step_s.masked": step}


def _job_costs() -> dict[str, float]:
    """Fixed costs of the three kinds of job, each timed as a real ``dnnmod`` process on tiny
    inputs, as its own process and started by a fork server: splitting digits (data jobs), one
    epoch of a width-1/16 simcnn (a GPU rule's job: its own work is a fraction of a second) and
    the E1 table (report jobs)."""
    import tempfile

    from dnnmod import fork_server

    command = [sys.executable, "-m", "dnnmod.cli"]
    own = {key: value for key, value in os.environ.items() if key != fork_server.SOCKET_ENV}

    def dnnmod(*args: str, environment: dict[str, str] = own) -> float:  # the faster of two
        times = []
        for _ in range(2):
            started = time.perf_counter()
            subprocess.run([*command, *args], cwd=folder, env=environment, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
        return min(times)

    costs = {}
    with tempfile.TemporaryDirectory() as folder:
        dnnmod("data", "prepare", "--dataset", "digits", "--root", "data")
        server = fork_server.start(Path(folder) / "fork_server.log", command=command)
        if server is None:
            raise DnnmodError(f"plan: could not start a fork server ({command})")
        forked = {**own, fork_server.SOCKET_ENV: server.socket}
        try:
            for prefix, environment in (("job_s", own), ("forked_job_s", forked)):
                costs[f"{prefix}.data_rule"] = dnnmod(
                    "data", "split", "--dataset", "digits", "--root", "data", "--seed", "0",
                    environment=environment)
                costs[f"{prefix}.gpu_rule"] = dnnmod(
                    "train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
                    "--recipe", json.dumps(TINY_RECIPE), "--seed", "0", "--data-root", "data",
                    "--device", "cpu", "--threads", "1", "--out", "model.safetensors",
                    environment=environment)
                costs[f"{prefix}.report_rule"] = dnnmod(
                    "table", "base-models", "--models", "model.safetensors", "--out", "e1.csv",
                    environment=environment)
        finally:
            fork_server.stop(server)
    return costs


def calibrate() -> dict[str, float]:
    """This machine's CPU row (per core), measured in about half a minute."""
    return {**_kernel_rates(), **_job_costs()}


def cmd_plan(args) -> None:
    """``dnnmod plan``: print the study's jobs, FLOPs, device-hours and wall time."""
    table = read_rates(Path(args.rates) if args.rates else None)
    if args.device_kind not in table:
        raise ConfigError(f"plan: no rates for device {args.device_kind!r}; known: "
                          f"{', '.join(sorted(table))}")
    rates = table[args.device_kind]
    if args.calibrate:
        if args.device_kind != "cpu":
            raise ConfigError("plan: --calibrate measures this machine's CPU: use it with "
                              "--device-kind cpu")
        measured = calibrate()
        # the rates are what the cores give now: other work on them slows every measure
        load, cores = os.getloadavg()[0], os.cpu_count()
        print(f"calibrated on this machine (load average {load:.1f} on {cores} cores): "
              + ", ".join(f"{q} {v:.3g}" for q, v in sorted(measured.items())))
        rates = rates.replace(measured, "dnnmod plan --calibrate")
    plan = make_plan(Path(args.config), args.device_kind, args.devices, rates,
                     Path(args.snakefile), cluster=args.cluster)
    print(format_plan(plan, Path(args.config)))

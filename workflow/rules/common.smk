# Shared by every stage's rules. The study's checked configuration and names, where jobs run,
# the wildcards. Each stage's helpers are in helpers/ (included next, see Snakefile).

import json
import os
from pathlib import Path

from dnnmod.approaches import APPROACHES
from dnnmod import fork_server
from dnnmod.devices import check_gpu_slots
from dnnmod.job_resources import (
    check_resources_config,
    gpu_rule_resources,
    gpu_rule_threads,
    light_rule_resources,
)
from dnnmod.report import sensitivity
from dnnmod.reuse import patching
from dnnmod.study import (
    check_study_config,
    expand_base_models,
    expand_modularizations,
    modularization_hyperparameters,
)
from dnnmod.training.objectives import training_kinds

# Semantic checks the schema cannot express (names exist, references resolve), before any job.
check_study_config(config)
patching.check_patching_config(config)
check_resources_config(config)

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
DATA = config["data"]["root"]
SEEDS = config["seeds"]
BASE_MODELS = expand_base_models(config)
MODULARIZATIONS = expand_modularizations(config)
# Derived tasks: those configured, and those experiments derive (E3's weak-model tasks).
TASKS = {**config["tasks"], **patching.weak_tasks(config)}
# Where jobs run is machine-specific: handed to jobs through the environment, never as a
# rule parameter, so moving between a laptop and a GPU server does not trigger retraining.
os.environ.update(DNNMOD_DEVICE=config["device"])
# Jobs without a GPU: local rules (see Snakefile), or jobs on resources.light.partition.
LIGHT_JOB = light_rule_resources(config)
# Which ready jobs start first (Snakemake runs higher priorities first; the rest have 0):
# the data jobs (seconds each), so that every training is ready early, then the trainings and
# the searches before the short jobs that fill the cores around them. Longest first: started
# last, one training would run alone at the end of a run on an otherwise idle machine.
PRIORITY = {"data": 30, "train": 20, "search": 10}
# The fork server of this run's local jobs, once the onstart hook has started it.
FORK_SERVER = []


onstart:
    # --resources gpu=N with a torch that cannot use the GPUs fails here, before any job (not in
    # dry runs, nor in the per-job Snakemake of a cluster job, which runs without hooks).
    gpu_slots = workflow.global_resources.get("gpu")
    check_gpu_slots(
        gpu_slots.value if gpu_slots is not None else 0, config["device"]
    )
    # Jobs on this machine start from a process that has imported torch (dnnmod.fork_server).
    if workflow.local_exec and config["fork_server"]:
        FORK_SERVER.append(
            fork_server.start_for_workflow(Path(f"{RESULTS}/logs/fork_server.log"))
        )


onsuccess:
    fork_server.stop_for_workflow(FORK_SERVER.pop() if FORK_SERVER else None)


onerror:
    fork_server.stop_for_workflow(FORK_SERVER.pop() if FORK_SERVER else None)


wildcard_constraints:
    dataset=r"[a-z0-9_]+",
    model=r"[a-z0-9_.\-]+",
    seed=r"\d+",
    approach="|".join(APPROACHES),


def as_json(value):
    return json.dumps(value, sort_keys=True)

import json
import os
from pathlib import Path

from dnnmod.approaches import APPROACHES
from dnnmod.study import check_study_config, expand_base_models, expand_modularizations

# Semantic checks the schema cannot express (names exist, references resolve), before any job.
check_study_config(config)

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
DATA = config["data"]["root"]
SEEDS = config["seeds"]
BASE_MODELS = expand_base_models(config)
MODULARIZATIONS = expand_modularizations(config)
# Where jobs run is machine-specific: handed to jobs through the environment, never as a
# rule parameter, so moving between a laptop and a GPU server does not trigger retraining.
os.environ.update(DNNMOD_DEVICE=config["device"])


wildcard_constraints:
    dataset=r"[a-z0-9_]+",
    model=r"[a-z0-9_.\-]+",
    seed=r"\d+",
    approach="|".join(APPROACHES),


def model_entry(wildcards):
    return config["models"][wildcards.model]


def recipe_of(wildcards):
    return config["recipes"][BASE_MODELS[(wildcards.dataset, wildcards.model)]]


def data_root(path):
    """The data root of a data/<dataset>/<file> or data/<dataset>/splits/<file> path."""
    path = Path(path)
    return str(path.parents[2] if path.parent.name == "splits" else path.parents[1])


def as_json(value):
    return json.dumps(value, sort_keys=True)


def base_model_weights():
    return [
        f"{RESULTS}/models/{dataset}/{model}/st/seed{seed}/model.safetensors"
        for (dataset, model) in BASE_MODELS
        for seed in SEEDS
    ]


def module_metrics():
    return [
        f"{RESULTS}/modules/{dataset}/{model}/{approach}/seed{seed}/metrics.json"
        for (approach, dataset, model) in MODULARIZATIONS
        for seed in SEEDS
    ]


def all_outputs():
    outputs = [
        f"{RESULTS}/tables/e1_base_models.csv",
        f"{RESULTS}/metrics/e1_base_models.json",
    ]
    if MODULARIZATIONS:
        outputs += [
            f"{RESULTS}/tables/e2_modularization.csv",
            f"{RESULTS}/figures/e2_accuracy_vs_krr.png",
            f"{RESULTS}/metrics/e2_modularization.json",
        ]
    return outputs

import json

from dnnmod.config import check_study_config, expand_base_models

# Semantic checks the schema cannot express (names exist, references resolve), before any job.
check_study_config(config)

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
DATA = config["data"]["root"]
SEEDS = config["seeds"]
BASE_MODELS = expand_base_models(config)


wildcard_constraints:
    dataset=r"[a-z0-9_]+",
    model=r"[a-z0-9_.\-]+",
    seed=r"\d+",


def model_entry(wildcards):
    return config["models"][wildcards.model]


def recipe_of(wildcards):
    return config["recipes"][BASE_MODELS[(wildcards.dataset, wildcards.model)]]


def as_json(value):
    return json.dumps(value, sort_keys=True)


def base_model_weights():
    return [
        f"{RESULTS}/models/{dataset}/{model}/st/seed{seed}/model.safetensors"
        for (dataset, model) in BASE_MODELS
        for seed in SEEDS
    ]


def all_outputs():
    return [
        f"{RESULTS}/tables/e1_base_models.csv",
        f"{RESULTS}/metrics/e1_base_models.json",
    ]

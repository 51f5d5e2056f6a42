import json
import os
from pathlib import Path

from dnnmod.approaches import APPROACHES, get_approach
from dnnmod.study import check_study_config, expand_base_models, expand_modularizations
from dnnmod.training.objectives import StandardTraining, training_kinds

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


def model_weights(dataset, model, training, seed):
    """The weights train_base_model writes for one model, training kind and seed."""
    return f"{RESULTS}/models/{dataset}/{model}/{training}/seed{seed}/model.safetensors"


def trained_models():
    """(dataset, model, training kind) of every model the study trains.

    Each base model with standard training, and with the kind of each approach decomposing it.
    """
    standard = {
        (dataset, model, StandardTraining.name) for (dataset, model) in BASE_MODELS
    }
    decomposed = {
        (dataset, model, training_of(approach))
        for (approach, dataset, model) in MODULARIZATIONS
    }
    return sorted(standard | decomposed)


def base_model_weights():
    """The weights of every trained model and seed (E1 lists them all)."""
    return [
        model_weights(dataset, model, training, seed)
        for (dataset, model, training) in trained_models()
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


# Module sets: which model an approach decomposes, and which other module sets it reads.


def hyperparameters_of(approach):
    return get_approach(approach).resolve(config["approaches"].get(approach, {}))


def training_of(approach):
    return get_approach(approach).training_for(hyperparameters_of(approach))


def references_of(approach):
    return get_approach(approach).references(hyperparameters_of(approach))


def decomposed_model(wildcards):
    return model_weights(
        wildcards.dataset,
        wildcards.model,
        training_of(wildcards.approach),
        wildcards.seed,
    )


def reference_module_sets(wildcards):
    return [
        f"{RESULTS}/modules/{wildcards.dataset}/{wildcards.model}/{name}/seed{wildcards.seed}/modules.safetensors"
        for name in references_of(wildcards.approach)
    ]


def task_sources(wildcards):
    """The prepared images of the datasets a derived task draws from."""
    parts = config["tasks"][wildcards.task]["parts"]
    return list(
        dict.fromkeys(f"{DATA}/{part['dataset']}/images.safetensors" for part in parts)
    )

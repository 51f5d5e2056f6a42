# Training helpers (train.smk): the base models the study trains, their recipes and weights.

from dnnmod.training.objectives import StandardTraining


def model_entry(wildcards):
    return config["models"][wildcards.model]


def recipe_of(wildcards):
    """The recipe of a base model, or of an E4 Dirichlet pool member (trained on its task)."""
    key = (wildcards.dataset, wildcards.model)
    return config["recipes"][BASE_MODELS.get(key) or NEW_TASK_POOL_RECIPES[key]]


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


def st_model_weights(wildcards):
    """The standard-trained model of a module set's architecture, dataset and seed."""
    return model_weights(
        wildcards.dataset, wildcards.model, StandardTraining.name, wildcards.seed
    )

# Modularization helpers (modularize.smk, pan_rajan.smk, sensitivity.smk).

from dnnmod.approaches import get_approach
from dnnmod.report import sensitivity

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


def cnnsplitter_sweep_path(dataset, model, seed):
    """CNNSplitter's layer sensitivity sweep of a model (cnnsplitter_layer_sensitivity)."""
    return f"{RESULTS}/modules/{dataset}/{model}/cnnsplitter/seed{seed}/layer_sensitivity.json"


def reads_layer_sensitivity(approach, overrides):
    """Whether a run of ``approach`` with ``overrides`` takes its keep ratios from the sweep."""
    if approach != "cnnsplitter":
        return False
    hp = get_approach(approach).resolve(overrides)
    return hp["keep_ratios"] == "sweep" and hp["initialisation"] == "heuristic"


def layer_sensitivity_input(approach, overrides, wildcards):
    """The sweep a decomposition reads (CNNSplitter's keep_ratios: sweep), as a list."""
    if not reads_layer_sensitivity(approach, overrides):
        return []
    return [cnnsplitter_sweep_path(wildcards.dataset, wildcards.model, wildcards.seed)]


def layer_sensitivity_argument(input):
    return " ".join(f"--layer-sensitivity {path}" for path in input.layer_sensitivity)


def reference_module_sets(wildcards):
    return [
        f"{RESULTS}/modules/{wildcards.dataset}/{wildcards.model}/{name}/seed{wildcards.seed}/modules.safetensors"
        for name in references_of(wildcards.approach)
    ]


def module_metrics():
    return [
        f"{RESULTS}/modules/{dataset}/{model}/{approach}/seed{seed}/metrics.json"
        for (approach, dataset, model) in MODULARIZATIONS
        for seed in SEEDS
    ]


# Pan & Rajan's Table 1 (pan_rajan.smk): every pan_rajan module set of the study.


def pan_rajan_costs():
    return [
        f"{RESULTS}/modules/{dataset}/{model}/{approach}/seed{seed}/decomposition_cost.json"
        for (approach, dataset, model) in MODULARIZATIONS
        if approach == "pan_rajan"
        for seed in SEEDS
    ]


# E7 sensitivity (sensitivity.sweeps; absent = no sweeps): one hyperparameter varied per sweep.
# A decomposition-time point decomposes the study's own model again; a training-time point
# (objectives) decomposes a model trained with its value. The point at the study's own value
# is the study's module set.

SENSITIVITY = sensitivity.plan_sweeps(config)
SENSITIVITY_POINTS = {
    (p.approach, p.dataset, p.model, p.variant): p for p in SENSITIVITY
}
SENSITIVITY_MODELS = {
    (p.training, p.dataset, p.model, p.variant): p
    for p in SENSITIVITY
    if p.stage == sensitivity.TRAINING
}


def sensitivity_folder(kind, dataset, model, name, variant, seed):
    return f"{RESULTS}/sensitivity/{kind}/{dataset}/{model}/{name}/{variant}/seed{seed}"


def sensitivity_point(wildcards):
    return SENSITIVITY_POINTS[
        (wildcards.approach, wildcards.dataset, wildcards.model, wildcards.variant)
    ]


def sensitivity_weights(point, seed):
    """The model a sweep point decomposes: the study's, or the one trained with its value."""
    if point.stage == sensitivity.TRAINING and not point.is_default:
        folder = sensitivity_folder(
            "models", point.dataset, point.model, point.training, point.variant, seed
        )
        return f"{folder}/model.safetensors"
    return model_weights(point.dataset, point.model, point.training, seed)


def sensitivity_modules(point, seed):
    """A sweep point's module set (the study's at its own value)."""
    if point.is_default:
        return f"{RESULTS}/modules/{point.dataset}/{point.model}/{point.approach}/seed{seed}/modules.safetensors"
    folder = sensitivity_folder(
        "modules", point.dataset, point.model, point.approach, point.variant, seed
    )
    return f"{folder}/modules.safetensors"


def sensitivity_units():
    """(point, seed) of every sweep point and seed, in table order."""
    return [(point, seed) for point in SENSITIVITY for seed in SEEDS]


def sensitivity_reference_names(wildcards):
    """The approaches whose module sets a sweep point's approach reads."""
    point = sensitivity_point(wildcards)
    approach = get_approach(point.approach)
    return approach.references(
        approach.resolve(sensitivity.approach_overrides(config, point))
    )


def sensitivity_references(wildcards):
    """The study's module sets a sweep point reads, cut from the same model."""
    return [
        f"{RESULTS}/modules/{wildcards.dataset}/{wildcards.model}/{name}/seed{wildcards.seed}/modules.safetensors"
        for name in sensitivity_reference_names(wildcards)
    ]

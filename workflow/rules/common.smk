import json
import os
from pathlib import Path

from dnnmod.approaches import APPROACHES, get_approach
from dnnmod.devices import check_gpu_slots
from dnnmod.job_resources import (
    check_resources_config,
    gpu_rule_resources,
    gpu_rule_threads,
    light_rule_resources,
)
from dnnmod.report import sensitivity
from dnnmod.reuse import newtask, patching
from dnnmod.study import (
    check_study_config,
    expand_base_models,
    expand_modularizations,
    modularization_hyperparameters,
)
from dnnmod.training.objectives import StandardTraining, training_kinds

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


onstart:
    # --resources gpu=N with a torch that cannot use the GPUs fails here, before any job (not in
    # dry runs, nor in the per-job Snakemake of a cluster job, which runs without hooks).
    gpu_slots = workflow.global_resources.get("gpu")
    check_gpu_slots(
        gpu_slots.value if gpu_slots is not None else 0, config["device"]
    )


wildcard_constraints:
    dataset=r"[a-z0-9_]+",
    model=r"[a-z0-9_.\-]+",
    seed=r"\d+",
    approach="|".join(APPROACHES),


def model_entry(wildcards):
    return config["models"][wildcards.model]


def recipe_of(wildcards):
    """The recipe of a base model, or of an E4 Dirichlet pool member (trained on its task)."""
    key = (wildcards.dataset, wildcards.model)
    return config["recipes"][BASE_MODELS.get(key) or NEW_TASK_POOL_RECIPES[key]]


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
    if PATCHING:
        outputs += [
            f"{RESULTS}/tables/e3_patching.csv",
            f"{RESULTS}/figures/e3_patching.png",
            f"{RESULTS}/metrics/e3_patching.json",
        ]
    if NEW_TASKS:
        outputs += [
            f"{RESULTS}/tables/e4_new_tasks.csv",
            f"{RESULTS}/figures/e4_new_tasks.png",
            f"{RESULTS}/metrics/e4_new_tasks.json",
        ]
    if SUBTASKS is not None and MODULARIZATIONS:
        outputs += [
            f"{RESULTS}/tables/e5_subtask_reuse.csv",
            f"{RESULTS}/figures/e5_subtask_reuse.png",
            f"{RESULTS}/metrics/e5_subtask_reuse.json",
        ]
    if pan_rajan_costs():
        outputs += [
            f"{RESULTS}/tables/pan_rajan_decomposition.csv",
            f"{RESULTS}/metrics/pan_rajan_decomposition.json",
        ]
    if REPLACEMENTS:
        outputs += [
            f"{RESULTS}/tables/e6_replacement.csv",
            f"{RESULTS}/figures/e6_replacement.png",
            f"{RESULTS}/metrics/e6_replacement.json",
        ]
    if SENSITIVITY:
        outputs += [
            f"{RESULTS}/tables/e7_sensitivity.csv",
            f"{RESULTS}/figures/e7_sensitivity.png",
            f"{RESULTS}/metrics/e7_sensitivity.json",
        ]
    outputs += [
        f"{RESULTS}/figures/e7_{curve}.png"
        for curve in TRAINING_CURVES
        if training_curve_inputs(curve)
    ]
    # Last: the cost table and the HTML report read everything above (report_inputs).
    outputs += report_outputs()
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
    spec = TASKS[wildcards.task]
    sources = [f"{DATA}/{part['dataset']}/images.safetensors" for part in spec["parts"]]
    if "dirichlet" in spec:  # drawn from a training split (E4's Dirichlet pool members)
        sources += [
            f"{DATA}/{part['dataset']}/splits/seed{spec['dirichlet']['split_seed']}.safetensors"
            for part in spec["parts"]
        ]
    return list(dict.fromkeys(sources))


# E3 patching: weak models per (setting, strong model, weak type, target class), each patched
# with the target-class module of every approach that decomposes the strong model.

PATCHING = patching.patching_config(config)


def weak_model_weights(setting, model, weak_type, target_class, seed):
    return f"{RESULTS}/patching/weak/{setting}/{model}/{weak_type}/tc{target_class}/seed{seed}/model.safetensors"


def weak_task_of(wildcards):
    return patching.weak_task_name(wildcards.setting, int(wildcards.target_class))


def weak_model_entry(wildcards):
    name = patching.weak_model_name(
        config, wildcards.setting, wildcards.model, wildcards.weak_type
    )
    return config["models"][name]


def weak_models_of(wildcards):
    """(weak type, weights) of every weak model of a setting's strong model."""
    return [
        (
            weak_type,
            weak_model_weights(
                wildcards.setting, wildcards.model, weak_type, tc, wildcards.seed
            ),
        )
        for tc in PATCHING["settings"][wildcards.setting]["target_classes"]
        for weak_type in patching.WEAK_TYPES
    ]


def weak_task_splits(wildcards):
    return [
        f"{DATA}/{patching.weak_task_name(wildcards.setting, tc)}/splits/seed{wildcards.seed}.safetensors"
        for tc in PATCHING["settings"][wildcards.setting]["target_classes"]
    ]


def patched_modules(wildcards):
    """The module set a patch reads, and the strong model it was cut from."""
    dataset = PATCHING["settings"][wildcards.setting]["dataset"]
    return {
        "modules": f"{RESULTS}/modules/{dataset}/{wildcards.model}/{wildcards.approach}/seed{wildcards.seed}/modules.safetensors",
        "strong": model_weights(
            dataset, wildcards.model, training_of(wildcards.approach), wildcards.seed
        ),
    }


def patching_metrics():
    if not PATCHING:
        return []
    return [
        f"{RESULTS}/patching/{name}/{model}/{approach}/seed{seed}/metrics.json"
        for name, setting in PATCHING["settings"].items()
        for model in setting["models"]
        for approach in patching.patched_approaches(config, setting["dataset"], model)
        for seed in SEEDS
    ]


# E4 new tasks (reuse.new_tasks): per setting, class pairs composed from the modules chosen by
# best binary F1 among each approach's module sets of the pool models, against the setting's
# model trained from scratch on each pair.

NEW_TASKS = newtask.plan_new_tasks(config, MODULARIZATIONS)
NEW_TASK_PAIRS = {pair.task: pair for plan in NEW_TASKS.values() for pair in plan.pairs}
# Each pair is a derived task (derive_task makes it): the scratch baseline trains on it and
# both the baseline and the composed model are tested on its test images.
TASKS.update({task: pair.task_spec() for task, pair in NEW_TASK_PAIRS.items()})
# GradSplitter's Dirichlet pools: each member is a derived task per seed (a class-imbalanced
# draw from the dataset's training split of that seed), trained like a base model
# (train_base_model) and decomposed by modularize, but kept out of E1/E2/E5.
TASKS.update(newtask.pool_tasks(NEW_TASKS, SEEDS))
NEW_TASK_POOL_RECIPES = newtask.pool_recipes(NEW_TASKS, SEEDS)


def new_task_scratch_weights(task, model, seed):
    return f"{RESULTS}/new_tasks/scratch/{task}/{model}/seed{seed}/model.safetensors"


def new_task_candidates(wildcards):
    """(module set, base model) of every candidate of a setting and approach, in pool order
    (a Dirichlet pool member's model trained on its task)."""
    approach, seed = wildcards.approach, wildcards.seed
    return [
        (
            f"{RESULTS}/modules/{dataset}/{model}/{approach}/seed{seed}/modules.safetensors",
            model_weights(dataset, model, training_of(approach), seed),
        )
        for dataset, model in NEW_TASKS[wildcards.setting].trained_models(
            approach, int(seed)
        )
    ]


def new_task_inputs(wildcards):
    """What composing a setting's pairs reads: the candidates, the selection splits of the
    two datasets, the pairs' derived tasks (their test images) and the Dirichlet pool
    members' tasks (their meta.json names the dataset a member's modules stand for)."""
    plan = NEW_TASKS[wildcards.setting]
    candidates = new_task_candidates(wildcards)
    return {
        "modules": [modules for modules, _ in candidates],
        "models": [weights for _, weights in candidates],
        "splits": [
            f"{DATA}/{dataset}/splits/seed{wildcards.seed}.safetensors"
            for dataset in dict.fromkeys(plan.datasets)
        ],
        "pairs": [f"{DATA}/{pair.task}/images.safetensors" for pair in plan.pairs],
        "pool_tasks": [
            f"{DATA}/{member.task(int(wildcards.seed))}/meta.json"
            for member in plan.members.get(wildcards.approach, ())
        ],
    }


def new_task_composed():
    return [
        f"{RESULTS}/new_tasks/{name}/{approach}/seed{seed}/composed.json"
        for name, plan in NEW_TASKS.items()
        for approach in plan.candidates
        for seed in SEEDS
    ]


def new_task_scratch_models():
    """The from-scratch baseline of every pair of every setting, once per seed."""
    return sorted(
        {
            new_task_scratch_weights(pair.task, plan.model, seed)
            for plan in NEW_TASKS.values()
            for pair in plan.pairs
            for seed in SEEDS
        }
    )


# E5 sub-task reuse (reuse.subtasks; absent = no E5): every module set of the study.


def subtask_config(config):
    """reuse.subtasks, its union approaches checked to be registered and its models and
    datasets to be configured; None when E5 is off."""
    subtasks = config.get("reuse", {}).get("subtasks")
    if subtasks is not None:
        unknown = sorted(set(subtasks.get("union_approaches", [])) - set(APPROACHES))
        if unknown:
            raise ValueError(
                f"reuse.subtasks.union_approaches: unknown approaches {unknown}; "
                f"known: {', '.join(sorted(APPROACHES))}"
            )
        configured = {
            "models": set(config["models"]),
            "datasets": set(config["datasets"]) | set(config.get("tasks", {})),
        }
        for key, known in configured.items():
            unknown = sorted(set(subtasks.get(key, [])) - known)
            if unknown:
                raise ValueError(
                    f"reuse.subtasks.{key}: unknown {key} {unknown}; "
                    f"known: {', '.join(sorted(known))}"
                )
    return subtasks


SUBTASKS = subtask_config(config)


def subtask_settings(approach):
    """What one E5 unit reads of reuse.subtasks: union networks are built only for the
    approaches that compose sub-tasks as union networks (union_approaches)."""
    settings = {
        k: v
        for k, v in SUBTASKS.items()
        if k not in ("union_approaches", "models", "datasets")
    }
    if approach not in SUBTASKS["union_approaches"]:
        settings["union_subsets"] = 0
    return settings


def st_model_weights(wildcards):
    """The standard-trained model of a module set's architecture, dataset and seed."""
    return model_weights(
        wildcards.dataset, wildcards.model, StandardTraining.name, wildcards.seed
    )


def subtask_tables():
    return [
        f"{RESULTS}/reuse/subtasks/{dataset}/{model}/{approach}/seed{seed}/subtasks.csv"
        for (approach, dataset, model) in MODULARIZATIONS
        if model in (SUBTASKS or {}).get("models", [model])
        and dataset in (SUBTASKS or {}).get("datasets", [dataset])
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


# E6 replacement (reuse.replacement; absent = no E6): per pair of a weaker and a stronger
# model of one dataset and per approach, both decomposed by a modularize entry.


def replacement_units(config):
    """(approach, dataset, weaker, stronger) of every E6 unit, checked to have module sets."""
    replacement = config.get("reuse", {}).get("replacement")
    if replacement is None:
        return []
    decomposed = set(MODULARIZATIONS)
    units = []
    for position, pair in enumerate(replacement["pairs"]):
        for approach in replacement.get("approaches", ["pan_rajan"]):
            for role in ("weaker", "stronger"):
                if (approach, pair["dataset"], pair[role]) not in decomposed:
                    raise ValueError(
                        f"reuse.replacement.pairs[{position}].{role}: no modularize entry "
                        f"makes {approach} modules of {pair[role]} on {pair['dataset']} "
                        "(add one under modularize)"
                    )
            units.append((approach, pair["dataset"], pair["weaker"], pair["stronger"]))
    return units


REPLACEMENTS = replacement_units(config)


def replacement_records():
    return [
        f"{RESULTS}/reuse/replacement/{dataset}/{approach}/{weaker}/{stronger}/seed{seed}.json"
        for (approach, dataset, weaker, stronger) in REPLACEMENTS
        for seed in SEEDS
    ]


def replacement_weights(role):
    """Input function: the weights of the weaker or the stronger model of an E6 unit."""

    def weights(wildcards):
        return model_weights(
            wildcards.dataset,
            getattr(wildcards, role),
            training_of(wildcards.approach),
            wildcards.seed,
        )

    return weights


def replacement_modules(role):
    """Input function: the module set of the weaker or the stronger model of an E6 unit."""

    def modules(wildcards):
        return (
            f"{RESULTS}/modules/{wildcards.dataset}/{getattr(wildcards, role)}/"
            f"{wildcards.approach}/seed{wildcards.seed}/modules.safetensors"
        )

    return modules


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


# Training curves (E7's figures): the study's runs of each approach, and its sweep points.
TRAINING_CURVES = {
    "ga_convergence": "cnnsplitter",
    "mask_training": "gradsplitter",
    "modular_training": None,
}


def training_curve_inputs(curve):
    """What a training-curve figure reads: the study's and E7's module sets of its approach,
    or (modular training) their models of every training kind but standard training."""
    if curve == "modular_training":
        paths = [
            model_weights(dataset, model, training, seed)
            for (dataset, model, training) in trained_models()
            if training != StandardTraining.name
            for seed in SEEDS
        ]
        paths += [
            sensitivity_weights(point, seed)
            for point, seed in sensitivity_units()
            if point.stage == sensitivity.TRAINING
        ]
    else:
        approach = TRAINING_CURVES[curve]
        paths = [
            f"{RESULTS}/modules/{dataset}/{model}/{approach}/seed{seed}/modules.safetensors"
            for (name, dataset, model) in MODULARIZATIONS
            if name == approach
            for seed in SEEDS
        ]
        paths += [
            sensitivity_modules(point, seed)
            for point, seed in sensitivity_units()
            if point.approach == approach
        ]
    return list(dict.fromkeys(paths))


# The study report (report.smk): E8 cost from every job's benchmark file, then one HTML file.
# Both run after every other table and figure of all_outputs(), whatever experiment adds them.

COST_OUTPUTS = [
    f"{RESULTS}/tables/e8_cost.csv",
    f"{RESULTS}/figures/e8_energy.png",
    f"{RESULTS}/metrics/e8_cost.json",
]
REPORT_HTML = f"{RESULTS}/report.html"


def report_outputs():
    return [*COST_OUTPUTS, REPORT_HTML]


def study_outputs():
    """Every table, figure and metrics file of the study but the report's own."""
    return [path for path in all_outputs() if path not in report_outputs()]


def report_captions():
    """The captions the HTML report shows (a changed caption rebuilds the report only)."""
    return sorted(str(path) for path in Path("workflow/report").glob("*.rst"))

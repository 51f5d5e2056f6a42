# Reuse helpers: E3 patching (reuse_patching.smk), E4 new tasks (reuse_newtask.smk), E5
# sub-tasks (reuse_subtasks.smk), E6 replacement (reuse_replacement.smk).

from dnnmod.approaches import APPROACHES
from dnnmod.reuse import newtask, patching

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


def subtask_tables():
    return [
        f"{RESULTS}/reuse/subtasks/{dataset}/{model}/{approach}/seed{seed}/subtasks.csv"
        for (approach, dataset, model) in MODULARIZATIONS
        if model in (SUBTASKS or {}).get("models", [model])
        and dataset in (SUBTASKS or {}).get("datasets", [dataset])
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

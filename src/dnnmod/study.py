"""Checks of a study configuration that a JSON schema cannot express.

The schema (workflow/schemas/config.schema.yaml) fixes types and shapes; here every name a
study refers to must resolve: datasets and architectures must be registered, base models must
name a configured model, dataset (or task) and recipe, tasks must take valid classes of
configured datasets. Errors name the config key at fault.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from dnnmod.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from dnnmod.data.registry import ClassInventory


def expand_base_models(config: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(dataset, model) → recipe name for every base model of the study."""
    expanded: dict[tuple[str, str], str] = {}
    for position, entry in enumerate(config["base_models"]):
        for model in entry["models"]:
            key = (entry["dataset"], model)
            if key in expanded:
                raise ConfigError(f"base_models[{position}]: {model} on {entry['dataset']} "
                                  "is listed twice")
            expanded[key] = entry["recipe"]
    return expanded


def expand_modularizations(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(approach, dataset, model) for every module set the study makes."""
    return [(entry["approach"], entry["dataset"], model)
            for entry in config.get("modularize", []) for model in entry["models"]]


def modularization_hyperparameters(config: dict[str, Any], approach: str, dataset: str,
                                   model: str) -> dict[str, Any]:
    """The hyperparameter overrides ``approach`` decomposes ``model`` on ``dataset`` with:
    ``approaches.<approach>``, then the ``hyperparameters`` of the modularize entry that makes
    that module set (an author's setting per model and dataset)."""
    overrides = dict(config.get("approaches", {}).get(approach) or {})
    for entry in config.get("modularize", []):
        if (entry["approach"], entry["dataset"]) == (approach, dataset) \
                and model in entry["models"]:
            overrides.update(entry.get("hyperparameters") or {})
    return overrides


def study_inventories(config: dict[str, Any]) -> dict[str, ClassInventory]:
    """The classes and images per class of every dataset and task the study configures, known
    before any is prepared; each task is checked against its datasets on the way (ConfigError
    naming the key, the dataset and the value)."""
    from dnnmod.data import DATASETS, Task

    datasets = {name: DATASETS[name].inventory(entry)
                for name, entry in config["datasets"].items() if name in DATASETS}
    fraction = config.get("data", {}).get("validation_fraction", 0.2)
    # a task may not take a dataset's name: from_config
    return datasets | {name: Task.from_config(name, entry).inventory(datasets, fraction)
                       for name, entry in config.get("tasks", {}).items()}


def check_study_config(config: dict[str, Any]) -> None:
    from dnnmod.approaches import APPROACHES, resolve_hyperparameters
    from dnnmod.data import DATASETS
    from dnnmod.deviations import stated_reasons
    from dnnmod.hyperparameters import resolve
    from dnnmod.models import ARCHITECTURES, check_options
    from dnnmod.training.objectives import get_objective
    from dnnmod.training.train import Recipe

    for name, entry in config["datasets"].items():
        if name not in DATASETS:
            raise ConfigError(f"datasets.{name}: {UnknownNameError('dataset', name, DATASETS)}")
        # generator options (shapes'); a downloaded dataset takes none
        resolve(f"datasets.{name}.options", DATASETS[name].default_options,
                (entry or {}).get("options"))
    for name, entry in config["models"].items():
        if entry["arch"] not in ARCHITECTURES:
            raise ConfigError(
                f"models.{name}.arch: {UnknownNameError('model', entry['arch'], ARCHITECTURES)}")
        check_options(entry["arch"], entry.get("options", {}), f"models.{name}.options")
    for name, values in config["recipes"].items():
        try:
            Recipe.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"recipes.{name}: {err}") from None
    tasks = config.get("tasks", {})
    study_inventories(config)  # tasks: their classes and images per class fit their datasets
    for position, entry in enumerate(config["base_models"]):
        where = f"base_models[{position}]"
        if entry["dataset"] not in config["datasets"] and entry["dataset"] not in tasks:
            raise ConfigError(f"{where}.dataset: {entry['dataset']!r} has no entry under "
                              f"datasets (configured: {sorted(config['datasets'])}) or tasks "
                              f"(configured: {sorted(tasks)})")
        if entry["recipe"] not in config["recipes"]:
            raise ConfigError(f"{where}.recipe: {entry['recipe']!r} is not defined under "
                              f"recipes (defined: {sorted(config['recipes'])})")
        for model in entry["models"]:
            if model not in config["models"]:
                raise ConfigError(f"{where}.models: {model!r} is not defined under models "
                                  f"(defined: {sorted(config['models'])})")
    for kind, values in config.get("objectives", {}).items():
        try:
            get_objective(kind, values)  # its own errors name objectives.<kind>
        except UnknownNameError as err:
            raise ConfigError(f"objectives.{kind}: {err}") from None
    stated_reasons(config)  # deviations: each names a setting of the papers' reference
    base_models = expand_base_models(config)
    for name, values in config.get("approaches", {}).items():
        if name not in APPROACHES:
            raise ConfigError(f"approaches.{name}: "
                              f"{UnknownNameError('approach', name, APPROACHES)}")
        resolve_hyperparameters(name, values)
    made: dict[tuple[str, str, str], str] = {}
    for position, entry in enumerate(config.get("modularize", [])):
        where = f"modularize[{position}]"
        if entry["approach"] not in APPROACHES:
            raise ConfigError(f"{where}.approach: "
                              f"{UnknownNameError('approach', entry['approach'], APPROACHES)}")
        for model in entry["models"]:
            if (entry["dataset"], model) not in base_models:
                raise ConfigError(f"{where}: {model} on {entry['dataset']} is not a base model "
                                  "of this study (add it under base_models)")
            key = (entry["approach"], entry["dataset"], model)
            if key in made:  # its hyperparameters would be ambiguous
                raise ConfigError(f"{where}.models: {entry['approach']} decomposes {model} on "
                                  f"{entry['dataset']} in {made[key]} already")
            made[key] = where
        if entry.get("hyperparameters"):
            _check_entry_hyperparameters(config, entry, where)
    decomposed = set(expand_modularizations(config))
    for approach, dataset, model in sorted(decomposed):
        hyperparameters = resolve_hyperparameters(approach, config.get("approaches", {}).get(
            approach))
        for reference in APPROACHES[approach].references(hyperparameters):
            if (reference, dataset, model) not in decomposed:
                raise ConfigError(f"approaches.{approach}: reads the {reference} modules of "
                                  f"{model} on {dataset}, which no modularize entry makes "
                                  f"(add {reference} for {model} on {dataset})")


def _check_entry_hyperparameters(config: dict[str, Any], entry: dict[str, Any],
                                 where: str) -> None:
    """A modularize entry's hyperparameters over the study's: valid, and not changing which
    module sets the approach reads or which training kind its model has (one model and one
    set of references per approach, which the workflow's rules share)."""
    from dnnmod.approaches import APPROACHES, resolve_hyperparameters

    name = entry["approach"]
    study = config.get("approaches", {}).get(name) or {}
    try:
        merged = resolve_hyperparameters(name, {**study, **entry["hyperparameters"]})
    except ConfigError as err:
        raise ConfigError(str(err).replace(f"approaches.{name}", f"{where}.hyperparameters")
                          ) from None
    approach, default = APPROACHES[name], resolve_hyperparameters(name, study)
    if (approach.references(merged) != approach.references(default)
            or approach.training_for(merged) != approach.training_for(default)):
        raise ConfigError(f"{where}.hyperparameters: would change the module sets {name} reads "
                          f"or the training of the model it decomposes; set that under "
                          f"approaches.{name}")


# ---------------------------------------------------------------- the paper-shaped study

# What `shrink_study` keeps small. Counts of the paper config above these become these;
# widths are multiplied by SHRUNK_WIDTH (but keep MIN_CHANNELS in every conv layer).
SHRUNK_EPOCHS = 2
# Batches of 8: 20 steps an epoch on the 160 training images of a 10-class archive. At 32 (5
# steps an epoch) nearly every shrunk model stayed at chance level, whatever the images.
SHRUNK_BATCH_SIZE = 8
SHRUNK_WIDTH = 0.25
MIN_CHANNELS = 4
SHRUNK_PAIRS = 2            # E4 pairs per setting
SHRUNK_POOL_MEMBERS = 2     # E4 Dirichlet-pool models per dataset
SHRUNK_TARGET_CLASSES = 1   # E3 weak tasks per setting
SHRUNK_SWEEP_VALUES = 2     # E7 values per sweep
SHRUNK_UNION_SUBSETS = 2    # E5 union networks fine-tuned per module set
SHRUNK_SAMPLES_PER_SIZE = 1  # E5 sub-tasks drawn per size on many classes
# Approach hyperparameters that count work (generations, rounds, epochs, images), shrunk.
SHRUNK_APPROACHES: dict[str, dict[str, Any]] = {
    "cnnsplitter": {"population": 4, "generations": 2, "parents": 2, "elites": 1,
                    "survivors": [2, 8]},
    # The distance a kernel score can travel in a mask phase kept at the reference's (Adam at
    # 0.001 over 5 epochs of CIFAR-10 in batches of 64: about 3.5; mask_travel, as the demo's).
    # At the mask lr itself the 20 steps of a shrunk phase (160 images, batches of 8) move a
    # score, initially 1, by at most 0.02: the paper-shaped run never dropped a kernel.
    # Measured with 3.5 (2026-12-06): its mask epochs keep 76-80 % of the kernels, and the
    # selection rule (within 1 pp of the base model) picks rescnn's 81 % and SVHN-5 simcnn's 13 %.
    "gradsplitter": {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1, "head_epochs": 1,
                     "batch_size": SHRUNK_BATCH_SIZE, "mask_travel": 3.5},
    "mwt": {"metric_samples": 4},
}


def shrink_study(paper: dict[str, Any], manifest: dict[str, Any], mirror: str, *,
                 study: str = "paper_shaped", data_root: str | None = None) -> dict[str, Any]:
    """A study with every path of ``paper`` and small sizes: the paper-shaped run.

    Kept at least once: every rule the paper's DAG runs, every architecture, approach, recipe
    (so every schedule kind and training kind), dataset and task (so every class count and
    download format), approach-architecture and approach-dataset pair of its module sets,
    every reuse setting kind and every sensitivity sweep. Shrunk: images (the archives of
    ``manifest``, written by dnnmod.data.official_archives and served at ``mirror``), epochs,
    batch sizes, widths, approach search budgets, generations, pool members, pairs, target
    classes, sub-task samples, sweep values and seeds.
    """
    datasets = manifest["datasets"]
    missing = sorted(set(paper["datasets"]) - set(datasets))
    if missing:
        raise ConfigError(f"the archive manifest has no {', '.join(missing)}; write them with "
                          "`dnnmod data archives`")
    per_class = dict(manifest["per_class"])  # images per class and split, of each dataset
    for name, task in paper.get("tasks", {}).items():
        per_class[name] = {split: min(per_class[part["dataset"]][split] for part in task["parts"])
                           for split in ("train", "test")}
    reuse = _shrink_reuse(paper.get("reuse", {}), per_class)
    sweeps = [{**sweep, "models": sweep["models"][:1],
               "values": sweep["values"][:SHRUNK_SWEEP_VALUES]}
              for sweep in paper.get("sensitivity", {}).get("sweeps", [])]
    modularize = _cover_modularizations(paper, _required_modularizations(paper, reuse, sweeps))
    needed = {(dataset, model) for _, dataset, model in modularize}
    needed |= _reuse_base_models(reuse)
    base_models = [{**entry, "models": models} for entry in paper["base_models"]
                   if (models := [m for m in entry["models"] if (entry["dataset"], m) in needed])]
    used_models = {model for entry in base_models for model in entry["models"]}
    used_models |= _reuse_models(reuse)
    shrunk: dict[str, Any] = {
        **paper,
        "study": study,
        "seeds": paper["seeds"][:1],
        "device": "cpu",
        "data": {**paper.get("data", {}), **({"root": data_root} if data_root else {})},
        "datasets": {name: _mirrored(datasets[name], mirror) for name in paper["datasets"]},
        "models": {name: _narrow(entry) for name, entry in paper["models"].items()
                   if name in used_models},
        "recipes": {name: _short_recipe(recipe) for name, recipe in paper["recipes"].items()},
        "base_models": base_models,
        "approaches": {name: _shrunk_hyperparameters(name, values, fill=True)
                       for name, values in paper.get("approaches", {}).items()},
        "modularize": _group_modularizations(paper, modularize),
        "reuse": reuse,
        "threads": {kind: 1 for kind in paper.get("threads", {})},
        # the paper's reasons, and one for every size shrunk here
        "deviations": {**paper.get("deviations", {}),
                       "*": "the paper-shaped run: the paper-scale study's paths at small sizes"},
    }
    if "sensitivity" in paper:
        shrunk["sensitivity"] = {**paper["sensitivity"], "sweeps": sweeps}
    # the approaches: the paper's overrides, and the search budgets shrunk for the others too
    for name, values in SHRUNK_APPROACHES.items():
        shrunk["approaches"].setdefault(name, dict(values))
    return shrunk


def _larger(paper_value: Any, shrunk_value: Any) -> bool:
    if isinstance(paper_value, list):
        return paper_value > shrunk_value
    return paper_value is None or paper_value > shrunk_value


def _mirrored(files: dict[str, dict[str, str]], mirror: str) -> dict[str, Any]:
    return {"mirror": mirror, "files": {key: {"md5": entry["md5"]} for key, entry in files.items()}}


def _narrow(entry: dict[str, Any]) -> dict[str, Any]:
    """The model at SHRUNK_WIDTH of its width, widened where its narrowest conv layer would
    keep fewer than MIN_CHANNELS channels."""
    from torch import nn

    from dnnmod.models import build_model

    model = build_model(entry["arch"], 10, 1.0, **entry.get("options", {}))
    narrowest = min(layer.out_channels for layer in model.modules()
                    if isinstance(layer, nn.Conv2d))
    width = entry.get("width", 1.0) * min(1.0, max(SHRUNK_WIDTH, MIN_CHANNELS / narrowest))
    return {**entry, "width": round(width, 4)}


def _short_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` in at most SHRUNK_EPOCHS epochs of batches of at most SHRUNK_BATCH_SIZE;
    step milestones scaled to the new length (at least one stays), patience at most 1."""
    epochs = min(recipe["epochs"], SHRUNK_EPOCHS)
    short = {**recipe, "epochs": epochs,
             "batch_size": min(recipe.get("batch_size", SHRUNK_BATCH_SIZE), SHRUNK_BATCH_SIZE)}
    if recipe.get("milestones"):
        scaled = {min(epochs - 1, max(1, round(m * epochs / recipe["epochs"])))
                  for m in recipe["milestones"]}
        short["milestones"] = sorted(scaled)
    if recipe.get("patience") is not None:
        short["patience"] = min(recipe["patience"], 1)
    return short


def _shrink_reuse(reuse: dict[str, Any],
                  per_class: dict[str, dict[str, int]]) -> dict[str, Any]:
    shrunk: dict[str, Any] = {}
    if "replacement" in reuse:  # one pair per dataset
        pairs = {pair["dataset"]: pair for pair in reversed(reuse["replacement"]["pairs"])}
        shrunk["replacement"] = {**reuse["replacement"], "pairs": [
            pair for pair in reuse["replacement"]["pairs"] if pairs[pair["dataset"]] is pair]}
    if "patching" in reuse:
        shrunk["patching"] = _shrink_patching(reuse["patching"], per_class)
    if "subtasks" in reuse:
        subtasks = reuse["subtasks"]
        shrunk["subtasks"] = {**subtasks, **{key: min(subtasks.get(key, value), value) for key,
                                             value in (("samples_per_size",
                                                        SHRUNK_SAMPLES_PER_SIZE),
                                                       ("union_subsets", SHRUNK_UNION_SUBSETS),
                                                       ("fine_tune_epochs", 1))}}
    if "new_tasks" in reuse:
        shrunk["new_tasks"] = _shrink_new_tasks(reuse["new_tasks"], per_class)
    return {**reuse, **shrunk}


def _shrink_patching(patching: dict[str, Any],
                     per_class: dict[str, dict[str, int]]) -> dict[str, Any]:
    """One target class per setting; of its strong models those that bring an architecture
    (strong or weak) no earlier kept one has; per-class counts within the archives."""
    settings, architectures = {}, set()
    for name, setting in patching["settings"].items():
        limits = {split: min(per_class[setting["dataset"]][split],
                             per_class[setting["others"]["dataset"]][split])
                  for split in ("train", "test")}
        models = {}
        for strong, weak in setting["models"].items():
            brings = {strong, *weak.values()} - architectures
            if brings or not models:
                models[strong] = weak
                architectures |= brings
        settings[name] = {**setting, "models": models,
                          "target_classes": setting["target_classes"][:SHRUNK_TARGET_CLASSES]}
        for key in ("samples_per_class", "target_samples_per_class"):
            if key in setting:
                settings[name][key] = {split: min(count, limits[split])
                                       for split, count in setting[key].items()}
    shrunk = {**patching, "settings": settings}
    if "calibration_layer" in patching:
        layer = patching["calibration_layer"]
        shrunk["calibration_layer"] = {**layer, "epochs": min(layer.get("epochs", 20), 1),
                                       "batch_size": min(layer.get("batch_size", 128),
                                                         SHRUNK_BATCH_SIZE)}
    return shrunk


def _new_task_kind(setting: dict[str, Any]) -> tuple:
    """What makes an E4 setting a different path: its datasets and its optional parts."""
    return (tuple(setting["datasets"]),
            tuple(sorted(set(setting) - {"datasets", "model", "pairs", "max_pairs",
                                         "pair_seed", "pool"})))


def _shrink_new_tasks(new_tasks: dict[str, Any],
                      per_class: dict[str, dict[str, int]]) -> dict[str, Any]:
    """One setting of each kind, SHRUNK_PAIRS pairs each, a Dirichlet pool of
    SHRUNK_POOL_MEMBERS members whose least class count fits the archives."""
    settings, kinds = {}, set()
    for name, setting in new_tasks["settings"].items():
        kind = _new_task_kind(setting)
        if kind in kinds:
            continue
        kinds.add(kind)
        shrunk = dict(setting)
        if shrunk.get("pairs", "all") == "all":
            shrunk["max_pairs"] = min(shrunk.get("max_pairs", SHRUNK_PAIRS), SHRUNK_PAIRS)
        else:
            shrunk["pairs"] = shrunk["pairs"][:SHRUNK_PAIRS]
        if "continuous_learning" in shrunk:
            shrunk["continuous_learning"] = {**shrunk["continuous_learning"], "epochs": 1}
        if "dirichlet_pool" in shrunk:
            pool = shrunk["dirichlet_pool"]
            least = pool.get("min_per_class", 1)
            fit = {dataset: max(1, per_class[dataset]["train"] // 4)
                   for dataset in setting["datasets"]}
            shrunk["dirichlet_pool"] = {
                **pool, "members": min(pool.get("members", 10), SHRUNK_POOL_MEMBERS),
                "min_per_class": ({key: min(value, fit[key]) for key, value in least.items()}
                                  if isinstance(least, dict) else min(least, *fit.values()))}
        settings[name] = shrunk
    return {**new_tasks, "settings": settings}


def _reuse_base_models(reuse: dict[str, Any]) -> set[tuple[str, str]]:
    """(dataset, model) of every base model the reuse settings name."""
    needed = set()
    for pair in reuse.get("replacement", {}).get("pairs", []):
        needed |= {(pair["dataset"], pair["weaker"]), (pair["dataset"], pair["stronger"])}
    for setting in reuse.get("patching", {}).get("settings", {}).values():
        needed |= {(setting["dataset"], strong) for strong in setting["models"]}
    for setting in reuse.get("new_tasks", {}).get("settings", {}).values():
        needed |= {(dataset, model) for dataset in setting["datasets"]
                   for model in setting.get("pool", [setting["model"]])}
    return needed


def _reuse_models(reuse: dict[str, Any]) -> set[str]:
    """Models the reuse settings train besides base models: weak and from-scratch models."""
    models = {setting["model"] for setting in
              reuse.get("new_tasks", {}).get("settings", {}).values()}
    for setting in reuse.get("patching", {}).get("settings", {}).values():
        models |= {name for weak in setting["models"].values() for name in weak.values()}
    return models


def _required_modularizations(paper: dict[str, Any], reuse: dict[str, Any],
                              sweeps: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The module sets the kept reuse settings and sweeps read: of the paper's, those of each
    swept or replaced model, of the pool approaches of E4 settings, and one approach's for
    each strong model of E3 and each E4 setting."""
    paper_sets = expand_modularizations(paper)
    required = [(sweep["approach"], sweep["dataset"], model)
                for sweep in sweeps for model in sweep["models"]]
    replacement = reuse.get("replacement", {})
    for pair in replacement.get("pairs", []):
        required += [(approach, pair["dataset"], pair[role])
                     for approach in replacement.get("approaches", ["pan_rajan"])
                     for role in ("weaker", "stronger")]
    for setting in reuse.get("patching", {}).get("settings", {}).values():
        for strong in setting["models"]:
            required += [next(entry for entry in paper_sets
                              if entry[1:] == (setting["dataset"], strong))]
    for setting in reuse.get("new_tasks", {}).get("settings", {}).values():
        first_dataset, second_dataset = setting["datasets"]
        for model in setting.get("pool", [setting["model"]]):
            both = [approach for approach, dataset, name in paper_sets
                    if name == model and dataset == first_dataset
                    and (approach, second_dataset, model) in paper_sets]
            approaches = setting.get("dirichlet_pool", {}).get("approaches", both[:1])
            required += [(approach, dataset, model) for approach in approaches
                         for dataset in setting["datasets"]]
    return list(dict.fromkeys(required))


def _cover_modularizations(paper: dict[str, Any],
                           required: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``required`` and, in the paper's order, each module set of the paper that brings an
    approach-architecture or approach-dataset pair not yet kept; with the module sets each
    kept one reads (a random control reads its approach's)."""
    from dnnmod.approaches import APPROACHES, resolve_hyperparameters

    paper_sets = expand_modularizations(paper)
    unknown = sorted(set(required) - set(paper_sets))
    if unknown:
        raise ConfigError(f"the paper config makes no module sets {unknown}, which its reuse "
                          "settings read")
    arch = {name: entry["arch"] for name, entry in paper["models"].items()}
    kept: dict[tuple[str, str, str], None] = {}
    covered: set[tuple[str, str, str]] = set()

    def keep(entry: tuple[str, str, str]) -> None:
        approach, dataset, model = entry
        hyperparameters = resolve_hyperparameters(approach,
                                                  paper.get("approaches", {}).get(approach))
        for reference in APPROACHES[approach].references(hyperparameters):
            keep((reference, dataset, model))
        kept[entry] = None
        covered.update({("arch", approach, arch[model]), ("dataset", approach, dataset)})

    for entry in required:
        keep(entry)
    for entry in paper_sets:
        approach, dataset, model = entry
        if {("arch", approach, arch[model]), ("dataset", approach, dataset)} - covered:
            keep(entry)
    return [entry for entry in paper_sets if entry in kept]


def _shrunk_hyperparameters(approach: str, values: dict[str, Any], *,
                            fill: bool) -> dict[str, Any]:
    """``values`` with SHRUNK_APPROACHES' work counts where they are larger (``fill``: and
    where they are missing)."""
    small = SHRUNK_APPROACHES.get(approach, {})
    return {**values, **{key: value for key, value in small.items()
                         if key in values and _larger(values[key], value)
                         or fill and key not in values}}


def _group_modularizations(paper: dict[str, Any],
                           sets: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """modularize entries, one per (approach, dataset) and the hyperparameters of the paper's
    entry making each set (their work counts shrunk), models in order."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    overrides: dict[tuple[str, str, str], dict[str, Any]] = {}
    for approach, dataset, model in sets:
        entry = next(entry for entry in paper.get("modularize", [])
                     if (entry["approach"], entry["dataset"]) == (approach, dataset)
                     and model in entry["models"])
        hyperparameters = _shrunk_hyperparameters(approach, entry.get("hyperparameters", {}),
                                                  fill=False)
        key = (approach, dataset, json.dumps(hyperparameters, sort_keys=True))
        grouped.setdefault(key, []).append(model)
        overrides[key] = hyperparameters
    entries = []
    for key, models in grouped.items():
        approach, dataset, _ = key
        entries.append({"approach": approach, "dataset": dataset, "models": models,
                        **({"hyperparameters": overrides[key]} if overrides[key] else {})})
    return entries

"""Checks of a study configuration that a JSON schema cannot express.

The schema (workflow/schemas/config.schema.yaml) fixes types and shapes; here every name a
study refers to must resolve: datasets and architectures must be registered, base models must
name a configured model, dataset (or task) and recipe, tasks must take valid classes of
configured datasets. Errors name the config key at fault.
"""

from __future__ import annotations

from typing import Any

from dnnmod.errors import ConfigError, UnknownNameError


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


def check_study_config(config: dict[str, Any]) -> None:
    from dnnmod.approaches import APPROACHES, resolve_hyperparameters
    from dnnmod.data import DATASETS, Task
    from dnnmod.models import ARCHITECTURES, architecture_options
    from dnnmod.training.objectives import get_objective
    from dnnmod.training.train import Recipe

    for name in config["datasets"]:
        if name not in DATASETS:
            raise ConfigError(f"datasets.{name}: {UnknownNameError('dataset', name, DATASETS)}")
    for name, entry in config["models"].items():
        if entry["arch"] not in ARCHITECTURES:
            raise ConfigError(
                f"models.{name}.arch: {UnknownNameError('model', entry['arch'], ARCHITECTURES)}")
        known_options = architecture_options(entry["arch"])
        for option in entry.get("options", {}):
            if option not in known_options:
                raise ConfigError(f"models.{name}.options: {entry['arch']} has no option "
                                  f"{option!r}; options: {', '.join(known_options) or 'none'}")
    for name, values in config["recipes"].items():
        try:
            Recipe.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"recipes.{name}: {err}") from None
    tasks = config.get("tasks", {})
    for name, entry in tasks.items():  # a task may not take a dataset's name: from_config
        Task.from_config(name, entry).check(
            {dataset: DATASETS[dataset].num_classes for dataset in config["datasets"]})
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
    base_models = expand_base_models(config)
    for name, values in config.get("approaches", {}).items():
        if name not in APPROACHES:
            raise ConfigError(f"approaches.{name}: "
                              f"{UnknownNameError('approach', name, APPROACHES)}")
        resolve_hyperparameters(name, values)
    for position, entry in enumerate(config.get("modularize", [])):
        where = f"modularize[{position}]"
        if entry["approach"] not in APPROACHES:
            raise ConfigError(f"{where}.approach: "
                              f"{UnknownNameError('approach', entry['approach'], APPROACHES)}")
        for model in entry["models"]:
            if (entry["dataset"], model) not in base_models:
                raise ConfigError(f"{where}: {model} on {entry['dataset']} is not a base model "
                                  "of this study (add it under base_models)")
    decomposed = set(expand_modularizations(config))
    for approach, dataset, model in sorted(decomposed):
        hyperparameters = resolve_hyperparameters(approach, config.get("approaches", {}).get(
            approach))
        for reference in APPROACHES[approach].references(hyperparameters):
            if (reference, dataset, model) not in decomposed:
                raise ConfigError(f"approaches.{approach}: reads the {reference} modules of "
                                  f"{model} on {dataset}, which no modularize entry makes "
                                  f"(add {reference} for {model} on {dataset})")

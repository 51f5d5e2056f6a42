"""E3: patching weak models with the target-class module of a strong model.

A weak model is trained on a *weak task*: classes of another dataset plus one target class
(TC) of the strong model's dataset (CIFAR: nine CIFAR-100 classes + one CIFAR-10 class; SVHN:
digits 6-9 + one of the digits 0-4 the strong model knows). Its last part is always the TC, so
the TC is the weak model's last output column. Three weak types:

- ``simple``: a small architecture, weights of its best validation epoch;
- ``overfit``: the full architecture without dropout or augmentation, plain SGD at a constant
  learning rate, weights of the run's last epoch (``epochs`` of the ``full`` recipe);
- ``underfit``: the same run stopped at epoch ``round(underfit_fraction * epochs)``. With a
  constant learning rate and per-epoch seeded shuffling, a run of that many epochs replays the
  long run's first epochs exactly (on the CPU), so it *is* the long run's checkpoint there.

Two patching protocols, chosen per setting (``protocol``, default the section's ``protocol``):
``minmax`` (ASE/TOSEM), below, and ``moda`` (MODA's trained calibration layer, the TC being
MODA's "mixed class"; :mod:`dnnmod.reuse.patching_moda`). Both patch the same weak models with
the same module scores and measure the same metrics.

Patching (min-max protocol): the TC module's score is min-max normalised with the minimum and
maximum of the module's scores on the strong model's validation images of the TC (its
dataset's validation split, as CNNSplitter's module_output_collector takes the per-class fifth
of the strong dataset's training images: about 1,000 on CIFAR-10; ``calibration_images`` caps
the count), then replaces the TC column of the weak model's softmax; the prediction is the
argmax. Deviation from the papers,
stated: calibrated scores are not clipped to [0, 1] (scores beyond the validation range keep
their order; the argmax is what counts). Measured, weak vs patched: TC precision, recall and
F1 (scikit-learn, binary "is it the TC") and accuracy on the non-TC test images. Beside them,
for either protocol, the module's own ROC AUC on the test images (``module_auc``: TC against
the rest, no calibration): what the module knows of the TC, which the patched metrics mix with
where the weak task's TC images fall in the calibration range (an addition of ours; the papers
report the patched metrics only).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dnnmod.errors import ArtifactError, ConfigError, UnknownNameError
from dnnmod.report.patching import WEAK_TYPES
from dnnmod.reuse.patch_scores import compare_predictions, ranking_auc, strong_module_scores

PROTOCOLS = ("minmax", "moda")
#: ``calibration_images`` that takes every validation image of the TC, as the authors do
ALL_IMAGES = "all"


# Configuration: `reuse.patching` (workflow/schemas/config.schema.yaml, config/README.md).


def patching_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The study's ``reuse.patching`` section, or None when the study does not patch."""
    return (config.get("reuse") or {}).get("patching")


def setting_protocol(config: Mapping[str, Any], setting: str) -> str:
    """The patching protocol of a setting: its own ``protocol``, else the section's."""
    section = patching_config(config)
    return section["settings"][setting].get("protocol", section.get("protocol", "minmax"))


def calibration_layer_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The MODA protocol's calibration-layer training, ``reuse.patching.calibration_layer``
    over MODA's defaults."""
    from dnnmod.reuse.patching_moda import resolve_calibration_layer

    return resolve_calibration_layer("reuse.patching.calibration_layer",
                                     patching_config(config).get("calibration_layer"))


def calibration_image_count(config: Mapping[str, Any]) -> int | str:
    """``reuse.patching.calibration_images``: how many of the strong model's validation images
    of the TC give the min-max range (:data:`ALL_IMAGES`, the default: every one)."""
    return patching_config(config).get("calibration_images", ALL_IMAGES)


def protocol_arguments(config: Mapping[str, Any], setting: str) -> str:
    """The ``dnnmod reuse patch`` options of a setting's protocol (shell-quoted)."""
    import json
    import shlex

    protocol = setting_protocol(config, setting)
    if protocol != "moda":
        return f"--protocol {protocol} --calibration-images {calibration_image_count(config)}"
    layer = json.dumps(calibration_layer_settings(config), sort_keys=True)
    return f"--protocol moda --calibration-layer {shlex.quote(layer)}"


def weak_task_name(setting: str, target_class: int) -> str:
    """The derived task a weak model of ``setting`` with target class ``target_class`` trains on."""
    return f"e3_{setting}_tc{target_class}"


def weak_task_spec(setting: Mapping[str, Any], target_class: int) -> dict[str, Any]:
    """The ``tasks`` entry of one weak task: the other classes, then the TC (last part), which
    draws ``target_samples_per_class`` where the setting gives it."""
    target = {"dataset": setting["dataset"], "classes": [target_class]}
    if "target_samples_per_class" in setting:
        target["samples_per_class"] = dict(setting["target_samples_per_class"])
    spec = {"parts": [dict(setting["others"]), target]}
    for key in ("samples_per_class", "seed"):
        if key in setting:
            spec[key] = setting[key]
    return spec


def weak_tasks(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every weak task the study's patching needs, by name (none without ``reuse.patching``)."""
    section = patching_config(config)
    if not section:
        return {}
    return {weak_task_name(name, tc): weak_task_spec(setting, tc)
            for name, setting in section["settings"].items()
            for tc in setting["target_classes"]}


def underfit_epochs(epochs: int, fraction: float) -> int:
    """The underfit checkpoint's epoch: ``round(fraction * epochs)``, at least 1."""
    return max(1, round(fraction * epochs))


def weak_recipe(config: Mapping[str, Any], weak_type: str) -> dict[str, Any]:
    """The training recipe (config values) of a weak type."""
    section = patching_config(config)
    if weak_type not in WEAK_TYPES:
        raise UnknownNameError("weak type", weak_type, WEAK_TYPES)
    if weak_type == "simple":
        return dict(config["recipes"][section["recipes"]["simple"]])
    full = dict(config["recipes"][section["recipes"]["full"]])
    if weak_type == "underfit":
        full["epochs"] = underfit_epochs(full["epochs"], section.get("underfit_fraction", 0.5))
    return full


def weak_model_name(config: Mapping[str, Any], setting: str, model: str, weak_type: str) -> str:
    """The ``models`` entry a weak type of ``model`` uses: its simple or its full architecture."""
    weak = patching_config(config)["settings"][setting]["models"][model]
    return weak["simple" if weak_type == "simple" else "full"]


def patched_approaches(config: Mapping[str, Any], dataset: str, model: str) -> list[str]:
    """Every approach with a module set of ``model`` on ``dataset``: all of them are patched."""
    from dnnmod.study import expand_modularizations

    return sorted({approach for approach, d, m in expand_modularizations(config)
                   if (d, m) == (dataset, model)})


def check_patching_config(config: Mapping[str, Any]) -> None:
    """Names in ``reuse.patching`` resolve, recipes fit the weak-model rules, weak tasks are
    valid; ConfigError naming the key at fault (the schema checks types and shapes)."""
    from dnnmod.data import DATASETS, Task
    from dnnmod.study import expand_base_models, study_inventories

    section = patching_config(config)
    if not section:
        return
    where = "reuse.patching"
    protocols = {where: section.get("protocol", "minmax")}
    protocols |= {f"{where}.settings.{name}": setting["protocol"]
                  for name, setting in section["settings"].items() if "protocol" in setting}
    for key, protocol in protocols.items():
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{key}.protocol: "
                              f"{UnknownNameError('protocol', protocol, PROTOCOLS)}")
    calibration_layer_settings(config)
    recipes = section["recipes"]
    for role, name in recipes.items():
        if name not in config["recipes"]:
            raise ConfigError(f"{where}.recipes.{role}: {name!r} is not defined under recipes "
                              f"(defined: {sorted(config['recipes'])})")
    if config["recipes"][recipes["simple"]].get("selection", "last") != "best_val":
        raise ConfigError(f"{where}.recipes.simple: recipe {recipes['simple']!r} must select the "
                          "best validation epoch (selection: best_val), as the protocol does")
    full = config["recipes"][recipes["full"]]
    rules = [(full.get("schedule", "cosine") == "constant",
              "a constant learning rate (schedule: constant): underfit is the overfit run's "
              "earlier checkpoint, which a shorter run reproduces only at a constant rate"),
             (not full.get("augmentation"), "no augmentation (augmentation: [])"),
             (full.get("selection", "last") == "last", "the last epoch (selection: last)")]
    for ok, rule in rules:
        if not ok:
            raise ConfigError(f"{where}.recipes.full: recipe {recipes['full']!r} must train "
                              f"with {rule}")
    base_models = expand_base_models(config)
    tasks = config.get("tasks") or {}
    sources = study_inventories(config)
    fraction = config.get("data", {}).get("validation_fraction", 0.2)
    for name, setting in section["settings"].items():
        here = f"{where}.settings.{name}"
        dataset = setting["dataset"]
        if dataset not in sources:
            raise ConfigError(f"{here}.dataset: {dataset!r} is not a configured dataset or task")
        for tc in setting["target_classes"]:
            if not 0 <= tc < len(sources[dataset].class_names):
                raise ConfigError(f"{here}.target_classes: class {tc} is out of range: "
                                  f"{dataset} has {len(sources[dataset].class_names)} classes")
        for model, weak in setting["models"].items():
            if (dataset, model) not in base_models:
                raise ConfigError(f"{here}.models.{model}: {model} on {dataset} is not a base "
                                  "model of this study (add it under base_models)")
            if not patched_approaches(config, dataset, model):
                raise ConfigError(f"{here}.models.{model}: no modularize entry decomposes "
                                  f"{model} on {dataset}: there is no module to patch with")
            for role, weak_name in weak.items():
                if weak_name not in config["models"]:
                    raise ConfigError(f"{here}.models.{model}.{role}: {weak_name!r} is not "
                                      f"defined under models (defined: "
                                      f"{sorted(config['models'])})")
        for tc in setting["target_classes"]:
            task_name = weak_task_name(name, tc)
            if task_name in tasks or task_name in DATASETS:
                raise ConfigError(f"{here}: its weak task {task_name!r} clashes with a "
                                  "configured task or dataset of that name")
            try:
                Task.from_config(task_name, weak_task_spec(setting, tc)).inventory(sources,
                                                                                   fraction)
            except ConfigError as err:
                raise ConfigError(_setting_keys(str(err), task_name, here)) from None


def _setting_keys(message: str, task_name: str, setting_key: str) -> str:
    """``message`` about weak task ``task_name`` (:func:`weak_task_spec`), with the task's
    config keys turned into the setting's that gave them (its ``others`` are part 0, its
    target class part 1)."""
    task_key = f"tasks.{task_name}"
    for derived, given in ((f"{task_key}.parts[0]", f"{setting_key}.others"),
                           (f"{task_key}.parts[1].samples_per_class",
                            f"{setting_key}.target_samples_per_class"),
                           (f"{task_key}.parts[1].classes", f"{setting_key}.target_classes"),
                           (f"{task_key}.parts[1].dataset", f"{setting_key}.dataset"),
                           (task_key, setting_key)):
        message = message.replace(derived, given)
    return message


# The patch itself.


def minmax_calibration(scores: torch.Tensor) -> tuple[float, float]:
    """Minimum and maximum of a module's scores on the TC validation images."""
    if scores.numel() == 0:
        raise ConfigError("min-max calibration needs target-class validation images; the "
                          "strong model's validation split has none")
    return scores.min().item(), scores.max().item()


def calibrate(scores: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``(scores - low) / (high - low)``; a module constant on the validation images (high ==
    low) is only shifted, so it still ranks test images."""
    span = high - low
    return (scores - low) / (span if span > 0 else 1.0)


def patched_predictions(weak_probabilities: torch.Tensor, calibrated: torch.Tensor,
                        tc_column: int) -> torch.Tensor:
    """Argmax over the weak model's softmax with column ``tc_column`` replaced by the module's
    calibrated score."""
    patched = weak_probabilities.clone()
    patched[:, tc_column] = calibrated
    return patched.argmax(dim=1)


def target_of(task_meta: Mapping[str, Any], strong_dataset: str, where: str) -> tuple[int, int]:
    """(TC index in the strong model's dataset, TC column of the weak model) of a weak task:
    its last part, one class of the strong model's dataset."""
    source = task_meta.get("source")
    parts = source.get("parts") if isinstance(source, dict) and source.get("kind") == "task" \
        else None
    if not parts:
        raise ArtifactError(f"{where}: the weak model was not trained on a derived task; a "
                            "weak task is other classes plus one target class (its last part)")
    last = parts[-1]
    if last["dataset"] != strong_dataset or len(last["classes"]) != 1:
        raise ArtifactError(f"{where}: the weak task's last part ({last['dataset']}, classes "
                            f"{last['classes']}) is not one class of the strong model's dataset "
                            f"{strong_dataset!r}")
    return int(last["classes"][0]), int(task_meta["num_classes"]) - 1


def strong_calibration_images(strong_val, target_class: int, limit: int | None):
    """The strong model's validation images of the TC (its dataset's class ``target_class``)
    that give the min-max range: the first ``limit`` in the split's seeded order, every one
    when ``limit`` is None (the authors' ~1,000 on CIFAR-10)."""
    index = (strong_val.labels == target_class).nonzero().flatten()
    return strong_val.take(index if limit is None else index[:limit])


def calibrated_module_scores(strong_model, modules, calibration, test,
                             normalization: Mapping[str, Any]
                             ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The TC module's scores on the ImageSet ``test``, min-max calibrated on the ImageSet
    ``calibration`` (:func:`strong_calibration_images`), and the calibration. ``modules``
    holds the one TC module."""
    calibration_scores, scores = strong_module_scores(strong_model, modules,
                                                      [calibration, test], normalization)
    low, high = minmax_calibration(calibration_scores)
    return calibrate(scores, low, high), {"min": low, "max": high,
                                          "strong_val_tc_images": len(calibration)}


def weak_vs_patched(weak_model, test, calibrated: torch.Tensor, tc_column: int
                    ) -> dict[str, float]:
    """The weak model's and the min-max patched model's TC metrics on the ImageSet ``test``."""
    from dnnmod.modules.inference import run

    probabilities = torch.softmax(run(weak_model, test), dim=1)
    return compare_predictions(test.labels, probabilities.argmax(dim=1),
                               patched_predictions(probabilities, calibrated, tc_column),
                               tc_column)


class MinmaxPatch:
    """The min-max patch of the weak models of one weak task: the TC module's scores on the
    test images, calibrated on the strong model's TC images ``calibration`` and computed once,
    and how well they rank the TC images (``module_auc``); :meth:`patch` compares one weak
    model and its patch."""

    def __init__(self, strong_model, modules, weak_data, normalization: Mapping[str, Any],
                 tc_column: int, calibration) -> None:
        self.test, self.tc_column = weak_data.test, tc_column
        self.calibrated, self.calibration = calibrated_module_scores(
            strong_model, modules, calibration, weak_data.test, normalization)
        # Calibration is increasing in the raw score: the same ranking.
        self.module_auc = ranking_auc(self.calibrated, self.test.labels == tc_column)

    def patch(self, weak_model, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        """(weak vs patched metrics, the calibration) of one weak model; the min-max patch
        draws nothing, so ``seed`` goes unused."""
        return weak_vs_patched(weak_model, self.test, self.calibrated, self.tc_column), \
            self.calibration


def patch_weak_models(modules_path: Path, strong_path: Path, weak_paths: Sequence[tuple[str, Path]],
                      data_root: Path, setting: str, device: str = "cpu",
                      protocol: str = "minmax",
                      calibration_layer: Mapping[str, Any] | None = None,
                      calibration_images: int | None = None) -> dict[str, Any]:
    """Patch every weak model (weak type, weights path) with the TC module of the module set at
    ``modules_path``, cut from the strong model at ``strong_path``, by ``protocol``
    (``calibration_layer``: the moda protocol's layer training, over MODA's defaults;
    ``calibration_images``: the minmax protocol's cap on the strong model's TC validation
    images, None for all); the record the E3 table and figure read (one row per weak model).
    Each weak task is loaded, and its module scores computed, once for all weak models
    trained on it."""
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.reuse.patching_moda import ModaPatch, resolve_calibration_layer
    from dnnmod.training.model_io import load_model
    from dnnmod.training.records import read_model_record

    started = time.monotonic()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol: {UnknownNameError('protocol', protocol, PROTOCOLS)}")
    if protocol != "moda" and calibration_layer is not None:
        raise ConfigError(f"--calibration-layer: protocol {protocol!r} trains no calibration "
                          "layer (only protocol 'moda' does)")
    if protocol == "moda" and calibration_images is not None:
        raise ConfigError("--calibration-images: protocol 'moda' trains its calibration layer "
                          "on the weak task's images (only protocol 'minmax' takes a min-max "
                          "range from the strong model's)")
    if calibration_images is not None and calibration_images < 1:
        raise ConfigError(f"--calibration-images: {calibration_images} images; give at least "
                          f"1, or {ALL_IMAGES!r}")
    if protocol == "moda":
        calibration_layer = resolve_calibration_layer("--calibration-layer", calibration_layer)
    for weak_type, _ in weak_paths:
        if weak_type not in WEAK_TYPES:
            raise ConfigError(f"--weak {weak_type}=...: "
                              f"{UnknownNameError('weak type', weak_type, WEAK_TYPES)}")
    # Every weak model's task must fit the strong model before anything heavy is loaded.
    strong_meta = read_model_record(strong_path)
    weak_metas, targets = [], {}
    for _, path in weak_paths:
        weak_metas.append(read_model_record(path))
        task = weak_metas[-1]["dataset"]
        targets[task] = target_of(load_task_meta(data_root, task), strong_meta["dataset"],
                                  str(path))
    strong_model, strong_meta = load_model(strong_path, device=device)
    modules = ModuleSet.load(modules_path, base=strong_meta, model=strong_model)
    # The min-max range comes from the strong model's own validation split (loaded once).
    strong_val = load_dataset(data_root, strong_meta["dataset"], strong_meta["seed"],
                              device=device).val if protocol == "minmax" else None
    rows, tasks = [], {}
    for (weak_type, path), weak_meta in zip(weak_paths, weak_metas, strict=True):
        task, seed = weak_meta["dataset"], weak_meta["seed"]
        tc, tc_column = targets[task]
        if (task, seed) not in tasks:
            weak_data = load_dataset(data_root, task, seed, device=device)
            arguments = (strong_model, modules.subset([tc]), weak_data,
                         strong_meta["normalization"], tc_column)
            tasks[task, seed] = MinmaxPatch(*arguments, strong_calibration_images(
                strong_val, tc, calibration_images)) if protocol == "minmax" else \
                ModaPatch(*arguments, calibration_layer, where=f"{task} (seed {seed})")
        weak_model, _ = load_model(path, device=device)
        test = tasks[task, seed].test
        metrics, calibration = tasks[task, seed].patch(weak_model, seed)
        rows.append({
            "weak_type": weak_type, "target_class": tc,
            "target_name": strong_meta["class_names"][tc], "tc_column": tc_column,
            "weak_model": weak_meta["model"], "weak_arch": weak_meta["arch"],
            "weak_task": task, "weak_epochs": len(weak_meta["history"]),
            "weak_selected_epoch": weak_meta["selected_epoch"],
            **{f"weak_{split}_accuracy": weak_meta["metrics"][f"{split}_accuracy"]
               for split in ("train", "val", "test")},
            "calibration": calibration, "test_images": len(test),
            "tc_test_images": int((test.labels == tc_column).sum()),
            "module_auc": tasks[task, seed].module_auc, **metrics})
    # A random control's row names the approach whose kernel counts it matches.
    matched = (modules.provenance.get("matched") or {}).get("approach")
    extra = {"control_of": matched} if matched else {}
    extra |= {"calibration_layer": calibration_layer} if protocol == "moda" else \
        {"calibration_images": ALL_IMAGES if calibration_images is None else calibration_images}
    return {"protocol": protocol, **extra, "setting": setting, "approach": modules.approach,
            "model": strong_meta["model"], "arch": strong_meta["arch"],
            "dataset": strong_meta["dataset"],
            "source_dataset": source_dataset(load_task_meta(data_root, strong_meta["dataset"])),
            "training": strong_meta["training"],
            "seed": modules.provenance["seed"], "strong_test_accuracy":
            strong_meta["metrics"]["test_accuracy"], "rows": rows,
            "seconds": time.monotonic() - started}


def load_task_meta(data_root: Path, task: str) -> dict[str, Any]:
    """meta.json of a prepared dataset or derived task."""
    from dnnmod.artifacts import read_json

    return read_json(Path(data_root) / task / "meta.json")


def source_dataset(meta: Mapping[str, Any]) -> str:
    """The dataset the images of a dataset or task come from (a task of classes of one dataset,
    such as SVHN digits 0-4, names that dataset): the name published numbers are filed under."""
    source = meta.get("source")
    if isinstance(source, dict) and source.get("kind") == "task":
        datasets = {part["dataset"] for part in source["parts"]}
        if len(datasets) == 1:
            return datasets.pop()
    return meta["name"]

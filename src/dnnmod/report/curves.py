"""Training-curve figures, read from what the runs recorded (nothing is recomputed):

- GA convergence (CNNSplitter): per generation, the best and mean fitness of the population
  (DEAP logbook, ``provenance.logbook``), the composed validation accuracy and KRR of the
  generation's selected composition;
- mask training (GradSplitter): per epoch, composed validation accuracy and KRR of the masks
  (``provenance.history``), mask phases shaded, the selected epoch marked;
- modular training (MwT, MODA): per epoch, each named loss part of the training kind and the
  validation accuracy (the model's ``history`` in ``model.json``).

Runs of one base model that differ in hyperparameters (E7's sweep points) are told apart by
the hyperparameters that differ among them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dnnmod.errors import ArtifactError
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.sensitivity import value_text


def _run(label_base: str, approach: str, hyperparameters: dict[str, Any],
         records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"group": label_base, "approach": approach, "hyperparameters": hyperparameters,
            "records": records, **extra}


def read_module_runs(paths: Sequence[Path], approach: str, key: str) -> list[dict[str, Any]]:
    """The per-step records (``provenance[key]``) of module sets of ``approach``."""
    from dnnmod.modules.moduleset import ModuleSet

    runs = []
    for path in paths:
        modules = ModuleSet.load(path)
        if modules.approach != approach:
            raise ArtifactError(f"{path}: a {modules.approach} module set; this figure shows "
                                f"{approach} runs")
        records = modules.provenance.get(key)
        if not isinstance(records, list) or not records:
            raise ArtifactError(f"{Path(path).with_suffix('.json')}: provenance.{key} is "
                                f"missing or empty (a {approach} run records one)")
        base = modules.base
        runs.append(_run(f"{base.get('model')}/{base.get('dataset')}", approach,
                         modules.provenance["hyperparameters"], records,
                         selected=modules.provenance.get("selected_epoch",
                                                         modules.provenance.get(
                                                             "selected_generation"))))
    return runs


def read_training_runs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The epoch histories of modular-trained models (their loss parts per epoch)."""
    from dnnmod.training.records import read_model_record

    runs = []
    for path in paths:
        meta = read_model_record(path)
        if meta["training"] == "st":  # the objectives' registry would import torch (~2 s)
            raise ArtifactError(f"{path}: a standard-trained model; this figure shows the loss "
                                "parts of modular training (e.g. mwt, moda)")
        if not meta.get("history"):
            raise ArtifactError(f"{Path(path).with_suffix('.json')}: no training history")
        runs.append(_run(f"{meta['model']}/{meta['dataset']}", meta["training"],
                         meta["objective"], meta["history"], selected=meta["selected_epoch"]))
    return runs


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """Per run: its base model, plus the hyperparameters that differ among the runs of the
    same approach and base model (none for a single run)."""
    labels = []
    for run in runs:
        peers = [r for r in runs if (r["group"], r["approach"]) == (run["group"], run["approach"])]
        keys = sorted({k for peer in peers for k in peer["hyperparameters"]
                       if any(p["hyperparameters"].get(k) != peer["hyperparameters"].get(k)
                              for p in peers)})
        varied = ", ".join(f"{k}={value_text(run['hyperparameters'].get(k))}" for k in keys)
        labels.append(f"{run['group']} ({varied})" if varied else run["group"])
    return labels


def _line_styles(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The approach's colour for the first run of each base model, the spare colour cycle for
    the runs that differ from it; one line style per base model."""
    groups = list(dict.fromkeys(run["group"] for run in runs))
    styles, seen = [], {}
    for run in runs:
        key = (run["group"], run["approach"])
        index = seen.get(key, 0)
        seen[key] = index + 1
        color = approach_style(run["approach"])["color"] if index == 0 else f"C{index + 1}"
        styles.append({"color": color,
                       "linestyle": ["-", "--", "-.", ":"][groups.index(run["group"]) % 4]})
    return styles


def ga_convergence_figure(paths: Sequence[Path], out: Path) -> None:
    """CNNSplitter's search per generation: best and mean fitness, composed validation
    accuracy (on the fitness images, and on the selection images where those are apart) and
    KRR of the selected composition; one line per run."""
    runs = read_module_runs(paths, "cnnsplitter", "logbook")
    for path, run in zip(paths, runs, strict=True):
        missing = {"generation", "fitness_max", "fitness_mean", "val_accuracy", "krr"} - set(
            run["records"][0])
        if missing:
            raise ArtifactError(f"{Path(path).with_suffix('.json')}: logbook lacks "
                                f"{sorted(missing)}")
    figure, (fitness, accuracy, krr) = pyplot().subplots(1, 3, figsize=(14, 4))
    for run, label, style in zip(runs, _labels(runs), _line_styles(runs), strict=True):
        generations = [r["generation"] for r in run["records"]]
        fitness.plot(generations, [r["fitness_max"] for r in run["records"]], label=label,
                     marker="s", markersize=3, **style)
        fitness.plot(generations, [r["fitness_mean"] for r in run["records"]], alpha=0.5,
                     **style)
        accuracy.plot(generations, [r["val_accuracy"] for r in run["records"]], label=label,
                      marker="s", markersize=3, **style)
        # runs that select on validation images the search did not score (fitness_samples);
        # otherwise both accuracies are the fitness images' (or the run predates the split)
        selection = [r.get("selection_accuracy", r["val_accuracy"]) for r in run["records"]]
        apart = selection != [r["val_accuracy"] for r in run["records"]]
        if apart:
            accuracy.plot(generations, selection, marker="o", markersize=3,
                          color=style["color"], linestyle=":")
        krr.plot(generations, [100 * r["krr"] for r in run["records"]], label=label,
                 marker="s", markersize=3, **style)
        if run["selected"] is not None:
            accuracy.plot(generations[run["selected"]],
                          selection[run["selected"]], marker="*",
                          markersize=12, color=style["color"], linestyle="none")
    fitness.plot([], [], color="0.3", label="best (solid with markers)")
    fitness.plot([], [], color="0.3", alpha=0.5, label="mean (faint)")
    accuracy.plot([], [], color="0.3", marker="s", markersize=3, label="fitness images")
    accuracy.plot([], [], color="0.3", marker="o", markersize=3, linestyle=":",
                  label="selection images (if apart)")
    for axis, title, ylabel in (
            (fitness, "Population fitness", "fitness (weighted accuracy + diversity)"),
            (accuracy, "Selected composition (★ = chosen generation)",
             "composed validation accuracy (%)"),
            (krr, "Kernels kept by the selected composition", "KRR (%)")):
        _label(axis, title, "generation", ylabel)
    figure.suptitle("CNNSplitter: GA convergence")
    figure.tight_layout()
    save_figure(figure, out)


def mask_training_figure(paths: Sequence[Path], out: Path) -> None:
    """GradSplitter's mask training per epoch: composed validation accuracy and KRR; mask
    phases shaded (of the first run), the selected epoch starred; one line per run."""
    runs = read_module_runs(paths, "gradsplitter", "history")
    for path, run in zip(paths, runs, strict=True):
        missing = {"epoch", "phase", "val_accuracy", "krr"} - set(run["records"][0])
        if missing:
            raise ArtifactError(f"{Path(path).with_suffix('.json')}: history lacks "
                                f"{sorted(missing)}")
    figure, (accuracy, krr) = pyplot().subplots(1, 2, figsize=(11, 4))
    for run, label, style in zip(runs, _labels(runs), _line_styles(runs), strict=True):
        epochs = [r["epoch"] for r in run["records"]]
        accuracy.plot(epochs, [r["val_accuracy"] for r in run["records"]], label=label,
                      **style)
        krr.plot(epochs, [100 * r["krr"] for r in run["records"]], label=label, **style)
        chosen = [r for r in run["records"] if r["epoch"] == run["selected"]]
        for axis, value in ((accuracy, "val_accuracy"), (krr, "krr")):
            for record in chosen:
                scale = 100 if value == "krr" else 1
                axis.plot(record["epoch"], scale * record[value], marker="*", markersize=12,
                          color=style["color"], linestyle="none")
    for record in runs[0]["records"]:
        if record["phase"] == "mask":
            for axis in (accuracy, krr):
                axis.axvspan(record["epoch"] - 1, record["epoch"], color="0.9", zorder=0)
    for axis, title, ylabel in (
            (accuracy, "Composed validation accuracy (★ = selected)", "accuracy (%)"),
            (krr, "Kernels kept (shaded: mask epochs)", "KRR (%)")):
        _label(axis, title, "epoch (head-only and mask epochs)", ylabel)
    figure.suptitle("GradSplitter: mask training")
    figure.tight_layout()
    save_figure(figure, out)


TITLES = {"train_loss": "total training loss", "val_accuracy": "validation accuracy"}


def modular_training_figure(paths: Sequence[Path], out: Path) -> None:
    """MwT's and MODA's training per epoch: one row per training kind, one panel per loss
    part it records (epoch means) and one for the validation accuracy; one line per model."""
    runs = read_training_runs(paths)
    kinds = sorted({run["approach"] for run in runs})
    parts = {kind: sorted({part for run in runs if run["approach"] == kind
                           for record in run["records"] for part in record.get("losses", {})})
             for kind in kinds}
    columns = max(len(p) for p in parts.values()) + 2
    plt = pyplot()
    figure, axes = plt.subplots(len(kinds), columns, figsize=(4.2 * columns, 3.3 * len(kinds)),
                                squeeze=False)
    labels, styles = _labels(runs), _line_styles(runs)
    for row, kind in enumerate(kinds):
        panels = ["train_loss", *parts[kind], "val_accuracy"]
        for column, part in enumerate(panels):
            axis = axes[row, column]
            for run, label, style in zip(runs, labels, styles, strict=True):
                if run["approach"] != kind:
                    continue
                epochs = [r["epoch"] for r in run["records"]]
                values = [r[part] if part in ("train_loss", "val_accuracy")
                          else r.get("losses", {}).get(part, math.nan) for r in run["records"]]
                axis.plot(epochs, values, label=label, marker=approach_style(kind)["marker"],
                          markersize=3, **style)
            _label(axis, f"{kind}: {TITLES.get(part, part.replace('_', ' '))}", "epoch",
                   "validation accuracy (%)" if part == "val_accuracy"
                   else "epoch mean (loss part, unitless)")
        for unused in axes[row, len(panels):]:
            unused.set_visible(False)
    figure.suptitle("Modular training: loss parts per epoch")
    figure.tight_layout()
    save_figure(figure, out)


def _label(axis, title: str, xlabel: str, ylabel: str) -> None:
    """Title, axis labels, grid and legend, the same on every panel of these figures."""
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)

"""E5, sub-task reuse: the table (means per approach, model, dataset and sub-task size |T|),
its DVC metrics, and the MODA-style figure (accuracy, size and FLOPs against |T|, one line per
approach), from the per-unit CSVs of :mod:`dnnmod.reuse.subtasks`.

Accuracy columns are means over the sub-tasks of one size: ``composed_accuracy`` (the module
set's combination rule over T's modules), ``base_accuracy`` (the model the approach decomposed,
restricted to T: the ST model, or MwT's/MODA's own modular-trained model) and ``st_accuracy``
(the ST model of the same architecture restricted to T, whatever the approach decomposed). The
``union_*`` and ``finetuned_*`` columns come from the sampled sub-tasks whose union networks
were built; their differences are taken against the base model on those same sub-tasks.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dnnmod.artifacts import write_json
from dnnmod.errors import ArtifactError
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.tables import published, published_value, write_table

UNIT_KEYS = ["dataset", "model", "approach", "training", "arch", "seed"]
#: columns of the per-unit CSV, in order (here, so that the table job needs no torch)
COLUMNS = ["approach", "training", "model", "arch", "dataset", "seed", "subset", "size",
           "test_images", "composed_accuracy", "base_accuracy", "st_accuracy",
           "params_fraction", "flops_fraction", "separate_params_fraction",
           "separate_flops_fraction", "union_accuracy", "finetuned_accuracy", "seconds",
           "union_seconds", "device"]
#: per-size means in the table, and the published metric of the approach's mean over sub-tasks
MEAN_COLUMNS = ["composed_accuracy", "base_accuracy", "st_accuracy", "params_fraction",
                "flops_fraction", "separate_params_fraction", "separate_flops_fraction",
                "union_accuracy", "finetuned_accuracy"]
PUBLISHED_METRIC = "reuse_accuracy_pct"


def read_subtasks(paths: list[Path]) -> pd.DataFrame:
    """The per-sub-task rows of every unit CSV, checked to have the E5 columns."""
    frames = []
    for path in paths:
        try:
            frame = pd.read_csv(path, dtype={"subset": str, "device": str})
        except FileNotFoundError:
            raise ArtifactError(f"{path}: file not found") from None
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
            raise ArtifactError(f"{path}: not an E5 sub-task table ({err})") from None
        missing = [column for column in COLUMNS if column not in frame.columns]
        if missing:
            raise ArtifactError(f"{path}: not an E5 sub-task table, lacks columns {missing}")
        frames.append(frame)
    if not frames:
        raise ArtifactError("no E5 sub-task tables given")
    return pd.concat(frames, ignore_index=True)


def subtask_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per unit (approach, model, dataset, seed) and sub-task size: sub-task count,
    mean accuracies, their differences (pp), mean union and separate-module costs, and the
    published mean over all sub-tasks of the approach on the same architecture and dataset
    (MODA Table 3, of its union networks: compare it with ``union_accuracy`` averaged over the
    sizes, not with one size's row)."""
    rows = rows.assign(
        accuracy_diff_pp=rows.composed_accuracy - rows.base_accuracy,
        st_diff_pp=rows.composed_accuracy - rows.st_accuracy,
        union_diff_pp=rows.union_accuracy - rows.base_accuracy,
        finetuned_diff_pp=rows.finetuned_accuracy - rows.base_accuracy)
    grouped = rows.groupby([*UNIT_KEYS, "size"], sort=True)
    table = grouped[[*MEAN_COLUMNS, "accuracy_diff_pp", "st_diff_pp", "union_diff_pp",
                     "finetuned_diff_pp"]].mean()
    table.insert(0, "subsets", grouped.size())
    table.insert(1, "union_subsets", grouped.union_accuracy.count())
    table = table.reset_index()
    reference = published()
    values = [published_value(reference, model=unit.arch, dataset=unit.dataset,
                              approach=unit.approach, metric=PUBLISHED_METRIC)
              for unit in table.itertuples()]
    table["published_mean_accuracy"] = [value for value, _ in values]
    table["published_source"] = [source for _, source in values]
    return table


def write_subtask_report(csv_paths: list[Path], out: Path,
                         metrics_path: Path | None = None) -> None:
    """E5 as CSV + Markdown (:func:`~dnnmod.report.tables.write_table`) and its DVC metrics:
    per unit, means over all its sub-tasks."""
    rows = read_subtasks(csv_paths)
    table = subtask_table(rows)
    # union/fine-tuned means stay out of the seed summary: most approaches have none.
    write_table(table, out, title="E5 sub-task reuse",
                keys=["dataset", "model", "approach", "size"],
                values=["composed_accuracy", "base_accuracy", "st_accuracy", "accuracy_diff_pp",
                        "params_fraction", "flops_fraction", "separate_params_fraction"])
    if metrics_path:
        reference, metrics = published(), {}
        for unit, unit_rows in rows.groupby(UNIT_KEYS, sort=True):
            dataset, model, approach, _, arch, seed = unit
            means = unit_rows[MEAN_COLUMNS].mean()
            metrics[f"{dataset}/{model}/{approach}/seed{seed}"] = {
                "subsets": len(unit_rows),
                **{column: None if pd.isna(value) else float(value)
                   for column, value in means.items()},
                "accuracy_diff_pp": float(means.composed_accuracy - means.base_accuracy),
                "published_mean_accuracy": published_value(
                    reference, model=arch, dataset=dataset, approach=approach,
                    metric=PUBLISHED_METRIC)[0]}
        write_json(metrics_path, metrics)


def subtask_figure(csv_paths: list[Path], path: Path) -> None:
    """Accuracy, union size and union FLOPs against |T|, one line per approach (MODA style),
    one row of panels per (model, dataset); means over sub-tasks and seeds. Written as
    ``path`` (PNG) and the same name with ``.pdf``."""
    rows = read_subtasks(csv_paths)
    means = rows.groupby(["model", "dataset", "approach", "training", "size"],
                         as_index=False)[MEAN_COLUMNS].mean()
    panels = sorted(means.groupby(["model", "dataset"]).groups)
    plt = pyplot()
    figure, axes = plt.subplots(len(panels), 3, figsize=(15, 3.8 * len(panels)), squeeze=False)
    for row, (model, dataset) in zip(axes, panels, strict=True):
        unit = means[(means.model == model) & (means.dataset == dataset)]
        accuracy, size, flops = row
        st = unit.groupby("size", as_index=False).st_accuracy.mean().dropna()
        if not st.empty:
            accuracy.plot(st["size"], st.st_accuracy, label="ST restricted to T", linewidth=2,
                          **approach_style("st"))
        for (approach, training), lines in unit.groupby(["approach", "training"]):
            style = approach_style(approach)
            accuracy.plot(lines["size"], lines.composed_accuracy, label=f"{approach} composed",
                          **style)
            if training != "st":
                accuracy.plot(lines["size"], lines.base_accuracy, linestyle="-.", alpha=0.6,
                              label=f"{approach}: its {training} model restricted to T",
                              color=style["color"])
            sampled = lines.dropna(subset=["union_accuracy"])
            if not sampled.empty:
                accuracy.plot(sampled["size"], sampled.union_accuracy, linestyle="--",
                              label=f"{approach} union network", **style)
                accuracy.plot(sampled["size"], sampled.finetuned_accuracy, linestyle=":",
                              label=f"{approach} union, fine-tuned", **style)
            for axis, column in ((size, "params_fraction"), (flops, "flops_fraction")):
                axis.plot(lines["size"], 100 * lines[column], label=f"{approach} union network",
                          **style)
                axis.plot(lines["size"], 100 * lines[f"separate_{column}"], linestyle="--",
                          label=f"{approach} separate modules (sum)", **style)
        accuracy.set_ylabel("test accuracy on T's images (%)")
        size.set_ylabel("parameters (% of base model)")
        flops.set_ylabel("FLOPs per image (% of base model)")
        for axis, what in ((accuracy, "accuracy"), (size, "size"), (flops, "FLOPs")):
            axis.set_title(f"{model} on {dataset}: {what}")
            axis.set_xlabel("sub-task size |T| (classes)")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)

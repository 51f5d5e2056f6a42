"""E3 patching: the table (ASE/TOSEM layout, published numbers beside) and the weak-vs-patched
figure, both read from the per-approach records of ``dnnmod reuse patch``.

Rows are one weak model (weak type x target class) patched by one approach's module, by the
setting's protocol (``minmax`` or ``moda``, named in every row). The papers average a setting
(dataset, model, weak type) over its target classes, metric by metric (e.g. ASE's precision
average = mean of the per-TC precisions): the ``average`` rows do the same, and carry the
published averages of the same architecture, dataset and weak type (ASE's, min-max protocol
rows only). Gains are patched minus weak, in percentage points, as the papers' headline gains
are; the headlines beside them are filed per protocol (:data:`HEADLINE_SETTINGS`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dnnmod.artifacts import read_json, write_json
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.tables import published, write_table

# Defined here, where the table reads them, so that the table job needs no torch.
WEAK_TYPES = ("simple", "underfit", "overfit")
METRICS = ("precision", "recall", "f1", "non_tc_accuracy")
KEYS = ["protocol", "setting", "dataset", "model", "approach", "control_of", "weak_type",
        "target"]
VALUES = [f"{stage}_{metric}" for metric in METRICS for stage in ("weak", "patched")]
GAINS = [f"{metric}_gain_pp" for metric in METRICS]
#: the TC module's ROC AUC on the weak task's test images, TC against the rest (no patch, no
#: calibration; NaN in records written before it was measured)
MODULE_AUC = "module_auc"
AVERAGE = "average"
#: published.csv ``setting`` of each protocol's headline gains (ASE/TOSEM abstracts: patch;
#: MODA's abstract: its module-replacement experiment)
HEADLINE_SETTINGS = {"minmax": "patch", "moda": "patch_moda"}


def patching_rows(metrics_paths: list[Path]) -> pd.DataFrame:
    """One row per (record, weak model): per-TC results as measured."""
    rows = []
    for path in metrics_paths:
        record = read_json(path)
        for row in record["rows"]:
            rows.append({
                "protocol": record["protocol"],
                "setting": record["setting"], "dataset": record["dataset"],
                "source_dataset": record["source_dataset"],
                "model": record["model"], "arch": record["arch"],
                "approach": record["approach"],
                # a random control names the approach whose kernel counts it matches
                "control_of": record.get("control_of", ""), "weak_type": row["weak_type"],
                "target": row["target_name"], "target_class": row["target_class"],
                "seed": record["seed"], "weak_model": row["weak_model"],
                "weak_train_accuracy": row["weak_train_accuracy"],
                "weak_test_accuracy": row["weak_test_accuracy"],
                **{column: row[column] for column in VALUES},
                MODULE_AUC: row.get(MODULE_AUC, float("nan"))})
    table = pd.DataFrame(rows)
    for metric, gain in zip(METRICS, GAINS, strict=True):
        table[gain] = table[f"patched_{metric}"] - table[f"weak_{metric}"]
    table["weak_type"] = pd.Categorical(table.weak_type, categories=WEAK_TYPES, ordered=True)
    return table.sort_values(["setting", "model", "approach", "weak_type", "target_class",
                              "seed"], ignore_index=True)


def patching_table(metrics_paths: list[Path]) -> pd.DataFrame:
    """Per-TC rows, then per (setting, model, approach, weak type, seed) an ``average`` row
    (mean over target classes) with the published weak/patched averages beside."""
    rows = patching_rows(metrics_paths)
    group = ["protocol", "setting", "dataset", "source_dataset", "model", "arch", "approach",
             "control_of", "weak_type", "seed"]
    averages = rows.groupby(group, observed=True, as_index=False)[
        ["weak_train_accuracy", "weak_test_accuracy", *VALUES, MODULE_AUC, *GAINS]].mean()
    averages["target"] = AVERAGE
    reference = published()
    beside = []
    for row in averages.itertuples():
        # ASE's averages are min-max patches; no paper publishes per-setting MODA averages.
        found = reference[(row.protocol == "minmax") & (reference.model == row.arch)
                          & (reference.dataset == row.source_dataset)
                          & (reference.approach == row.approach)
                          & (reference.setting == str(row.weak_type))]
        values = dict(zip(found.metric, found.value, strict=True))
        beside.append({f"published_{column}": values.get(f"{column}_pct") for column in VALUES}
                      | {"published_source": "; ".join(sorted(
                          set(found.source + " " + found.table)))})
    averages = pd.concat([averages, pd.DataFrame(beside, index=averages.index)], axis=1)
    table = pd.concat([rows, averages], ignore_index=True)
    table["is_average"] = table.target == AVERAGE
    table = table.sort_values(["setting", "model", "approach", "weak_type", "is_average",
                               "target_class", "seed"], ignore_index=True)
    table = table.drop(columns="is_average")
    table["weak_type"] = table.weak_type.astype(str)
    return table


def write_patching_table(metrics_paths: list[Path], csv_path: Path,
                         summary_path: Path | None = None) -> None:
    """E3 as CSV + Markdown, and its DVC metrics (the averages and the mean gains per approach
    over every setting, the papers' headline figures, beside the published headlines)."""
    table = patching_table(metrics_paths)
    protocols = sorted(set(table.protocol))
    title = "min-max protocol" if protocols == ["minmax"] else f"protocols: {', '.join(protocols)}"
    write_table(table, csv_path, title=f"E3 patching weak models ({title})",
                keys=KEYS, values=[*VALUES, MODULE_AUC])
    if summary_path:
        averages = table[table.target == AVERAGE]
        reference = published()
        metrics = {f"{row.setting}/{row.model}/{row.approach}/{row.weak_type}/seed{row.seed}":
                   {column: getattr(row, column) for column in VALUES}
                   for row in averages.itertuples()}
        for (protocol, approach), rows in averages.groupby(["protocol", "approach"]):
            headline = reference[(reference.approach == approach) & (reference.model == "")
                                 & (reference.setting == HEADLINE_SETTINGS[protocol])]
            # minmax keeps the key it had before protocols were a choice
            key = approach if protocol == "minmax" else f"{approach}/{protocol}"
            metrics[f"{key}/mean_gain_pp"] = {
                **{gain: rows[gain].mean() for gain in GAINS},
                **{f"published_{metric}": float(value) for metric, value in
                   zip(headline.metric, headline.value, strict=True)}}
        write_json(summary_path, metrics)


METRIC_LABELS = {"precision": "TC precision (%)", "recall": "TC recall (%)",
                 "f1": "TC F1 (%)"}


def patching_figure(metrics_paths: list[Path], path: Path) -> None:
    """Weak vs patched TC precision, recall and F1 per target class: one row of panels per
    (setting, model, weak type), titled with the setting's protocol, one bar group per TC, the
    weak model's bar and one patched bar per approach (mean over seeds)."""
    rows = patching_rows(metrics_paths)
    metrics = list(METRIC_LABELS)
    columns = ["protocol", "setting", "model", "weak_type", "target_class", "target",
               "approach"]
    means = rows.groupby(columns, observed=True, as_index=False)[
        [f"{stage}_{metric}" for metric in metrics for stage in ("weak", "patched")]].mean()
    panels = means[["protocol", "setting", "model", "weak_type"]].drop_duplicates().itertuples(
        index=False)
    panels = list(panels)
    approaches = sorted(means.approach.unique())
    plt = pyplot()
    figure, axes = plt.subplots(len(panels), len(metrics), squeeze=False,
                                figsize=(4.2 * len(metrics), 2.8 * len(panels)))
    width = 0.8 / (len(approaches) + 1)
    for row_axes, (protocol, setting, model, weak_type) in zip(axes, panels, strict=True):
        here = means[(means.setting == setting) & (means.model == model)
                     & (means.weak_type == weak_type)]
        targets = here[["target_class", "target"]].drop_duplicates().sort_values(
            "target_class")
        positions = range(len(targets))
        for ax, metric in zip(row_axes, metrics, strict=True):
            # The weak model is the same for every approach: its bar comes from any of them.
            weak = here.groupby("target_class")[f"weak_{metric}"].first()
            ax.bar([p - 0.4 + width / 2 for p in positions],
                   weak.reindex(targets.target_class).to_numpy(), width, color="white",
                   edgecolor="black", hatch="//", label="weak model")
            for offset, approach in enumerate(approaches, start=1):
                patched = here[here.approach == approach].set_index("target_class")[
                    f"patched_{metric}"].reindex(targets.target_class)
                ax.bar([p - 0.4 + width * (offset + 0.5) for p in positions],
                       patched.to_numpy(), width, color=approach_style(approach)["color"],
                       label=f"patched: {approach}")
            ax.set_xticks(list(positions), list(targets.target))
            ax.set_xlabel("target class")
            ax.set_ylim(0, 105)
            ax.set_ylabel(METRIC_LABELS[metric])
            ax.set_title(f"{setting} ({protocol}) / {model} / {weak_type}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle("E3: weak vs patched, per target class")
    figure.tight_layout()
    save_figure(figure, path)

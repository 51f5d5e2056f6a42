"""E6's table and figure (Pan & Rajan's intra-dataset replacement), from the per-pair records
that :func:`dnnmod.reuse.replacement.replacement_record` writes: no torch, so a change to the
table reruns no measurement and its job loads nothing it does not read."""

from __future__ import annotations

from typing import Any

import pandas as pd

from dnnmod.artifacts import read_json, write_json
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.tables import published, published_value, write_table

E6_VALUES = ["top1", "top5", "top1_change_pp", "class_recall", "class_recall_change_pp"]


def replacement_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (pair, seed, swapped class): composed accuracy after the swap, its change
    from the weaker set composed as is, and the published mean change beside."""
    reference = published()
    rows = []
    for record in records:
        value, source = published_value(reference, model="", dataset="",
                                        approach="pan_rajan", metric="top1_change_pp")
        for row in record["rows"]:
            rows.append({
                "approach": record["approach"], "dataset": record["dataset"],
                "weaker": record["weaker"]["model"], "stronger": record["stronger"]["model"],
                "seed": record["seed"], "swapped_class": row["swapped_class"],
                "class_name": row["class_name"], "top1": row["top1"], "top5": row["top5"],
                "top1_change_pp": row["top1"] - record["weaker_composed_top1"],
                "class_recall": row["class_recall"],
                "class_recall_change_pp": row["class_recall"] - row["weaker_class_recall"],
                "weaker_composed_top1": record["weaker_composed_top1"],
                "weaker_composed_top5": record["weaker_composed_top5"],
                "stronger_composed_top1": record["stronger_composed_top1"],
                "stronger_composed_top5": record["stronger_composed_top5"],
                "weaker_model_top1": record["weaker_model_top1"],
                "stronger_model_top1": record["stronger_model_top1"],
                "published_mean_top1_change_pp": value,
                "published_source": f"{source} (headline)" if source else "",
            })
    return pd.DataFrame(rows).sort_values(
        ["dataset", "approach", "weaker", "stronger", "seed", "swapped_class"],
        ignore_index=True)


def write_replacement_table(record_paths, csv_path, summary_path=None) -> None:
    """E6 as CSV + Markdown (mean ± std over seeds), and its DVC metrics: the mean change of
    composed top-1 over the swapped classes per pair and seed."""
    table = replacement_table([read_json(path) for path in record_paths])
    write_table(table, csv_path, title="E6 intra-dataset replacement",
                keys=["dataset", "approach", "weaker", "stronger", "swapped_class"],
                values=E6_VALUES)
    if summary_path:
        means = table.groupby(["dataset", "approach", "weaker", "stronger", "seed"])[
            ["top1", "top5", "top1_change_pp"]].mean()
        write_json(summary_path, {
            f"{dataset}/{approach}/{weaker}_by_{stronger}/seed{seed}": {
                "mean_top1": row.top1, "mean_top5": row.top5,
                "mean_top1_change_pp": row.top1_change_pp}
            for (dataset, approach, weaker, stronger, seed), row in means.iterrows()})


def replacement_figure(record_paths, path) -> None:
    """Composed top-1 per swapped class, one panel per pair (mean over seeds), with the weaker
    and the stronger module sets composed as is as lines; PNG and PDF."""
    table = replacement_table([read_json(p) for p in record_paths])
    pairs = list(table.groupby(["dataset", "approach", "weaker", "stronger"], sort=True))
    plt = pyplot()
    figure, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
    for axis, ((dataset, approach, weaker, stronger), rows) in zip(axes[0], pairs, strict=True):
        means = rows.groupby("swapped_class", as_index=False)[
            ["top1", "weaker_composed_top1", "stronger_composed_top1"]].mean()
        axis.plot(means.swapped_class, means.top1, linestyle="-",
                  label=f"{weaker}, class k from {stronger}", **approach_style(approach))
        axis.axhline(means.weaker_composed_top1.iloc[0], color="tab:gray", linestyle="--",
                     label=f"{weaker} modules (no swap)")
        axis.axhline(means.stronger_composed_top1.iloc[0], color="black", linestyle=":",
                     label=f"{stronger} modules")
        axis.set_xticks(means.swapped_class)
        axis.set_xlabel("swapped class k (index)")
        axis.set_ylabel("composed top-1 test accuracy (%)")
        axis.set_title(f"{approach} on {dataset}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("E6 replacement: one module from a stronger model")
    figure.tight_layout()
    save_figure(figure, path)

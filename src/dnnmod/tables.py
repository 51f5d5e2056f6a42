"""Tidy result tables (CSV) with the published numbers beside the reproduced ones.

Every table is a pandas DataFrame with stable column names; the CSV is the artifact of record
and the Markdown rendering beside it is made from it. Published figures come from the bundled
``reference/published.csv`` (source, table, model, dataset, approach, setting, metric, value).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from .artifacts import atomic_write, read_json


def published() -> pd.DataFrame:
    with resources.files("dnnmod").joinpath("reference", "published.csv").open() as handle:
        return pd.read_csv(handle, dtype={"setting": str}, keep_default_na=False,
                           na_values={"value": [""]})


def published_value(table: pd.DataFrame, *, model: str, dataset: str, approach: str,
                    metric: str) -> tuple[float | None, str]:
    """The published value for one cell and its source ("" and None when unpublished)."""
    rows = table[(table.model == model) & (table.dataset == dataset)
                 & (table.approach == approach) & (table.metric == metric)]
    if rows.empty:
        return None, ""
    row = rows.iloc[0]
    return float(row.value), f"{row.source} {row.table}"


def base_model_table(weights_paths: list[Path]) -> pd.DataFrame:
    """E1: one row per trained base model (and seed), published accuracy/time beside it."""
    reference = published()
    rows = []
    for path in weights_paths:
        meta = read_json(Path(path).with_suffix(".json"))
        key = {"model": meta["arch"], "dataset": meta["dataset"], "approach": meta["training"]}
        pub_acc, source = published_value(reference, metric="test_accuracy_pct", **key)
        pub_hours, _ = published_value(reference, metric="train_hours", **key)
        rows.append({
            "training": meta["training"], "model": meta["model"], "arch": meta["arch"],
            "dataset": meta["dataset"], "width": meta["width"], "seed": meta["seed"],
            "epochs": len(meta["history"]), "selected_epoch": meta["selected_epoch"],
            "train_accuracy": meta["metrics"]["train_accuracy"],
            "val_accuracy": meta["metrics"]["val_accuracy"],
            "test_accuracy": meta["metrics"]["test_accuracy"],
            "train_seconds": meta["wall_seconds"], "device": meta["device"],
            "published_test_accuracy": pub_acc,
            "published_train_seconds": pub_hours * 3600 if pub_hours is not None else None,
            "published_source": source,
        })
    return pd.DataFrame(rows).sort_values(["dataset", "model", "training", "seed"],
                                          ignore_index=True)


def summarize_seeds(table: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """Mean ± std over seeds of ``values`` for each group of ``keys``, as display strings."""
    grouped = table.groupby(keys, sort=True)[values]
    mean, std, count = grouped.mean(), grouped.std(ddof=1).fillna(0.0), grouped.size()
    summary = mean.map(lambda v: f"{v:.2f}") + " ± " + std.map(lambda v: f"{v:.2f}")
    summary["seeds"] = count
    return summary.reset_index()


def write_table(table: pd.DataFrame, csv_path: Path, title: str) -> None:
    """Write the tidy CSV and a Markdown rendering (``.md`` beside it), both atomically."""
    with atomic_write(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    markdown = f"# {title}\n\n{table.to_markdown(index=False, floatfmt='.2f')}\n"
    with atomic_write(csv_path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown)

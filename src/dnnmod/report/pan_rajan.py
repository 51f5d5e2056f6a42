"""Pan & Rajan's decomposition cost (their Table 1): per module set, the model's and the
composed model's top-1/top-5 test accuracy and the model–module Jaccard index, with the
published numbers beside.

:func:`dnnmod.approaches.pan_rajan.decomposition_cost` measures one module set (one job per
module set); :func:`write_decomposition_report` gathers the records into the table, so a
change to the table reruns no measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from dnnmod.artifacts import read_json, write_json
from dnnmod.report.tables import published, published_value, write_table

#: Table 1 columns with a published counterpart: (our column, approach row, metric, scale)
PUBLISHED_COLUMNS = [
    ("model_top1", "st", "top1_pct", 1.0),
    ("model_top5", "st", "top5_pct", 1.0),
    ("composed_top1", "pan_rajan", "top1_pct", 1.0),
    ("composed_top5", "pan_rajan", "top5_pct", 1.0),
    ("jaccard", "pan_rajan", "jaccard_model_module", 1.0),
]


def decomposition_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per module set, the paper's numbers for the same architecture and dataset
    beside (empty where the paper has none)."""
    reference = published()
    rows = []
    for record in records:
        row = dict(record)
        sources = set()
        for column, approach, metric, scale in PUBLISHED_COLUMNS:
            value, source = published_value(reference, model=record["arch"],
                                            dataset=record["dataset"], approach=approach,
                                            metric=metric)
            row[f"published_{column}"] = value * scale if value is not None else None
            sources |= {source} - {""}
        row["published_source"] = "; ".join(sorted(sources))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["dataset", "model", "seed"], ignore_index=True)


def write_decomposition_report(cost_paths: list[Path], csv_path: Path,
                               summary_path: Path | None = None) -> None:
    """Table 1 as CSV + Markdown (mean ± std over seeds beside), and its DVC metrics."""
    table = decomposition_table([read_json(path) for path in cost_paths])
    write_table(table, csv_path, title="Pan & Rajan decomposition cost (Table 1 layout)",
                keys=["dataset", "model"],
                values=["model_top1", "model_top5", "composed_top1", "composed_top5",
                        "top1_loss_pp", "top5_loss_pp", "jaccard"])
    if summary_path:
        write_json(summary_path, {
            f"{row.dataset}/{row.model}/seed{row.seed}": {
                "composed_top1": row.composed_top1, "composed_top5": row.composed_top5,
                "top1_loss_pp": row.top1_loss_pp, "jaccard": row.jaccard}
            for row in table.itertuples()})

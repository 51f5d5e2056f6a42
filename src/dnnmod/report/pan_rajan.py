"""Pan & Rajan's decomposition cost (their Table 1): per module set, the model's and the
composed model's top-1/top-5 test accuracy and the model–module Jaccard index, with the
published numbers beside.

:func:`decomposition_cost` measures one module set (one job per module set);
:func:`write_decomposition_report` gathers the records into the table, so a change to the
table reruns no measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from dnnmod.artifacts import read_json, write_json
from dnnmod.modules.inference import run
from dnnmod.modules.metrics import (
    composed_accuracy,
    kernel_retention,
    model_module_jaccard,
    module_scores,
    top_k_accuracy,
)
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.report.tables import published, published_value, write_table

#: Table 1 columns with a published counterpart: (our column, approach row, metric, scale)
PUBLISHED_COLUMNS = [
    ("model_top1", "st", "top1_pct", 1.0),
    ("model_top5", "st", "top5_pct", 1.0),
    ("composed_top1", "pan_rajan", "top1_pct", 1.0),
    ("composed_top5", "pan_rajan", "top5_pct", 1.0),
    ("jaccard", "pan_rajan", "jaccard_model_module", 1.0),
]


def decomposition_cost(model: nn.Module, model_meta: dict[str, Any], modules: ModuleSet,
                       test) -> dict[str, Any]:
    """Table 1 measures of one module set on the ImageSet ``test``, with what identifies it
    and the notes a reader needs (BatchNorm, channel-level masks, TI's rate ρ, backtracking
    skipped)."""
    logits = run(model, test)
    scores = module_scores(model, modules, test)
    classes = list(range(logits.shape[1]))
    model_top1 = top_k_accuracy(logits, classes, test.labels, 1)
    model_top5 = top_k_accuracy(logits, classes, test.labels, 5)
    composed_top1 = composed_accuracy(modules, scores, test.labels)
    composed_top5 = top_k_accuracy(scores, modules.classes, test.labels, 5)
    jaccard = model_module_jaccard(modules)
    krr = kernel_retention(modules)
    return {
        "approach": modules.approach, "model": model_meta["model"], "arch": model_meta["arch"],
        "dataset": model_meta["dataset"], "seed": modules.provenance["seed"],
        "model_top1": model_top1, "model_top5": model_top5,
        "composed_top1": composed_top1, "composed_top5": composed_top5,
        "top1_loss_pp": model_top1 - composed_top1, "top5_loss_pp": model_top5 - composed_top5,
        "jaccard": sum(jaccard) / len(jaccard), "krr": sum(krr) / len(krr),
        "modularize_seconds": modules.provenance["wall_seconds"],
        "device": modules.provenance.get("device", ""),
        "note": "; ".join(notes(modules.provenance)),
    }


def notes(provenance: dict[str, Any]) -> list[str]:
    """Where this run departs from the paper's setting, in words, from the provenance."""
    found = []
    if provenance.get("batch_norm"):
        found.append("BatchNorm model (the paper's have none): masks act after the norm")
    if provenance.get("channel_masked_groups"):
        found.append(f"{len(provenance['channel_masked_groups'])} conv group(s) without one "
                     "spatial shape masked per channel, not per position")
    hyperparameters = provenance.get("hyperparameters", {})
    if not hyperparameters.get("tangling", True):
        found.append("no tangling identification (CI alone)")
    elif hyperparameters.get("tangling_rate", 0):
        found.append(f"TI switches a position back on only when at least "
                     f"{hyperparameters['tangling_rate']:g} of the other classes' images "
                     "activate it (the paper: any one of them)")
    backtracking = provenance.get("backtracking")
    if isinstance(backtracking, dict) and not backtracking.get("applied", True):
        found.append(f"no dense backtracking: {backtracking.get('reason', '')}")
    return found


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

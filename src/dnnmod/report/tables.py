"""Tidy result tables (CSV) with the published numbers beside the reproduced ones.

Every table is a pandas DataFrame with stable column names; the CSV is the artifact of record
and the Markdown rendering beside it is made from it. Published figures come from the bundled
``reference/published.csv`` (source, table, model, dataset, approach, setting, metric, value).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from dnnmod.artifacts import atomic_write, read_json, write_json
from dnnmod.controls import control_of
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.training.records import read_model_record


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
    """E1: one row per trained model (training kind and seed), published accuracy and time of
    the same architecture, dataset and training kind beside it."""
    reference = published()
    rows = []
    for path in weights_paths:
        meta = read_model_record(path)
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


def summarize_seeds(table: pd.DataFrame, keys: list[str], values: list[str],
                    over: str = "seeds") -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of ``values`` per group of ``keys``:
    columns ``<value>_mean``, ``<value>_std`` (0 for a single seed) and ``<over>`` (the group
    size). A value with a ``published_<value>`` column gets the published figure and
    ``<value>_minus_published`` (our mean minus it) beside."""
    grouped = table.groupby(keys, sort=True)
    summary = grouped[values].agg(["mean", "std"])
    summary.columns = [f"{value}_{stat}" for value, stat in summary.columns]
    for value in values:
        # One seed has no spread (0), but a value missing in every seed stays missing.
        measured = summary[f"{value}_mean"].notna()
        summary.loc[measured, f"{value}_std"] = summary.loc[measured, f"{value}_std"].fillna(0.0)
    for value in published_pairs(table, values):
        # One published figure per group (the same paper cell for every seed).
        summary[f"published_{value}"] = grouped[f"published_{value}"].first()
        summary[f"{value}_minus_published"] = (summary[f"{value}_mean"]
                                               - summary[f"published_{value}"])
    summary[over] = grouped.size()
    return summary.reset_index()


def published_pairs(table: pd.DataFrame, values: list[str]) -> list[str]:
    """The ``values`` that have a ``published_<value>`` column in ``table``."""
    return [value for value in values if f"published_{value}" in table.columns]


def with_published_differences(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``<column>_minus_published`` right after each ``published_<column>``
    whose ``<column>`` is there too (empty where nothing is published)."""
    table = table.copy()
    for published_column in [c for c in table.columns if c.startswith("published_")]:
        column = published_column.removeprefix("published_")
        if column not in table.columns or f"{column}_minus_published" in table.columns:
            continue
        difference = (pd.to_numeric(table[column], errors="coerce")
                      - pd.to_numeric(table[published_column], errors="coerce"))
        table.insert(table.columns.get_loc(published_column) + 1,
                     f"{column}_minus_published", difference)
    return table


def _mean_std_view(summary: pd.DataFrame, keys: list[str], values: list[str],
                   over: str) -> pd.DataFrame:
    """What a reader compares: mean ± std per value, the published figure and our difference
    to it beside (empty cells where the paper has none)."""
    view = summary[keys].copy()
    for value in values:
        # empty where a value does not apply to the row (E2's union columns, for example);
        # a group of one has no spread to show, so it gets no "± 0.00"
        view[value] = [None if pd.isna(m) else f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}"
                       for m, s, n in zip(summary[f"{value}_mean"], summary[f"{value}_std"],
                                          summary[over], strict=True)]
        if f"published_{value}" in summary.columns:
            view[f"{value} (published)"] = summary[f"published_{value}"]
            view[f"{value} Δ"] = summary[f"{value}_minus_published"]
    view[over] = summary[over]
    return view


def _blank_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing cells (no published figure) as empty cells rather than ``nan``."""
    return frame.astype(object).where(frame.notna(), None)


def without_empty_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` less the columns empty in every row (a published figure no row has, a value
    no row's approach measures): the renderings a reader scrolls through. The CSVs keep them,
    so their columns stay the same whatever the study ran."""
    empty = frame.isna() | frame.astype(str).eq("")
    return frame.loc[:, ~empty.all(axis=0)] if len(frame) else frame


def _math_glyphs(latex: str) -> str:
    # pdflatex has no text-mode glyphs for these two.
    return latex.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` environment of ``frame`` (needs ``\\usepackage{booktabs}``)."""
    tabular = _math_glyphs(frame.to_latex(index=False, escape=True, na_rep="--",
                                          float_format="%.2f"))
    caption = _math_glyphs("".join(rf"\{c}" if c in "&%$#_{}" else c
                                   for c in caption.replace("\\", "/")))
    return ("\\begin{table}[ht]\n\\centering\n\\small\n"
            f"\\caption{{{caption}}}\n\\label{{{label}}}\n{tabular}\\end{{table}}\n")


def write_table(table: pd.DataFrame, csv_path: Path, title: str, keys: list[str],
                values: list[str], *, over: str = "seeds", notes: str = "",
                summary: bool = True) -> None:
    """Write the tidy per-seed CSV, its mean ± std summary over seeds (``*_summary.csv``) and
    Markdown (``.md``) and LaTeX (``.tex``, booktabs) renderings of both, all atomically.

    Every ``published_<column>`` gets ``<column>_minus_published`` beside it, in the CSVs and
    the renderings. ``over`` names what the summary averages over (``seeds``, or e.g. ``jobs``);
    ``notes`` (a paragraph: method, constants) goes under the title; ``summary=False`` writes
    the table alone, for tables that already hold one row per group (totals).
    """
    csv_path = Path(csv_path)
    table = with_published_differences(table)
    frames = [(table, csv_path)]
    sections: list[tuple[str, pd.DataFrame]] = []
    if summary:
        summarized = summarize_seeds(table, keys, values, over)
        frames.append((summarized, csv_path.with_name(f"{csv_path.stem}_summary.csv")))
        heading = (f"Mean ± std over {over}" if (summarized[over] > 1).any()
                   else f"Summary: one of the {over} per row")
        sections += [(heading, _mean_std_view(summarized, keys, values, over)),
                     ("Per seed" if over == "seeds" else "Every row", table)]
    else:
        sections.append(("", table))
    for frame, path in frames:
        with atomic_write(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.4f")
    markdown = [f"# {title}\n"] + ([f"{notes}\n"] if notes else [])
    latex = [f"% {title}: rendered from {csv_path.name}; needs \\usepackage{{booktabs}}"]
    for index, (heading, frame) in enumerate(sections):
        rendered = _blank_missing(without_empty_columns(frame))
        markdown += ([f"## {heading}\n"] if heading else []) + [
            f"{rendered.to_markdown(index=False, floatfmt='.2f')}\n"]
        latex.append(latex_table(rendered, f"{title}: {heading}" if heading else title,
                                 f"tab:{csv_path.stem}:{index}"))
    with atomic_write(csv_path.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(markdown))
    with atomic_write(csv_path.with_suffix(".tex")) as tmp:
        tmp.write_text("\n".join(latex))


# E2 columns with a published counterpart: (our column, published metric, scale to our unit).
E2_PUBLISHED = [
    ("composed_accuracy", "top1_pct", 1.0),
    ("accuracy_loss_pp", "accuracy_loss_pp", 1.0),
    ("krr", "krr_pct", 0.01),
    ("module_size", "module_size_fraction_params", 1.0),
    ("overlap", "module_overlap_fraction_params", 1.0),
]
E2_COLUMNS = ["approach", "training", "model", "arch", "dataset", "seed", "accuracy_protocol",
              "st_accuracy", "base_accuracy", "accuracy_loss_pp", "krr", "krr_shared",
              "composed_accuracy", "composed_loss_pp", "unit_retention", "module_size",
              "flops_fraction", "overlap", "mean_precision", "mean_recall", "mean_f1",
              "union_accuracy", "union_loss_pp", "union_size",
              "train_seconds", "modularize_seconds", "seconds", "device"]


def modularization_table(metrics_paths: list[Path]) -> pd.DataFrame:
    """E2: one row per (approach, model, dataset, seed) with published values beside.

    A published value is taken for the same architecture and dataset when the paper reports
    one, else the approach's headline figure (its source says so).
    """
    reference = published()
    rows = []
    for path in metrics_paths:
        metrics = read_json(path)
        row = {column: metrics.get(column) for column in E2_COLUMNS if column != "seconds"}
        row["seconds"] = metrics["train_seconds"] + metrics["modularize_seconds"]
        sources = set()
        for column, metric, scale in E2_PUBLISHED:
            value, source = published_value(reference, model=metrics["arch"],
                                            dataset=metrics["dataset"],
                                            approach=metrics["approach"], metric=metric)
            if value is None:
                value, source = published_value(reference, model="", dataset="",
                                                approach=metrics["approach"], metric=metric)
                source = f"{source} (headline)" if source else ""
            row[f"published_{column}"] = value * scale if value is not None else None
            sources |= {source} - {""}
        row["published_source"] = "; ".join(sorted(sources))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["dataset", "model", "approach", "seed"],
                                          ignore_index=True)


def headline_accuracy(table: pd.DataFrame) -> pd.Series:
    """The accuracy each row's paper states: the composed modules' (``composed`` protocol), the
    modular-trained model's own (``modular_model``: MwT, MODA)."""
    if "accuracy_protocol" not in table.columns:  # records of before the protocols
        return table["composed_accuracy"]
    return table["base_accuracy"].where(table["accuracy_protocol"] == "modular_model",
                                        table["composed_accuracy"])


def accuracy_vs_krr_figure(table: pd.DataFrame, path: Path) -> None:
    """Accuracy as each paper states it (:func:`headline_accuracy`) against KRR (left, each
    paper's definition) and against module size (right), one point per (approach, model,
    dataset); written as ``path`` (PNG) and the same name with ``.pdf``. Both panels, because
    the approaches cut at different grains: Pan & Rajan switches off positions and MODA hidden
    units, which module size sees and KRR does not."""
    means = table.assign(accuracy=headline_accuracy(table)).groupby(
        ["approach", "model", "dataset"], as_index=False)[
        ["krr", "module_size", "accuracy"]].mean()
    figure, panels = pyplot().subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axes, column, label in ((panels[0], "krr", "kernel retention rate (%)"),
                                (panels[1], "module_size", "module size (% of parameters)")):
        for approach, points in means.dropna(subset=[column]).groupby("approach"):
            axes.scatter(100 * points[column], points.accuracy, label=approach, s=40,
                         **approach_style(approach))
            for point in points.itertuples():
                axes.annotate(f"{point.model}/{point.dataset}",
                              (100 * getattr(point, column), point.accuracy),
                              fontsize=7, xytext=(4, 2), textcoords="offset points")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("test accuracy (%): composed; MwT, MODA: modular model")
    panels[0].set_title("accuracy vs kernels kept")
    panels[1].set_title("accuracy vs parameters kept")
    panels[1].legend(title="approach")
    figure.suptitle("Modularization")
    figure.tight_layout()
    save_figure(figure, path)


def write_base_model_report(weights_paths: list[Path], csv_path: Path,
                            metrics_path: Path | None = None) -> None:
    """E1 as CSV + Markdown, and its DVC metrics (test accuracy and time per model)."""
    table = base_model_table(weights_paths)
    write_table(table, csv_path, title="E1 base models", keys=["dataset", "model", "training"],
                values=["test_accuracy", "val_accuracy", "train_seconds"])
    if metrics_path:
        write_json(metrics_path, {
            f"{row.dataset}/{row.model}/{row.training}/seed{row.seed}": {
                "test_accuracy": row.test_accuracy, "train_seconds": row.train_seconds}
            for row in table.itertuples()})


E2_NOTES = (
    "accuracy_loss_pp is each paper's headline accuracy loss (accuracy_protocol): composed: "
    "base_accuracy minus composed_accuracy; modular_model (MwT, MODA): the standard-trained "
    "model's test accuracy (st_accuracy) minus the modular-trained model's own "
    "(base_accuracy), as their papers measure it. composed_accuracy and composed_loss_pp "
    "compose the modules side by side for every approach (each module scores its own class; "
    "argmax), an extra column for MwT and MODA, whose papers never compose so. krr: kernels "
    "kept per module by the paper's definition (listed below), averaged over modules; "
    "krr_shared: the one definition for all approaches (each channel group counted once, an "
    "unmasked conv counted as kept). module_size and "
    "flops_fraction: parameters and FLOPs of the physically extracted module over the "
    "model's. MwT and MODA decompose their own modular-trained model (base_accuracy is "
    "that model's). pan_rajan switches off output positions, not kernels: a channel counts "
    "as kept when any of its positions is active, so its krr stays near 1 by the method's "
    "design; module_size counts what it removes (hidden units, and channels inactive at every "
    "position), and its own measure, the model-module Jaccard index of active positions, is "
    "in pan_rajan_decomposition. random_<approach>, each approach's random control, keeps as "
    "many kernels per class and layer as that approach's modules (as many positions, for "
    "pan_rajan), chosen at random from the same model (MwT's and MODA's own), and composes "
    "side by side: the floor its approach's composed_loss_pp should beat. MwT and MODA compose "
    "modules into one union network (the OR of their masks; MwT's without its mask "
    "generators, as its authors reuse it), and union_accuracy, "
    "union_loss_pp and union_size (parameters over the model's) give that network for the "
    "whole set as it is, with no training: the smaller their modules, the less comparable "
    "their separate scores. MODA's authors use union networks so; MwT's always fine-tune one "
    "(a new ReLU + Linear head, all parameters, 10 epochs: E5's finetuned_accuracy), and "
    "without that step a model trained under its generators' gating can fall to chance once "
    "they are removed, so MwT's union_accuracy here is no figure of its paper.")


def krr_definitions(metrics_paths: list[Path]) -> str:
    """The KRR definition each approach of the records names, one sentence."""
    definitions = {}
    for path in metrics_paths:
        metrics = read_json(path)
        if metrics.get("krr_definition") and not control_of(metrics["approach"]):
            # a control's definition is its approach's: named once
            definitions[metrics["approach"]] = metrics["krr_definition"]
    return " ".join(f"krr of {approach}: {definition}." for approach, definition in
                    sorted(definitions.items()))


def write_modularization_report(metrics_paths: list[Path], csv_path: Path,
                                figure_path: Path | None = None,
                                summary_path: Path | None = None) -> pd.DataFrame:
    """E2 as CSV + Markdown, its accuracy figure and its DVC metrics; returns the table."""
    table = modularization_table(metrics_paths)
    write_table(table, csv_path, title="E2 modularization",
                keys=["dataset", "model", "approach"],
                values=["accuracy_loss_pp", "krr", "krr_shared", "composed_accuracy",
                        "composed_loss_pp", "module_size", "flops_fraction", "overlap",
                        "mean_f1", "union_loss_pp", "union_size", "seconds"],
                notes=" ".join(filter(None, [E2_NOTES, krr_definitions(metrics_paths)])))
    if figure_path:
        accuracy_vs_krr_figure(table, figure_path)
    if summary_path:
        write_json(summary_path, {
            f"{row.dataset}/{row.model}/{row.approach}/seed{row.seed}": {
                "composed_accuracy": row.composed_accuracy,
                "accuracy_loss_pp": row.accuracy_loss_pp, "krr": row.krr,
                "module_size": row.module_size}
            for row in table.itertuples()})
    return table

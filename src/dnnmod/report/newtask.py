"""E4 table and figure: composed binary classifiers against the same architecture trained from
scratch on each pair, per pair and on average, published averages beside. A setting with
Pan & Rajan's continuous-learning step has two variants of every row: ``composed`` (the modules
as decomposed) and ``continuous_learning`` (the same modules retrained on the pair's training
split, :func:`dnnmod.reuse.newtask.continue_learning`), each with its own published mean.

Every row says where its modules came from: ``pool`` (``base_models``, or ``dirichlet`` for
GradSplitter's pool of models trained on Dirichlet-imbalanced subsets), the number of candidate
module sets on each side's dataset (``pool_size_a``/``_b``) and what the chosen module's base
model was trained on (``trained_on_a``/``_b``: the dataset, or the pool member's task).

Both read the same per-unit results, the composed records of ``dnnmod reuse new-task`` (one
JSON per setting, approach and seed) and the from-scratch models' metadata, so the table and
the figure are rebuilt independently of each other.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dnnmod.artifacts import read_json, write_json
from dnnmod.errors import ArtifactError
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.tables import published, write_table
from dnnmod.training.records import read_model_record

MEAN = "mean"
COMPOSED, CONTINUOUS = "composed", "continuous_learning"
#: published rows of each (setting kind, variant) (GradSplitter's "new_task" row is CIFAR-10 x
#: SVHN); nothing is published for intra-dataset pairs with continuous learning
PUBLISHED_SETTINGS = {("inter", COMPOSED): ("new_task_inter", "new_task"),
                      ("intra", COMPOSED): ("new_task_intra",),
                      ("inter", CONTINUOUS): ("new_task_inter_continuous",)}
PUBLISHED_METRIC = "accuracy_loss_vs_scratch_pct"
VALUES = ["composed_accuracy", "scratch_accuracy", "accuracy_difference_pp"]
COMPOSED_KEYS = ("setting", "kind", "approach", "model", "seed", "pairs", "candidates")
BASE_MODELS_POOL, DIRICHLET_POOL = "base_models", "dirichlet"
NOTES = ("kind = inter (a class of one dataset x a class of another, the papers' new tasks: "
         "the headline) comes before intra (both classes of one dataset). "
         "accuracy_difference_pp = composed − from-scratch test accuracy on the pair's test "
         "images; pair = mean rows average over the pairs, the published means beside them. "
         "An approach appears in a setting when it decomposed a pool model of both datasets "
         "or when the setting's Dirichlet pool names it. "
         "variant = composed: the modules as decomposed; continuous_learning: the same modules "
         "retrained with their masks fixed on the pair's training split for a fixed number of "
         "epochs (Pan & Rajan's step; the recipe is ours, see the README). pool = "
         "base_models: the candidates are the study's base models; dirichlet: GradSplitter's "
         "pool, models trained on Dirichlet-imbalanced draws from the training split "
         "(trained_on names the chosen member's task); pool_size = candidate module sets on "
         "that side's dataset.")


def _published_difference(reference: pd.DataFrame, approach: str, kind: str,
                          variant: str) -> tuple[float | None, str]:
    """The published mean difference composed − scratch (pp) for an approach (our name),
    setting kind and variant, and its source."""
    rows = reference[(reference.approach == approach) & (reference.metric == PUBLISHED_METRIC)
                     & reference.setting.isin(PUBLISHED_SETTINGS.get((kind, variant), ()))]
    if rows.empty:
        return None, ""
    row = rows.iloc[0]
    return -float(row.value), f"{row.source} {row.table}"


def _scratch_models(paths: list[Path]) -> dict[tuple[str, str, int], dict]:
    """(pair task, model name, seed) → metadata of a from-scratch model."""
    return {(meta["dataset"], meta["model"], meta["seed"]): meta
            for meta in map(read_model_record, paths)}


def new_task_table(composed_paths: list[Path], scratch_paths: list[Path]) -> pd.DataFrame:
    """One row per (setting, approach, seed, variant, pair) and one ``pair = mean`` row per
    (setting, approach, seed, variant): composed and from-scratch test accuracy (%) on the
    pair's test images and their difference (pp); the published mean difference beside the
    mean rows. Variant ``continuous_learning`` rows come from records that carry one."""
    scratch = _scratch_models(scratch_paths)
    reference = published()
    rows = []
    for path in composed_paths:
        result = read_json(path)
        missing = [key for key in COMPOSED_KEYS if key not in result]
        if missing:
            raise ArtifactError(f"{path}: not a reuse new-task record (lacks {missing})")
        common = {key: result[key] for key in ("setting", "kind", "approach", "model", "seed")}
        common.update(_pool_columns(result))
        by_variant: dict[str, list[dict]] = {}
        for record in result["pairs"]:
            key = (record["task"], result["model"], result["seed"])
            if key not in scratch:
                raise ArtifactError(f"{path}: no from-scratch {result['model']} (seed "
                                    f"{result['seed']}) on {record['task']} among the given "
                                    "scratch models")
            baseline = scratch[key]
            scratch_accuracy = baseline["metrics"]["test_accuracy"]
            variants = {COMPOSED: record["composed_accuracy"]}
            if "continuous_learning" in record:
                variants[CONTINUOUS] = record["continuous_learning"]["composed_accuracy"]
            for variant, accuracy in variants.items():
                by_variant.setdefault(variant, []).append({
                    **common, "variant": variant, "pair": record["pair"], "task": record["task"],
                    **{f"{field}_{side}": record[f"{field}_{side}"] for side in ("a", "b")
                       for field in ("dataset", "class", "class_name")},
                    **{column: value for side in ("a", "b") for column, value in (
                        (f"module_{side}", _module_label(record[f"module_{side}"])),
                        (f"trained_on_{side}", _trained_on(record[f"module_{side}"])),
                        (f"selection_f1_{side}", record[f"module_{side}"]["selection_f1"]))},
                    "test_images": record["test_images"],
                    "composed_accuracy": accuracy,
                    "scratch_accuracy": scratch_accuracy,
                    "accuracy_difference_pp": accuracy - scratch_accuracy,
                    "scratch_selected_epoch": baseline["selected_epoch"],
                    "scratch_epochs": len(baseline["history"]),
                })
        for variant, pair_rows in by_variant.items():
            value, source = _published_difference(reference, result["approach"],
                                                   result["kind"], variant)
            mean = {**common, "variant": variant, "pair": MEAN, "pairs": len(pair_rows),
                    **{column: sum(r[column] for r in pair_rows) / len(pair_rows)
                       for column in VALUES},
                    "published_accuracy_difference_pp": value, "published_source": source}
            rows += [*pair_rows, mean]
    table = pd.DataFrame(rows)
    # Mean rows leave the per-pair counts empty: nullable integers keep the others integral.
    integral = ["class_a", "class_b", "test_images", "scratch_selected_epoch", "scratch_epochs",
                "pairs", "pool_size_a", "pool_size_b"]
    table[integral] = table[integral].astype("Int64")
    table["is_mean"] = table.pair == MEAN
    # Cross-dataset settings first ("inter" sorts before "intra"): the papers' new tasks cross
    # datasets, and within one dataset random kernels separate two classes about as well.
    return table.sort_values(["kind", "setting", "approach", "seed", "variant", "is_mean",
                              "task"], ignore_index=True).drop(columns="is_mean")


def _pool_columns(result: dict) -> dict:
    """The pool of a composed record: its kind and the candidate module sets per side."""
    candidates = result["candidates"]
    sides = {"a": result["pairs"][0]["dataset_a"], "b": result["pairs"][0]["dataset_b"]} \
        if result["pairs"] else {}
    return {"pool": DIRICHLET_POOL if any(c.get("dirichlet") for c in candidates)
            else BASE_MODELS_POOL,
            **{f"pool_size_{side}": sum(c["dataset"] == dataset for c in candidates)
               for side, dataset in sides.items()}}


def _trained_on(module: dict) -> str:
    # Records from before Dirichlet pools name no trained_on: their models trained on the
    # dataset itself.
    return module.get("trained_on", module["dataset"])


def _module_label(module: dict) -> str:
    return f"{module['model']}/{module['training']}"


def write_new_task_report(composed_paths: list[Path], scratch_paths: list[Path],
                          csv_path: Path, metrics_path: Path | None = None) -> None:
    """E4 as CSV + Markdown (``write_table``), and its DVC metrics: the mean difference per
    setting, approach, seed and variant (``…/seed<seed>/continuous_learning`` for that one)."""
    table = new_task_table(composed_paths, scratch_paths)
    write_table(table, csv_path, title="E4 new tasks: composed modules vs training from scratch",
                keys=["setting", "approach", "variant", "pair"], values=VALUES, notes=NOTES)
    if metrics_path:
        means = table[table.pair == MEAN]
        write_json(metrics_path, {
            f"{row.setting}/{row.approach}/seed{row.seed}"
            + ("" if row.variant == COMPOSED else f"/{row.variant}"): {
                "mean_accuracy_difference_pp": row.accuracy_difference_pp,
                "mean_composed_accuracy": row.composed_accuracy,
                "mean_scratch_accuracy": row.scratch_accuracy, "pairs": int(row.pairs)}
            for row in means.itertuples()})


def new_task_figure(composed_paths: list[Path], scratch_paths: list[Path], path: Path) -> None:
    """Accuracy difference composed − scratch per pair and on average (mean over seeds), one
    panel per setting, one bar colour per approach (hatched: after continuous learning), the
    published mean as the bar's marker; written as ``path`` (PNG) and the same name with
    ``.pdf``."""
    table = new_task_table(composed_paths, scratch_paths)
    settings = sorted(table.setting.unique())
    plt = pyplot()
    widest = max(table[table.setting == s].pair.nunique() for s in settings)
    figure, axes = plt.subplots(len(settings), 1, squeeze=False,
                                figsize=(max(6.0, 0.45 * widest + 2), 3.6 * len(settings)))
    for ax, setting in zip(axes[:, 0], settings, strict=True):
        rows = table[table.setting == setting]
        means = rows.groupby(["approach", "variant", "pair"], as_index=False, sort=False).agg(
            difference=("accuracy_difference_pp", "mean"),
            published=("published_accuracy_difference_pp", "first"))
        pairs = [p for p in rows.pair.unique() if p != MEAN] + [MEAN]
        series = sorted(set(zip(rows.approach, rows.variant, strict=True)),
                        key=lambda s: (s[0], s[1] != COMPOSED))
        width = 0.8 / len(series)
        for offset, (approach, variant) in enumerate(series):
            ours = means[(means.approach == approach) & (means.variant == variant)].set_index(
                "pair")
            style = approach_style(approach)
            label = approach if variant == COMPOSED else f"{approach} + continuous learning"
            if (rows[rows.approach == approach].pool == DIRICHLET_POOL).any():
                label += " (Dirichlet pool)"
            xs = [i - 0.4 + width * (offset + 0.5) for i in range(len(pairs))]
            ys = [ours.difference.get(p, float("nan")) for p in pairs]
            ax.bar(xs, ys, width, color=style["color"], alpha=0.6, label=label,
                   hatch=None if variant == COMPOSED else "//", edgecolor="white")
            # The marker shows a difference of zero, which has no bar.
            ax.plot(xs, ys, linestyle="none", markersize=5, label="_nolegend_", **style)
            published_mean = ours.published.get(MEAN)
            if published_mean is not None and not pd.isna(published_mean):
                ax.plot(xs[-1], published_mean, linestyle="none", markeredgecolor="black",
                        markersize=9, label=f"{label}: published mean", **style)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.use_sticky_edges = False  # bars stick to 0: markers there would be cut in half
        ax.margins(y=0.1)
        ax.axvline(len(pairs) - 1.5, color="gray", linewidth=0.6, linestyle=":")
        ax.set_xticks(range(len(pairs)), pairs, rotation=60, ha="right", fontsize=7)
        kind = rows.kind.iloc[0]
        ax.set_title(f"{setting} ({kind}-dataset pairs, baseline {rows.model.iloc[0]})")
        ax.set_xlabel("class pair (dataset/class index), then the mean over pairs")
        ax.set_ylabel("composed − scratch accuracy (pp)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)

"""E6, intra-dataset replacement (Pan & Rajan): the module set of a weaker model with the
module of class k swapped for class k's module of a stronger model of the same dataset,
composed N-class top-1/top-5 test accuracy per k.

The scores of all 2N modules (the weaker set's and the stronger set's) are computed once over
the test images, one batched masked pass per set. A module's score does not depend on the
other modules, so the composition swapping class k is the weaker set's score columns with
column k taken from the stronger set's, combined by the sets' rule (``voting`` for Pan &
Rajan): no module is extracted, and no network is built per swap. The baselines are the two
module sets composed unchanged and the two base models.

The two module sets must recognise the same classes of the same dataset and combine scores by
the same rule; the models may differ in architecture (the paper swaps between ResNets).
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch
from torch import nn

from dnnmod.artifacts import read_json, write_json
from dnnmod.errors import ConfigError
from dnnmod.modules.combination import combine_scores
from dnnmod.modules.inference import run
from dnnmod.modules.metrics import module_scores, top_k_accuracy
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.tables import published, published_value, write_table


def check_pair(weaker: ModuleSet, stronger: ModuleSet, where: str) -> None:
    """ConfigError naming what differs unless the two sets can stand in for each other."""
    for key in ("dataset", "num_classes"):
        if weaker.base.get(key) != stronger.base.get(key):
            raise ConfigError(f"{where}: the weaker modules are of {key} "
                              f"{weaker.base.get(key)!r}, the stronger of "
                              f"{stronger.base.get(key)!r}; replacement swaps modules of one "
                              "dataset")
    if weaker.classes != stronger.classes:
        raise ConfigError(f"{where}: the module sets recognise classes {weaker.classes} and "
                          f"{stronger.classes}; replacement needs the same classes")
    if weaker.combination != stronger.combination:
        raise ConfigError(f"{where}: the module sets combine by {weaker.combination!r} and "
                          f"{stronger.combination!r}; a swapped module must be combined by "
                          "its set's rule")


@torch.no_grad()
def replacement_scores(weaker: tuple[nn.Module, ModuleSet], stronger: tuple[nn.Module, ModuleSet],
                       test) -> torch.Tensor:
    """Scores of the weaker set's N modules then the stronger set's N on the ImageSet ``test``:
    (images, 2N) or (images, 2N, k). One batched masked pass per set; every swap is then a
    choice of columns, so no module is extracted or run twice."""
    return torch.cat([module_scores(model, modules, test).float()
                      for model, modules in (weaker, stronger)], dim=1)


def replace_modules(weaker: tuple[nn.Module, ModuleSet], stronger: tuple[nn.Module, ModuleSet],
                    test) -> dict[str, Any]:
    """E6 for one pair: per swapped class, the composed top-1/top-5 and the swapped class's
    recall; the baselines (each set composed as is, each base model) beside."""
    check_pair(weaker[1], stronger[1], "replacement")
    classes = weaker[1].classes
    combination = weaker[1].combination
    count = len(classes)
    scores = replacement_scores(weaker, stronger, test)
    labels = test.labels

    def measure(columns: list[int]) -> dict[str, float]:
        chosen = scores[:, columns]
        predicted = combine_scores(combination, chosen, classes)
        return {"top1": 100.0 * (predicted == labels).float().mean().item(),
                "top5": top_k_accuracy(chosen, classes, labels, 5), "predicted": predicted}

    def model_accuracy(model: nn.Module) -> dict[str, float]:
        logits = run(model, test)
        every = list(range(logits.shape[1]))
        return {"top1": top_k_accuracy(logits, every, labels, 1),
                "top5": top_k_accuracy(logits, every, labels, 5)}

    weaker_composed = measure(list(range(count)))
    stronger_composed = measure(list(range(count, 2 * count)))
    rows = []
    for position, label in enumerate(classes):
        columns = [count + j if j == position else j for j in range(count)]
        result = measure(columns)
        own = labels == label
        rows.append({
            "swapped_class": label, "class_name": test.class_names[label],
            "top1": result["top1"], "top5": result["top5"],
            "class_recall": 100.0 * (result["predicted"][own] == label).float().mean().item(),
            "weaker_class_recall": 100.0 * (weaker_composed["predicted"][own] == label)
            .float().mean().item(),
        })
    return {
        "weaker_composed_top1": weaker_composed["top1"],
        "weaker_composed_top5": weaker_composed["top5"],
        "stronger_composed_top1": stronger_composed["top1"],
        "stronger_composed_top5": stronger_composed["top5"],
        **{f"weaker_model_{k}": v for k, v in model_accuracy(weaker[0]).items()},
        **{f"stronger_model_{k}": v for k, v in model_accuracy(stronger[0]).items()},
        "rows": rows,
    }


def replacement_record(weaker: tuple[nn.Module, dict[str, Any], ModuleSet],
                       stronger: tuple[nn.Module, dict[str, Any], ModuleSet], test,
                       device: str) -> dict[str, Any]:
    """The per-pair record the E6 table reads: which models and module sets, and
    :func:`replace_modules`' result. Each argument: (model, its metadata, its module set)."""
    started = time.monotonic()
    seeds = {weaker[2].provenance["seed"], stronger[2].provenance["seed"]}
    if len(seeds) != 1:
        raise ConfigError(f"replacement: module sets of seeds {sorted(seeds)}; a pair is "
                          "compared within one seed")
    if weaker[2].approach != stronger[2].approach:
        raise ConfigError(f"replacement: {weaker[2].approach} modules and "
                          f"{stronger[2].approach} modules; swap modules of one approach")
    result = replace_modules(weaker[::2], stronger[::2], test)
    return {
        "experiment": "e6_replacement", "approach": weaker[2].approach,
        "dataset": weaker[1]["dataset"], "seed": seeds.pop(),
        **{role: {"model": meta["model"], "arch": meta["arch"],
                  "weights_sha256": meta.get("weights_sha256")}
           for role, (_, meta, _) in (("weaker", weaker), ("stronger", stronger))},
        **result, "seconds": time.monotonic() - started, "device": device,
    }


# E6 table and figure, from the per-pair records.

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

"""The reproduction scorecard and the short reading that opens each experiment's section.

The scorecard has one row per published headline that the study's results can be set against:
a figure of ``reference/published.csv`` whose approach, model and dataset the study ran. Each
row gives our value, the published one, Δ (ours − published) and the verdict:

- accuracies and accuracy losses (pp): within ±1 pp;
- kernel or parameter retention (KRR, module size) and relative reductions (%): within ±5 pp;
- gains (patching precision/recall/F1, reuse against training from scratch, replacement):
  the same sign and within ±3 pp.

A row outside its tolerance names the study's deviations from the papers that bear on it
(``affects`` in reference/paper_settings.yaml), or says that none is stated. Everything is
computed from the result tables the report shows (``tables/<name>.csv``); columns are picked
by name, so a table that gains a headline column (``krr_paper``, say) is read by it.

Beside it, :func:`controls_card` sets each approach against its random control (``random_<A>``:
as many kernels per class and layer, drawn at random from the same model) wherever both have
rows: E2's composed accuracy loss, E3's F1 gain, E4's accuracy against training from scratch
and E5's sub-task accuracy. No paper reports a control; the margin says whether the kernels an
approach chooses do better than chance at its own size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dnnmod.controls import control_name, control_of
from dnnmod.deviations import deviation_table
from dnnmod.report.tables import published

#: tolerance of each kind of figure: (allowed |Δ|, the sign must match)
TOLERANCES = {"accuracy": (1.0, False), "retention": (5.0, False), "gain": (3.0, True)}
#: datasets each paper's approach-level (abstract) headlines were measured on
HEADLINE_DATASETS = {
    "cnnsplitter": {"cifar10", "svhn"},
    "gradsplitter": {"cifar10", "svhn"},
    "mwt": {"cifar10", "svhn"},
    "moda": {"cifar10", "svhn", "cifar100"},
    "pan_rajan": {"cifar10", "cifar100", "tinyimagenet"},
}
COLUMNS = [
    "experiment",
    "approach",
    "model/dataset",
    "metric",
    "ours",
    "published",
    "Δ",
    "verdict",
    "source",
]


def _read(tables: Path, name: str) -> pd.DataFrame | None:
    path = tables / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _first_column(frame: pd.DataFrame, *names: str) -> str | None:
    """The first of ``names`` that ``frame`` has with a value in some row."""
    return next((n for n in names if n in frame.columns and frame[n].notna().any()), None)


def _row(
    experiment: str,
    approach: str,
    where: str,
    metric: str,
    ours: float,
    published_value: float,
    kind: str,
    source: str,
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "approach": approach,
        "model/dataset": where,
        "metric": metric,
        "ours": ours,
        "published": published_value,
        "Δ": ours - published_value,
        "kind": kind,
        "source": source,
    }


def _base_dataset(name: str) -> str:
    """The official dataset a task is drawn from (svhn_0_4 → svhn)."""
    return name.split("_", 1)[0]


def _on_paper_datasets(table: pd.DataFrame) -> pd.DataFrame:
    """The rows whose dataset (both, for a pair task) is one its approach's paper used: an
    approach-level headline stands for those datasets only."""
    columns = [c for c in ("dataset", "dataset_a", "dataset_b") if c in table]
    if table.empty or not columns:
        return table
    keep = pd.Series(True, index=table.index)
    for column in columns:
        keep &= pd.Series(
            [
                _base_dataset(str(dataset)) in HEADLINE_DATASETS.get(approach, set())
                for dataset, approach in zip(table[column], table["approach"], strict=True)
            ],
            index=table.index,
        )
    return table[keep]


def _e1_rows(tables: Path) -> list[dict[str, Any]]:
    e1 = _read(tables, "e1_base_models")
    if e1 is None or not {"published_test_accuracy", "test_accuracy", "training"} <= set(e1):
        return []
    architecture = "arch" if "arch" in e1 else "model"  # the published figure's architecture
    rows = []
    measured = e1.dropna(subset=["published_test_accuracy"])
    for (arch, dataset, training), group in measured.groupby([architecture, "dataset", "training"]):
        rows.append(
            _row(
                "E1",
                training,
                f"{arch}/{dataset}",
                "test accuracy (%)",
                group.test_accuracy.mean(),
                group.published_test_accuracy.iloc[0],
                "accuracy",
                group.published_source.iloc[0],
            )
        )
    return rows


#: E2 figures: published metric → (our column candidates, scale of ours to the published
#: unit, kind, label)
E2_METRICS = {
    "accuracy_loss_pp": (
        ("headline_loss_pp", "accuracy_loss_pp"),
        1.0,
        "accuracy",
        "accuracy loss (pp)",
    ),
    "krr_pct": (("krr_paper", "paper_krr", "krr"), 100.0, "retention", "KRR (%)"),
    "module_size_fraction_params": (("module_size",), 100.0, "retention", "module size (%)"),
}


def _e2_rows(tables: Path, reference: pd.DataFrame) -> list[dict[str, Any]]:
    e2 = _read(tables, "e2_modularization")
    rows = []
    figures = reference[reference.metric.isin(E2_METRICS)] if e2 is not None else reference[:0]
    for item in figures.itertuples():
        candidates, scale, kind, label = E2_METRICS[item.metric]
        mine = e2[e2.approach == item.approach]
        if item.model:  # a per-model figure: the same architecture and dataset
            mine, where = (
                mine[(mine.arch == item.model) & (mine.dataset == item.dataset)],
                (f"{item.model}/{item.dataset}"),
            )
        else:  # a headline: our mean over the paper's datasets
            datasets = HEADLINE_DATASETS.get(item.approach, set())
            mine = mine[mine.dataset.map(_base_dataset).isin(datasets)]
            where = f"mean over {', '.join(sorted(set(mine.dataset)))}" if len(mine) else ""
        column = _first_column(mine, *candidates) if len(mine) else None
        if column is None:
            continue
        published_value = item.value * (100.0 if item.metric.endswith("fraction_params") else 1.0)
        rows.append(
            _row(
                "E2",
                item.approach,
                where,
                label,
                mine[column].mean() * scale,
                published_value,
                kind,
                f"{item.source} {item.table}",
            )
        )
    orderings = _read(tables, "e2_orderings")
    if orderings is not None and "published_fewer_pct" in orderings:
        orderings = orderings.assign(approach=orderings.claim.str.split(" ").str[0])
        measured = _on_paper_datasets(orderings).dropna(subset=["published_fewer_pct", "fewer_pct"])
        for claim, group in measured.groupby("claim"):
            rows.append(
                _row(
                    "E2",
                    claim.split(" ", 1)[0],
                    "mean over shared models",
                    f"{claim.split(' ', 1)[1]} (% fewer)",
                    group.fewer_pct.mean(),
                    group.published_fewer_pct.iloc[0],
                    "retention",
                    group.source.iloc[0],
                )
            )
    return rows


def _pan_rajan_rows(tables: Path) -> list[dict[str, Any]]:
    table = _read(tables, "pan_rajan_decomposition")
    needed = {"published_model_top1", "published_composed_top1", "top1_loss_pp"}
    if table is None or not needed <= set(table.columns):
        return []
    rows = []
    for (model, dataset), group in table.dropna(
        subset=["published_model_top1", "published_composed_top1"]
    ).groupby(["model", "dataset"]):
        published_loss = group.published_model_top1.iloc[0] - group.published_composed_top1.iloc[0]
        rows.append(
            _row(
                "E2",
                "pan_rajan",
                f"{model}/{dataset}",
                "top-1 loss (pp)",
                group.top1_loss_pp.mean(),
                published_loss,
                "accuracy",
                group.published_source.iloc[0],
            )
        )
    return rows


#: E3 headline gains: published metric → our column
E3_GAINS = {
    "precision_gain_pct": "precision_gain_pp",
    "recall_gain_pct": "recall_gain_pp",
    "f1_gain_pct": "f1_gain_pp",
    "non_tc_accuracy_gain_pct": "non_tc_accuracy_gain_pp",
}


def _e3_rows(tables: Path, reference: pd.DataFrame) -> list[dict[str, Any]]:
    e3 = _read(tables, "e3_patching")
    if e3 is None:
        return []
    if "target" in e3 and (e3.target.astype(str) == "average").any():
        e3 = e3[e3.target.astype(str) == "average"]  # the papers average setting means
    rows = []
    headlines = reference[reference.metric.isin(E3_GAINS) & (reference.model == "")]
    for item in headlines.itertuples():
        protocol = "moda" if item.setting == "patch_moda" else "minmax"
        mine = e3[e3.approach == item.approach]
        if "protocol" in mine:
            mine = mine[mine.protocol == protocol]
        origin = mine["source_dataset"] if "source_dataset" in mine else mine["dataset"]
        mine = mine[origin.map(_base_dataset).isin(HEADLINE_DATASETS.get(item.approach, set()))]
        column = E3_GAINS[item.metric]
        if mine.empty or column not in mine or mine[column].isna().all():
            continue
        datasets = ", ".join(sorted(set(mine["dataset"].astype(str))))
        rows.append(
            _row(
                "E3",
                item.approach,
                f"mean over {len(mine)} {protocol} settings ({datasets})",
                column.replace("_pp", " (pp)").replace("_", " "),
                mine[column].mean(),
                item.value,
                "gain",
                f"{item.source} {item.table}",
            )
        )
    return rows


def _grouped_rows(
    tables: Path,
    name: str,
    experiment: str,
    keys: list[str],
    column: str,
    published_column: str,
    kind: str,
    label: str,
    where: Callable[[tuple], str],
) -> list[dict[str, Any]]:
    table = _read(tables, name)
    if table is None or published_column not in table or column not in table:
        return []
    if "pair" in table:  # per-pair rows only, not their means
        table = table[table.pair.astype(str) != "mean"]
    table = _on_paper_datasets(table)
    rows = []
    for key, group in table.dropna(subset=[published_column, column]).groupby(keys):
        rows.append(
            _row(
                experiment,
                key[keys.index("approach")],
                where(key),
                label,
                group[column].mean(),
                group[published_column].iloc[0],
                kind,
                group.published_source.iloc[0] if "published_source" in group else "",
            )
        )
    return rows


def _e5_rows(tables: Path) -> list[dict[str, Any]]:
    table = _read(tables, "e5_subtask_reuse")
    if table is None or "published_mean_accuracy" not in table:
        return []
    column = _first_column(
        table.dropna(subset=["published_mean_accuracy"]), "union_accuracy", "composed_accuracy"
    )
    if column is None:
        return []
    return _grouped_rows(
        tables,
        "e5_subtask_reuse",
        "E5",
        ["approach", "arch", "dataset"],
        column,
        "published_mean_accuracy",
        "accuracy",
        f"reuse accuracy (%, {column.replace('_', ' ')})",
        lambda key: f"{key[1]}/{key[2]}",
    )


def scorecard(tables: Path, config: Mapping[str, Any]) -> pd.DataFrame:
    """The scorecard of the study whose result tables are in ``tables`` (COLUMNS)."""
    reference = published()
    rows = (
        _e1_rows(tables)
        + _e2_rows(tables, reference)
        + _pan_rajan_rows(tables)
        + _e3_rows(tables, reference)
        + _grouped_rows(
            tables,
            "e4_new_tasks",
            "E4",
            ["setting", "approach", "variant"],
            "accuracy_difference_pp",
            "published_accuracy_difference_pp",
            "gain",
            "composed − from scratch (pp)",
            lambda key: f"{key[0]} ({key[2]})",
        )
        + _e5_rows(tables)
        + _grouped_rows(
            tables,
            "e6_replacement",
            "E6",
            ["approach", "dataset", "weaker", "stronger"],
            "top1_change_pp",
            "published_mean_top1_change_pp",
            "gain",
            "top-1 change (pp)",
            lambda key: f"{key[2]} ← {key[3]} on {key[1]}",
        )
    )
    deviations = deviation_table(config)
    for row in rows:
        row["verdict"] = verdict(row, deviations)
    return pd.DataFrame(rows, columns=COLUMNS)


#: each experiment's comparison with the random controls: its table, the column compared,
#: whether higher is better, and the keys one comparison holds fixed (those the table has)
CONTROL_COMPARISONS = [
    (
        "E2",
        "e2_modularization",
        "composed_loss_pp",
        False,
        ["model", "dataset"],
        "composed accuracy loss (pp)",
    ),
    ("E3", "e3_patching", "f1_gain_pp", True, ["protocol", "setting", "model"], "F1 gain (pp)"),
    # what the module knows of the target class, before a protocol's calibration
    (
        "E3",
        "e3_patching",
        "module_auc",
        True,
        ["protocol", "setting", "model"],
        "module ROC AUC, target class vs the rest",
    ),
    (
        "E4",
        "e4_new_tasks",
        "accuracy_difference_pp",
        True,
        ["setting", "kind", "variant"],
        "composed − from scratch (pp)",
    ),
    (
        "E5",
        "e5_subtask_reuse",
        "accuracy_diff_pp",
        True,
        ["model", "dataset"],
        "sub-task accuracy − model's (pp)",
    ),
    # MwT's and MODA's sub-task headline: the union network (MwT's fine-tuned), where the
    # control's union networks were built too (reuse.subtasks.union_approaches)
    (
        "E5",
        "e5_subtask_reuse",
        "union_diff_pp",
        True,
        ["model", "dataset"],
        "union network − model's (pp)",
    ),
    (
        "E5",
        "e5_subtask_reuse",
        "finetuned_diff_pp",
        True,
        ["model", "dataset"],
        "fine-tuned union network − model's (pp)",
    ),
]
CONTROL_COLUMNS = [
    "experiment",
    "approach",
    "where",
    "metric",
    "approach_value",
    "control_value",
    "margin",
    "verdict",
]


def _own_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per-target and per-pair rows, not their averages and means."""
    for column, summary in (("target", "average"), ("pair", "mean")):
        if column in table:
            table = table[table[column].astype(str) != summary]
    return table


def controls_card(tables: Path) -> pd.DataFrame:
    """Each approach against its random control (CONTROL_COLUMNS), where both have rows: the
    means over the rows that share the comparison's keys; margin > 0: the approach does better
    than its control (its loss is lower, its gain higher)."""
    rows = []
    for experiment, name, column, higher, wanted, label in CONTROL_COMPARISONS:
        table = _read(tables, name)
        if table is None or column not in table or "approach" not in table:
            continue
        table = _own_rows(table).dropna(subset=[column])
        keys = [key for key in wanted if key in table]
        means = table.groupby(["approach", *keys])[column].mean()
        for index, value in means.items():
            index = index if isinstance(index, tuple) else (index,)
            approach, key = index[0], index[1:]
            control = (control_name(approach), *key)
            if control_of(approach) or control not in means.index:
                continue
            margin = (value - means[control]) if higher else (means[control] - value)
            rows.append(
                {
                    "experiment": experiment,
                    "approach": approach,
                    "where": ", ".join(f"{k} {v}" for k, v in zip(keys, key, strict=True)),
                    "metric": label,
                    "approach_value": value,
                    "control_value": means[control],
                    "margin": margin,
                    "verdict": f"{'above' if margin > 0 else 'not above'} {control[0]}",
                }
            )
    return pd.DataFrame(rows, columns=CONTROL_COLUMNS)


def within_tolerance(kind: str, ours: float, published_value: float) -> bool:
    allowed, same_sign = TOLERANCES[kind]
    if same_sign and (ours > 0) != (published_value > 0):
        return False
    return abs(ours - published_value) <= allowed


def _in_scope(setting: str, where: str) -> bool:
    """A setting scoped to one dataset (``...gamma[svhn]``) bears only on rows that name it."""
    scope = setting[setting.index("[") + 1 : -1] if setting.endswith("]") else ""
    return scope in where


def verdict(row: Mapping[str, Any], deviations: list[dict[str, str]]) -> str:
    allowed, same_sign = TOLERANCES[row["kind"]]
    rule = f"{'same sign, ' if same_sign else ''}±{allowed:g}"
    if within_tolerance(row["kind"], row["ours"], row["published"]):
        return f"within tolerance ({rule})"
    tags = {row["experiment"].lower(), f"{row['experiment'].lower()}:{row['approach']}"}
    bearing = [
        d["setting"]
        for d in deviations
        if tags & set(d["affects"].split()) and _in_scope(d["setting"], row["model/dataset"])
    ]
    reason = (
        f"deviations that bear on it: {', '.join(bearing)}"
        if bearing
        else "no stated deviation explains it"
    )
    return f"outside tolerance ({rule}); {reason}"


# ------------------------------------------------------------------- readings of the tables


def _extreme(frame: pd.DataFrame, by: str, column: str, low: bool) -> tuple[str, float] | None:
    """The group of ``by`` with the lowest (highest) mean ``column``; None when none has one."""
    means = frame.groupby(by)[column].mean().dropna()
    if means.empty:
        return None
    name = means.idxmin() if low else means.idxmax()
    return str(name), float(means[name])


def _best_and_share(rows: pd.DataFrame, column: str, holds) -> tuple[str, float, float] | None:
    """The approach of the highest mean ``column`` over ``rows``, that mean, and the share of
    ``rows`` (%) whose ``column`` value ``holds`` (a test of a column); None without one."""
    best = _extreme(rows, "approach", column, low=False)
    if best is None:
        return None
    return (*best, holds(rows[column]).mean() * 100)


def _furthest(frame: pd.DataFrame, difference: str) -> pd.Series | None:
    """The row whose ``difference`` (ours − published) is largest in size; None if none."""
    if difference not in frame or frame[difference].isna().all():
        return None
    return frame.loc[frame[difference].abs().idxmax()]


def _read_e1(tables: Path) -> list[str]:
    e1 = _read(tables, "e1_base_models")
    if e1 is None or e1.empty:
        return []
    best = e1.loc[e1.test_accuracy.idxmax()]
    worst = e1.loc[e1.test_accuracy.idxmin()]
    text = [
        f"{len(e1)} base models; test accuracy from {worst.test_accuracy:.2f} % "
        f"({worst.model}/{worst.dataset}, {worst.training}) to {best.test_accuracy:.2f} % "
        f"({best.model}/{best.dataset}, {best.training})."
    ]
    far = _furthest(e1, "test_accuracy_minus_published")
    if far is not None:
        text.append(
            f"Furthest from its published accuracy: {far.model}/{far.dataset} "
            f"({far.training}), {far.test_accuracy_minus_published:+.2f} pp."
        )
    return text


def _read_e2(tables: Path) -> list[str]:
    e2 = _read(tables, "e2_modularization")
    if e2 is None or e2.empty:
        return []
    loss = _first_column(e2, "headline_loss_pp", "accuracy_loss_pp")
    krr = _first_column(e2, "krr_paper", "paper_krr", "krr")
    text = []
    if loss and not _approaches(e2).empty:
        name, value = _extreme(_approaches(e2), "approach", loss, low=True)
        worst, worst_value = _extreme(_approaches(e2), "approach", loss, low=False)
        text.append(
            f"Least accuracy lost: {name} ({value:.2f} pp on average over its base "
            f"models); most: {worst} ({worst_value:.2f} pp)."
        )
    fewest = _extreme(_approaches(e2), "approach", krr, low=True) if krr else None
    if fewest:
        text.append(f"Fewest kernels kept: {fewest[0]} (KRR {100 * fewest[1]:.1f} %).")
    # a per-model published KRR, not an approach's headline set beside every row
    sources = e2.get("published_source", pd.Series("", index=e2.index)).astype(str)
    own = e2[~sources.str.contains("headline")]
    far = _furthest(own, "krr_minus_published")
    if far is not None:
        text.append(
            f"KRR furthest from published: {far.approach} on {far.model}/{far.dataset}"
            f" ({100 * far.krr_minus_published:+.1f} pp)."
        )
    return text + _against_controls(tables, "E2")


def _approaches(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of approaches, not of their random controls."""
    return table[table.approach.map(control_of).isna()]


def _against_controls(tables: Path, experiment: str, kind: str = "") -> list[str]:
    """A sentence per metric: each approach's value against its random control's
    (controls_card), averaged over the experiment's comparisons (E4: those of pair tasks of
    ``kind``)."""
    card = controls_card(tables)
    card = card[(card.experiment == experiment) & card["where"].str.contains(kind)]
    text = []
    for metric, rows in card.groupby("metric", sort=False):
        means = rows.groupby("approach")[["approach_value", "control_value", "margin"]].mean()
        parts = [
            f"{approach} {row.approach_value:+.2f} vs {row.control_value:+.2f}"
            for approach, row in means.iterrows()
        ]
        text.append(
            f"Against its random control ({metric}, the same kernel counts drawn at random): "
            f"{'; '.join(parts)}; {(means.margin > 0).sum()} of {len(means)} approaches do "
            "better than their control."
        )
    return text


def _read_e3(tables: Path) -> list[str]:
    e3 = _read(tables, "e3_patching")
    if e3 is None or e3.empty or "f1_gain_pp" not in e3:
        return []
    per_target = e3[e3.target.astype(str) != "average"] if "target" in e3 else e3
    rows = _approaches((per_target if len(per_target) else e3).dropna(subset=["f1_gain_pp"]))
    best = _best_and_share(rows, "f1_gain_pp", lambda gain: gain > 0)
    if best is None:
        return []
    name, value, improved = best
    return [
        f"Largest mean F1 gain from patching: {name} ({value:+.2f} pp); patching raised "
        f"the target class's F1 in {improved:.0f} % of {len(rows)} weak-model/target rows."
    ] + _against_controls(tables, "E3")


def _read_e4(tables: Path) -> list[str]:
    e4 = _read(tables, "e4_new_tasks")
    if e4 is None or e4.empty or "accuracy_difference_pp" not in e4:
        return []
    rows = e4[e4.pair.astype(str) != "mean"] if "pair" in e4 else e4
    rows = rows.dropna(subset=["accuracy_difference_pp"])
    if "kind" not in rows:
        return _e4_reading(rows, "") + _against_controls(tables, "E4")
    # The papers' new tasks cross datasets (GradSplitter's CIFAR-10 class x SVHN digit, Pan &
    # Rajan's inter-dataset reuse): those pairs lead; pairs within one dataset follow, since
    # there random kernels separate two classes about as well as real modules (fidelity.md).
    return (
        _e4_reading(rows[rows.kind == "inter"], " across datasets")
        + _against_controls(tables, "E4", "kind inter")
        + _e4_reading(rows[rows.kind == "intra"], " within one dataset")
    )


def _e4_reading(rows: pd.DataFrame, where: str) -> list[str]:
    """The best approach against training from scratch over ``rows`` (pair tasks; the random
    controls' are read against their approaches instead)."""
    rows = _approaches(rows)
    best = _best_and_share(rows, "accuracy_difference_pp", lambda difference: difference >= 0)
    if best is None:
        return []
    name, value, beaten = best
    return [
        f"Best against training from scratch{where}: {name} ({value:+.2f} pp on average); "
        f"composed models matched or beat the from-scratch model on {beaten:.0f} % of "
        f"{len(rows)} pair tasks."
    ]


def _read_e5(tables: Path) -> list[str]:
    e5 = _read(tables, "e5_subtask_reuse")
    if e5 is None or e5.empty or "accuracy_diff_pp" not in e5:
        return []
    best = _extreme(_approaches(e5), "approach", "accuracy_diff_pp", low=False)
    return [] if best is None else [
        f"Least accuracy lost on sub-tasks against the decomposed model: {best[0]} "
        f"({best[1]:+.2f} pp averaged over sizes)."] + _against_controls(tables, "E5")


def _read_e6(tables: Path) -> list[str]:
    e6 = _read(tables, "e6_replacement")
    if e6 is None or e6.empty or "top1_change_pp" not in e6:
        return []
    improved = int((e6.top1_change_pp > 0).sum())
    return [
        f"Replacing one class's module changed composed top-1 by "
        f"{e6.top1_change_pp.mean():+.2f} pp on average; {improved} of {len(e6)} swaps "
        "improved it."
    ]


def _read_e7(tables: Path) -> list[str]:
    e7 = _read(tables, "e7_sensitivity")
    if e7 is None or e7.empty or "accuracy_loss_pp" not in e7:
        return []
    text = []
    for (approach, parameter), group in e7.groupby(["approach", "parameter"]):
        means = group.groupby("value").accuracy_loss_pp.mean()
        text.append(
            f"{approach} {parameter}: accuracy loss {means.min():.2f}–"
            f"{means.max():.2f} pp over {len(means)} values."
        )
    return text


def _read_e8(tables: Path) -> list[str]:
    e8 = _read(tables, "e8_cost")
    if e8 is None or e8.empty or "energy_wh" not in e8:
        return []
    stages = e8.groupby("stage").energy_wh.sum()
    top = stages.idxmax()
    return [
        f"{e8.energy_wh.sum():.1f} Wh in all; {top} used the most "
        f"({100 * stages[top] / max(stages.sum(), 1e-12):.0f} %)."
    ]


READINGS: dict[str, Callable[[Path], list[str]]] = {
    "e1": _read_e1,
    "e2": _read_e2,
    "e3": _read_e3,
    "e4": _read_e4,
    "e5": _read_e5,
    "e6": _read_e6,
    "e7": _read_e7,
    "e8": _read_e8,
}


def reading(tables: Path, experiment: str) -> str:
    """A few sentences computed from ``experiment``'s table (``e2``), "" when it has none."""
    return " ".join(READINGS[experiment](tables)) if experiment in READINGS else ""

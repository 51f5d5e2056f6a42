"""E7 sensitivity and ablations: the sweep points a study configures, their table and figure.

A sweep (``sensitivity.sweeps`` in the config) varies one hyperparameter of one approach on
some base models; everything else stays as the study configures it. Where the parameter acts
decides what a point costs:

- an approach hyperparameter (``approaches.<name>``: GradSplitter's α, CNNSplitter's
  ``grouping``/``initialisation`` heuristics switches, MwT's and MODA's τ ``threshold``) acts at
  decomposition time: the point decomposes the study's own trained model again;
- a hyperparameter of the approach's training kind (``objectives.<kind>``: MwT's α, β; MODA's
  α, β, γ) acts at training time: the point trains a model of that kind with the value, then
  decomposes it with the study's approach settings.

The point whose value is the study's own is the study's module set (and model): it is read,
not recomputed. Each point's metrics are the shared ones (:mod:`dnnmod.modules.metrics`, the
``metrics.json`` record E2 reads too).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dnnmod.artifacts import read_json, write_json
from dnnmod.errors import ArtifactError, ConfigError, UnknownNameError
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.tables import write_table
from dnnmod.study import expand_base_models, modularization_hyperparameters

DECOMPOSITION, TRAINING = "decomposition", "training"
# A value becomes part of a path (<parameter>-<value>): plain words and numbers only.
VALUE_TEXT = re.compile(r"^[A-Za-z0-9_.+\-]+$")
POINT_KEYS = ("approach", "dataset", "model", "parameter", "value", "stage", "training",
              "default", "configured", "seed")
METRIC_COLUMNS = ["base_accuracy", "composed_accuracy", "accuracy_loss_pp", "krr",
                  "module_size", "flops_fraction", "overlap", "mean_f1", "train_seconds",
                  "modularize_seconds", "device"]
SUMMARY_VALUES = ["composed_accuracy", "accuracy_loss_pp", "krr", "module_size"]


def value_text(value: Any) -> str:
    """A swept value as it appears in paths and tables: JSON for numbers and booleans (0.9,
    1e-05, true), the word itself for a string."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class SweepPoint:
    """One value of one swept hyperparameter on one base model.

    ``stage``: ``decomposition`` (an approach hyperparameter) or ``training`` (one of the
    approach's training kind ``training``); ``default``: the study's own value.
    """

    approach: str
    dataset: str
    model: str
    parameter: str
    value: Any
    stage: str
    training: str
    default: Any

    @property
    def variant(self) -> str:
        """The point's folder name beside the study's module sets: ``<parameter>-<value>``."""
        return f"{self.parameter}-{value_text(self.value)}"

    @property
    def is_default(self) -> bool:
        """Whether the point is the study's own setting (its module set is reused)."""
        if _is_number(self.value) and _is_number(self.default):
            return self.value == self.default
        return type(self.value) is type(self.default) and self.value == self.default

    def record(self, seed: int) -> dict[str, Any]:
        """What the table reads about the point (values as text: one column of one type)."""
        return {**asdict(self), "value": value_text(self.value),
                "default": value_text(self.default), "configured": self.is_default,
                "seed": seed}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plan_sweeps(config: dict[str, Any]) -> list[SweepPoint]:
    """Every point of ``sensitivity.sweeps``, checked: the approach is registered, the models
    are base models of the study, the parameter is a hyperparameter of the approach or of its
    training kind, every value is valid for it, no point is listed twice. Errors name the
    config key at fault."""
    from dnnmod.approaches import APPROACHES
    from dnnmod.training.objectives import get_objective

    base_models = expand_base_models(config)
    points: dict[tuple[str, str, str, str], SweepPoint] = {}
    for position, sweep in enumerate(config.get("sensitivity", {}).get("sweeps", [])):
        where = f"sensitivity.sweeps[{position}]"
        name, parameter = sweep["approach"], sweep["parameter"]
        if name not in APPROACHES:
            raise ConfigError(f"{where}.approach: {UnknownNameError('approach', name, APPROACHES)}")
        approach = APPROACHES[name]
        configured = config.get("approaches", {}).get(name, {})
        hyperparameters = approach.resolve(configured)
        training = approach.training_for(hyperparameters)
        objective_configured = config.get("objectives", {}).get(training, {})
        objective = get_objective(training, objective_configured).hyperparameters
        if parameter in hyperparameters and parameter in objective:
            raise ConfigError(f"{where}.parameter: {parameter!r} is both a hyperparameter of "
                              f"{name} and of its training kind {training!r}; which one a "
                              "sweep varies would be ambiguous")
        if parameter in hyperparameters:
            stage, default = DECOMPOSITION, hyperparameters[parameter]
        elif parameter in objective:
            stage, default = TRAINING, objective[parameter]
            if approach.references(hyperparameters):
                raise ConfigError(f"{where}: {name} reads the module sets of "
                                  f"{approach.references(hyperparameters)} cut from the same "
                                  "model; a training-time sweep trains other models")
        else:
            raise ConfigError(
                f"{where}.parameter: {parameter!r} is not a hyperparameter of {name} "
                f"({', '.join(sorted(hyperparameters))}) or of its training kind {training!r} "
                f"({', '.join(sorted(objective)) or 'none'})")
        for model in sweep["models"]:
            if (sweep["dataset"], model) not in base_models:
                raise ConfigError(f"{where}.models: {model} on {sweep['dataset']} is not a "
                                  "base model of this study (add it under base_models)")
        # a modularize entry may set the approach's hyperparameters for its models
        here = {model: modularization_hyperparameters(config, name, sweep["dataset"], model)
                for model in sweep["models"]}
        defaults = {model: approach.resolve(here[model])[parameter] if stage == DECOMPOSITION
                    else default for model in sweep["models"]}
        for index, value in enumerate(sweep["values"]):
            if not VALUE_TEXT.match(value_text(value)):
                raise ConfigError(f"{where}.values[{index}]: {value!r} cannot name a folder "
                                  "(letters, digits and _.+- only)")
            try:
                if stage == DECOMPOSITION:
                    for model in sweep["models"]:
                        approach.resolve({**here[model], parameter: value})
                else:
                    get_objective(training, {**objective_configured, parameter: value})
            except ConfigError as err:
                raise ConfigError(f"{where}.values[{index}]: {err}") from None
            for model in sweep["models"]:
                point = SweepPoint(name, sweep["dataset"], model, parameter, value, stage,
                                   training, defaults[model])
                key = (name, point.dataset, model, point.variant)
                if key in points:
                    raise ConfigError(f"{where}.values[{index}]: {name} on {model}/"
                                      f"{point.dataset} at {parameter} = {value_text(value)} "
                                      "is already a sweep point")
                points[key] = point
    return list(points.values())


def approach_overrides(config: dict[str, Any], point: SweepPoint) -> dict[str, Any]:
    """The approach hyperparameters a point decomposes with (the config's for its model and
    dataset, its value in)."""
    configured = modularization_hyperparameters(config, point.approach, point.dataset,
                                                point.model)
    if point.stage == DECOMPOSITION:
        configured[point.parameter] = point.value
    return configured


def objective_overrides(config: dict[str, Any], point: SweepPoint) -> dict[str, Any]:
    """The training-kind hyperparameters a training-time point trains with."""
    return {**config.get("objectives", {}).get(point.training, {}),
            point.parameter: point.value}


# The table and the figure.


def sensitivity_table(points: list[dict[str, Any]], metrics_paths: list[Path]) -> pd.DataFrame:
    """One row per sweep point and seed: the point, and its module set's shared metrics.

    ``points[i]`` (:meth:`SweepPoint.record`) describes ``metrics_paths[i]`` (an
    ``evaluate-modules`` record); a record of another approach, model, dataset or seed is
    refused, so a misordered list cannot mislabel a row.
    """
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("--points: expected a JSON list of sweep points")
    if len(points) != len(metrics_paths):
        raise ConfigError(f"--points: {len(points)} sweep points for {len(metrics_paths)} "
                          "metrics files; one each")
    rows = []
    for position, (point, path) in enumerate(zip(points, metrics_paths, strict=True)):
        missing = [key for key in POINT_KEYS if key not in point]
        if missing:
            raise ConfigError(f"--points[{position}]: missing keys {missing}")
        metrics = read_json(path)
        if not isinstance(metrics, dict):
            raise ArtifactError(f"{path}: not a module-set metrics record")
        for key in ("approach", "dataset", "model", "seed"):
            if metrics.get(key) != point[key]:
                raise ArtifactError(f"{path}: a record of {key} {metrics.get(key)!r}, but the "
                                    f"sweep point it stands for has {point[key]!r}")
        absent = [key for key in METRIC_COLUMNS if key not in metrics]
        if absent:
            raise ArtifactError(f"{path}: not a module-set metrics record (lacks {absent})")
        rows.append({**{key: point[key] for key in POINT_KEYS},
                     **{key: metrics[key] for key in METRIC_COLUMNS}})
    if not rows:
        raise ConfigError("--points: no sweep points")
    table = pd.DataFrame(rows)
    table["order"] = [_sort_key(v) for v in table["value"]]
    return (table.sort_values(["approach", "parameter", "dataset", "model", "order", "seed"])
            .drop(columns="order").reset_index(drop=True))


def _sort_key(text: str) -> tuple[int, float, str]:
    """Numbers by value, then words in the order given."""
    number = _as_number(text)
    return (0, number, "") if number is not None else (1, 0.0, str(text))


def _as_number(text: Any) -> float | None:
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


E7_NOTES = (
    "One hyperparameter varied at a time, the others as the study configures them. stage "
    "decomposition: the study's trained model decomposed again; stage training: a model of the "
    "approach's training kind trained with the value, then decomposed with the study's "
    "approach settings. configured: the study's own value (its module set, reused). "
    "accuracy_loss_pp: each paper's headline, as in E2: the base model's test accuracy minus "
    "the composed one, or for MwT and MODA the ST model's minus the modular-trained model's "
    "own (for a training-time point, the base model is the one trained with the value; a "
    "decomposition-time point of MwT or MODA leaves it unchanged). krr (each paper's "
    "definition), module_size: fractions, as in E2.")


def write_sensitivity_report(points: list[dict[str, Any]], metrics_paths: list[Path],
                             csv_path: Path, summary_path: Path | None = None) -> pd.DataFrame:
    """E7 as CSV, Markdown and LaTeX (per seed and mean ± std), and its DVC metrics."""
    table = sensitivity_table(points, metrics_paths)
    write_table(table, csv_path, title="E7 sensitivity and ablations",
                keys=["approach", "parameter", "dataset", "model", "value"],
                values=SUMMARY_VALUES, notes=E7_NOTES)
    if summary_path:
        write_json(summary_path, {
            f"{row.approach}/{row.dataset}/{row.model}/{row.parameter}={row.value}/"
            f"seed{row.seed}": {key: getattr(row, key) for key in SUMMARY_VALUES}
            for row in table.itertuples()})
    return table


def read_sensitivity_table(path: Path) -> pd.DataFrame:
    """An E7 table as :func:`write_sensitivity_report` wrote it (values kept as text)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    table = pd.read_csv(path, dtype={"value": str, "default": str})
    needed = [*POINT_KEYS, *SUMMARY_VALUES]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise ArtifactError(f"{path}: not an E7 sensitivity table (lacks columns {missing})")
    return table


def sensitivity_figure(table: pd.DataFrame, path: Path) -> None:
    """One panel per (approach, parameter): accuracy loss (pp, left axis, solid) and KRR and
    module size (%, right axis, dashed and dotted) against the value, mean over seeds, in the
    approach's colour and marker, one set of lines per base model (labelled); the study's own
    value marked by a vertical line (numbers, log axis when they span 20x or more) or a bold
    label (words). Written as ``path`` (PNG) and the same name with ``.pdf``."""
    panels = list(table.groupby(["approach", "parameter"], sort=True))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    plt = pyplot()
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows),
                                squeeze=False)
    for axis, ((approach, parameter), panel) in zip(axes.flat[:len(panels)], panels,
                                                    strict=True):
        _sensitivity_panel(axis, approach, parameter, panel)
    for unused in axes.flat[len(panels):]:
        unused.set_visible(False)
    figure.suptitle("E7 sensitivity: accuracy loss, KRR and module size per value")
    figure.tight_layout()
    save_figure(figure, path)


def _sensitivity_panel(left, approach: str, parameter: str, panel: pd.DataFrame) -> None:
    style = approach_style(approach)
    means = panel.groupby(["dataset", "model", "value", "stage", "default"], as_index=False,
                          sort=False)[SUMMARY_VALUES].mean()
    numbers = [_as_number(v) for v in means["value"]]
    numeric = all(n is not None for n in numbers)
    if numeric:
        means["x"] = numbers
        positive = means["x"] > 0
        if positive.all() and means["x"].max() / means["x"].min() >= 20:
            left.set_xscale("log")
    else:
        order = sorted(dict.fromkeys(means["value"]), key=_sort_key)
        means["x"] = [order.index(v) for v in means["value"]]
        left.set_xticks(range(len(order)), order)
    right = left.twinx()
    for index, ((dataset, model), line) in enumerate(means.groupby(["dataset", "model"])):
        line = line.sort_values("x")
        label = f"{model}/{dataset}"
        marker_style = {"color": style["color"], "marker": style["marker"],
                        "markersize": 5}
        left.plot(line.x, line.accuracy_loss_pp, linestyle="-", label=f"{label}: accuracy loss",
                  alpha=1.0 - 0.2 * (index % 3), **marker_style)
        right.plot(line.x, 100 * line.krr, linestyle="--", label=f"{label}: KRR",
                   alpha=0.8, **marker_style)
        right.plot(line.x, 100 * line.module_size, linestyle=":", label=f"{label}: module size",
                   alpha=0.8, **marker_style)
    default = means["default"].iloc[0]
    if numeric and _as_number(default) is not None:
        left.axvline(_as_number(default), color="0.6", linewidth=1, zorder=0,
                     label=f"configured ({default})")
    elif not numeric:
        for tick in left.get_xticklabels():
            if tick.get_text() == default:
                tick.set_fontweight("bold")
    stage = means["stage"].iloc[0]
    left.set_title(f"{approach}: {parameter} ({stage} time)")
    left.set_xlabel(f"{parameter} (hyperparameter value)")
    left.set_ylabel("accuracy loss (pp)")
    right.set_ylabel("KRR / module size (%)")
    left.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    left.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="best")


def write_sensitivity_figure(table_path: Path, figure_path: Path) -> None:
    sensitivity_figure(read_sensitivity_table(table_path), figure_path)

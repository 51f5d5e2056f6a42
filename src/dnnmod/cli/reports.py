"""The table, figure and report commands: E1-E8 tables and figures, training curves, the HTML
report. Each table or figure command is one row of :data:`REPORT_COMMANDS`: its writer reads
result files and writes one table or figure, taking the command's options in their declared
order. The writers' modules are imported when a command runs: they load pandas and
matplotlib, never torch (tests/test_import_costs.py)."""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnnmod.cli.common import Commands, json_arg

log = logging.getLogger("dnnmod")


@dataclass(frozen=True)
class Option:
    """One option of a table or figure command. ``kind``: ``path`` (a file or folder),
    ``paths`` (one or more files) or ``json`` (a JSON value, given to the writer as parsed);
    an optional path the command is not given reaches the writer as None."""

    flag: str
    help: str
    kind: str = "path"
    required: bool = True
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        extra: dict[str, Any] = ({"nargs": "+"} if self.kind == "paths" else
                                 {"type": json_arg} if self.kind == "json" else {})
        if self.default is not None:
            extra["default"] = self.default
        parser.add_argument(self.flag, required=self.required, help=self.help, **extra)

    def value(self, given: Any) -> Any:
        if self.kind == "paths":
            return [Path(path) for path in given]
        if self.kind == "path":
            return Path(given) if given else None
        return given


@dataclass(frozen=True)
class ReportCommand:
    """``command`` (``"group verb"``) runs ``writer`` (``module:function``) on its options."""

    command: str
    help: str
    writer: str
    options: tuple[Option, ...]

    def run(self, args: argparse.Namespace) -> None:
        module, _, function = self.writer.partition(":")
        writer = getattr(importlib.import_module(module), function)
        writer(*(option.value(getattr(args, option.dest)) for option in self.options))


OUT_CSV = Option("--out", "CSV path (.md rendering written beside)")
OUT_PNG = Option("--out", "PNG path (a PDF is written beside)")
SUMMARY = Option("--summary", "JSON path for DVC metrics", required=False)
METRICS_OUT = Option("--metrics", "JSON path for DVC metrics", required=False)
PATCH_RECORDS = Option("--metrics", "reuse patch JSON files", "paths")
COMPOSED = Option("--composed", "reuse new-task JSON files", "paths")
SCRATCH = Option("--scratch", "from-scratch models of the pairs (*.safetensors)", "paths")
SUBTASK_TABLES = Option("--subtasks", "per-sub-task CSV files of reuse subtasks", "paths")
REPLACEMENT_RECORDS = Option("--records", "JSON records of reuse replace", "paths")


def curve_inputs(inputs: str) -> Option:
    return Option("--inputs", f"{inputs} (*.safetensors; their JSON beside is read)", "paths")


REPORT_COMMANDS = (
    ReportCommand("table base-models", "E1: base-model accuracy and training time",
                  "dnnmod.report.tables:write_base_model_report", (
                      Option("--models", "model weights paths", "paths"), OUT_CSV,
                      Option("--metrics", "JSON path for DVC metrics (test accuracy, time)",
                             required=False))),
    ReportCommand("table modularization", "E2: module quality and cost per approach",
                  "dnnmod.cli.reports:write_modularization_tables", (
                      Option("--metrics", "evaluate-modules JSON files", "paths"), OUT_CSV,
                      Option("--figure", "accuracy against KRR and module size (PNG; a PDF "
                                         "is written beside)", required=False),
                      SUMMARY,
                      Option("--orderings", "CSV path of the papers' orderings checked on E2 "
                                            "(.md and .tex written beside)", required=False))),
    ReportCommand("table pan-rajan", "Pan & Rajan's Table 1: decomposition cost per module "
                                     "set, published beside",
                  "dnnmod.report.pan_rajan:write_decomposition_report", (
                      Option("--costs", "evaluate-decomposition JSON files", "paths"), OUT_CSV,
                      SUMMARY)),
    ReportCommand("table cost", "E8: time, device, energy and CO2e of every job, from the "
                                "benchmark files; reuse against retraining",
                  "dnnmod.report.cost:write_cost_report", (
                      Option("--results", "the study's results/<study> folder"),
                      Option("--energy", "JSON overriding the energy constants (config "
                                         "energy)", "json", required=False, default={}),
                      Option("--out", "per-job CSV path (.md, .tex beside)"),
                      Option("--scenarios", "per-stage and scenario totals CSV"),
                      Option("--figure", "energy/CO2e bars (PNG; a PDF is written beside)",
                             required=False),
                      METRICS_OUT)),
    ReportCommand("sensitivity table", "E7 table: each sweep point's module-set metrics, per "
                                       "seed and mean ± std",
                  "dnnmod.report.sensitivity:write_sensitivity_report", (
                      Option("--points", "JSON list of sweep points (approach, dataset, model, "
                                         "parameter, value, stage, training, default, "
                                         "configured, seed), one per --metrics file, in the "
                                         "same order", "json"),
                      Option("--metrics", "evaluate-modules JSON files of the points",
                             "paths"),
                      Option("--out", "CSV path (.md, .tex beside)"), SUMMARY)),
    ReportCommand("sensitivity figure", "E7 figure: accuracy loss, KRR and module size per "
                                        "value, a panel per parameter",
                  "dnnmod.report.sensitivity:write_sensitivity_figure", (
                      Option("--table", "the E7 table (CSV)"), OUT_PNG)),
    ReportCommand("curves ga-convergence", "CNNSplitter: best and mean fitness, composed "
                                           "validation accuracy and KRR per generation",
                  "dnnmod.report.curves:ga_convergence_figure", (
                      curve_inputs("cnnsplitter module sets"), OUT_PNG)),
    ReportCommand("curves mask-training", "GradSplitter: composed validation accuracy and KRR "
                                          "per epoch",
                  "dnnmod.report.curves:mask_training_figure", (
                      curve_inputs("gradsplitter module sets"), OUT_PNG)),
    ReportCommand("curves modular-training", "MwT/MODA: loss parts and validation accuracy "
                                             "per epoch",
                  "dnnmod.report.curves:modular_training_figure", (
                      curve_inputs("modular-trained models"), OUT_PNG)),
    ReportCommand("reuse patch-table", "E3 table: weak vs patched per target class, averages, "
                                       "published beside",
                  "dnnmod.report.patching:write_patching_table", (
                      PATCH_RECORDS, OUT_CSV, SUMMARY)),
    ReportCommand("reuse patch-figure", "E3 figure: weak vs patched P/R/F1 per target class",
                  "dnnmod.report.patching:patching_figure", (PATCH_RECORDS, OUT_PNG)),
    ReportCommand("reuse new-task-table", "E4 table: composed vs from-scratch accuracy per "
                                          "pair and on average",
                  "dnnmod.report.newtask:write_new_task_report", (
                      COMPOSED, SCRATCH, OUT_CSV, METRICS_OUT)),
    ReportCommand("reuse new-task-figure", "E4 figure: accuracy difference per pair and on "
                                           "average",
                  "dnnmod.report.newtask:new_task_figure", (COMPOSED, SCRATCH, OUT_PNG)),
    ReportCommand("reuse subtasks-table", "E5 table: mean accuracy, size and FLOPs per "
                                          "approach and |T|",
                  "dnnmod.report.subtasks:write_subtask_report", (
                      SUBTASK_TABLES, OUT_CSV, METRICS_OUT)),
    ReportCommand("reuse subtasks-figure", "E5 figure: accuracy, size and FLOPs vs |T|, one "
                                           "line per approach",
                  "dnnmod.report.subtasks:subtask_figure", (SUBTASK_TABLES, OUT_PNG)),
    ReportCommand("reuse replace-table", "E6 table: composed accuracy per swapped class, "
                                         "published beside",
                  "dnnmod.report.replacement:write_replacement_table", (
                      REPLACEMENT_RECORDS, OUT_CSV, SUMMARY)),
    ReportCommand("reuse replace-figure", "E6 figure: composed top-1 per swapped class, "
                                          "no-swap baselines as lines",
                  "dnnmod.report.replacement:replacement_figure", (
                      REPLACEMENT_RECORDS, OUT_PNG)),
)


def write_modularization_tables(metrics: list[Path], out: Path, figure: Path | None,
                                summary: Path | None, orderings: Path | None) -> None:
    """The E2 table (and its figure and summary), and the papers' orderings checked on it."""
    from dnnmod.report.orderings import write_ordering_report
    from dnnmod.report.tables import write_modularization_report

    table = write_modularization_report(metrics, out, figure, summary)
    if orderings:
        write_ordering_report(table, orderings)


def cmd_report_html(args: argparse.Namespace) -> None:
    from dnnmod.report.html import build_report

    contents = build_report(Path(args.results), Path(args.out), args.config,
                            Path(args.captions) if args.captions else None)
    log.info("wrote %s: %d tables, %d figures, %d jobs", args.out, len(contents["tables"]),
             len(contents["figures"]), contents["jobs"])


def add_commands(commands: Commands) -> None:
    for report in REPORT_COMMANDS:
        parser = commands.add(report.command, report.help, report.run)
        for option in report.options:
            option.add_to(parser)

    html = commands.add("report html", "one self-contained HTML file: every table and figure, "
                                       "config, environment, job times", cmd_report_html)
    html.add_argument("--results", required=True, help="the study's results/<study>")
    html.add_argument("--out", required=True, help="HTML path")
    html.add_argument("--captions", help="folder of <table or figure name>.rst captions")
    html.add_argument("--config", type=json_arg, default={},
                      help="JSON study configuration shown in the report")

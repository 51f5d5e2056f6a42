"""E8 cost: wall time, device, energy and CO2e of every job, from Snakemake's benchmark files.

Each rule writes ``results/<study>/benchmarks/<step>/.../<job>.tsv`` (Snakemake's columns ``s``,
``max_rss`` in MB, ``cpu_time`` in CPU seconds, ...) and its log at the same relative path
under ``logs/`` with ``.log``. The device a job ran on is read from its log: a job that claimed
a GPU says so (``dnnmod.devices``); every other job ran on the CPU. A job started by the
fork server (dnnmod.fork_server) ran in a worker outside the process tree Snakemake
measures: the worker's own CPU time and peak memory, from its log's last line, are added.

Energy follows the Green Algorithms method (Lannelongue, Grealey and Inouye, Advanced Science
2021, also the basis of the ML CO2 Impact calculator): power drawn by the cores actually busy,
the GPU and the memory held, times the data centre's PUE, times the grid's carbon intensity::

    energy (Wh) = PUE × (cpu_seconds × W_core + gpu_seconds × W_gpu × u_gpu
                         + wall_seconds × max_rss_GB × W_mem) / 3600
    CO2e (g)    = energy (kWh) × grid intensity (gCO2e/kWh)

It is an estimate from nominal power draws (config ``energy``), not a measurement.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from dnnmod.artifacts import write_json
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.fork_server import USAGE
from dnnmod.hyperparameters import Range, resolve
from dnnmod.report.figures import approach_style, pyplot, save_figure
from dnnmod.report.tables import write_table

# Nominal constants; config/config.yaml says where each comes from.
ENERGY_DEFAULTS = {
    "cpu_watts_per_core": 12.0,
    "gpu_watts": 300.0,
    "gpu_utilisation": 1.0,
    "memory_watts_per_gb": 0.3725,
    "pue": 1.67,
    "grid_gco2e_per_kwh": 475.0,
    # stage -> benchmark paths (relative to benchmarks/, a folder or a file) it groups; a job
    # belongs to the stage of its longest matching path
    "stages": {"data": ["data"], "training": ["train"],
               "modularization": ["modularize", "evaluate_modules"],
               "from_scratch": ["new_tasks/scratch"], "weak_models": ["patching/weak"],
               "reuse": ["reuse", "patching", "new_tasks", "subtasks", "replacement"],
               "sensitivity": ["sensitivity"], "report": ["report"]},
    # scenario -> the stages whose costs it adds up: reuse against retraining
    "scenarios": {"retraining": ["training", "from_scratch"],
                  "reuse": ["modularization", "reuse"]},
}
ENERGY_RANGES = {
    "cpu_watts_per_core": Range(0), "gpu_watts": Range(0), "gpu_utilisation": Range(0, 1),
    "memory_watts_per_gb": Range(0), "pue": Range(1), "grid_gco2e_per_kwh": Range(0),
}
GPU_CLAIM = re.compile(r"claimed GPU slot (\S+) \(CUDA_VISIBLE_DEVICES=")
SEED = re.compile(r"seed(\d+)")
JOB_COLUMNS = ["stage", "step", "job", "seed", "device", "wall_seconds", "cpu_seconds",
               "gpu_seconds", "max_rss_mb", "energy_wh", "co2e_g"]


def energy_model(overrides: dict | None) -> dict:
    """The energy constants: ``ENERGY_DEFAULTS`` overridden by config ``energy`` (checked)."""
    model = resolve("energy", ENERGY_DEFAULTS, overrides, ENERGY_RANGES)
    for key in ("stages", "scenarios"):
        for name, members in model[key].items():
            if not (isinstance(members, list) and members
                    and all(isinstance(member, str) for member in members)):
                raise ConfigError(f"energy.{key}.{name}: expected a non-empty list of names, "
                                  f"got {members!r}")
    unknown = {stage for stages in model["scenarios"].values() for stage in stages
               } - set(model["stages"])
    if unknown:
        raise ConfigError(f"energy.scenarios: stages {sorted(unknown)} are not defined under "
                          f"energy.stages ({sorted(model['stages'])})")
    return model


def read_benchmark(path: Path) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one job (mean over repeats).

    Snakemake writes ``NA`` when a job ended before it could sample the process: CPU seconds
    are then NaN (see ``measured_jobs``) and the peak RSS 0.
    """
    try:
        frame = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ArtifactError(f"{path}: not a Snakemake benchmark file ({err})") from None
    missing = {"s", "max_rss", "cpu_time"} - set(frame.columns)
    if missing or frame.empty:
        raise ArtifactError(f"{path}: not a Snakemake benchmark file (missing columns "
                            f"{sorted(missing)} or no rows)")
    seconds = float(frame["s"].mean())
    cpu = frame["cpu_time"].mean()
    rss = frame["max_rss"].mean()
    return {"wall_seconds": seconds, "cpu_seconds": float(cpu),
            "max_rss_mb": 0.0 if pd.isna(rss) else float(rss)}


def read_job_log(log_path: Path) -> tuple[str, dict[str, float] | None]:
    """What a job's log adds to its benchmark file: the device (``cuda:<slot>`` when the job
    says it claimed a GPU, else ``cpu``), and the CPU seconds and peak RSS of a fork-server
    worker, which ran the job outside the process tree Snakemake measured (the last such line;
    none when the job ran as its own process)."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    claim = GPU_CLAIM.search(text)
    workers = USAGE.findall(text)
    usage = ({"cpu_seconds": float(workers[-1][0]), "max_rss_mb": float(workers[-1][1])}
             if workers else None)
    return (f"cuda:{claim.group(1)}" if claim else "cpu"), usage


def stage_of(job: str, stages: dict[str, list[str]]) -> str:
    """The stage whose longest path is ``job`` or a folder above it (``other`` if none)."""
    matches = [(len(path), stage) for stage, paths in stages.items() for path in paths
               if job == path or job.startswith(f"{path.rstrip('/')}/")]
    return max(matches)[1] if matches else "other"


def measured_jobs(results: Path) -> list[tuple[Path, dict[str, float], str]]:
    """Every benchmarked job under ``results/benchmarks``: its path there (no suffix), its
    wall seconds, CPU seconds and peak RSS (the benchmark file's, plus a fork-server worker's
    from the log: the job's process waited while its worker ran, and both count) and device."""
    benchmarks = results / "benchmarks"
    jobs = []
    for path in sorted(benchmarks.rglob("*.tsv")):
        relative = path.relative_to(benchmarks).with_suffix("")
        usage = read_benchmark(path)
        device, worker = read_job_log(results / "logs" / relative.with_suffix(".log"))
        measured = not math.isnan(usage["cpu_seconds"])
        if worker is not None:
            usage = {"wall_seconds": usage["wall_seconds"],
                     "cpu_seconds": worker["cpu_seconds"] + (usage["cpu_seconds"] if measured
                                                             else 0.0),
                     "max_rss_mb": worker["max_rss_mb"] + usage["max_rss_mb"]}
        elif not measured:  # ended before Snakemake sampled it: one core busy throughout
            usage = {**usage, "cpu_seconds": usage["wall_seconds"]}
        jobs.append((relative, usage, device))
    return jobs


def job_costs(results: Path, model: dict) -> pd.DataFrame:
    """One row per benchmarked job under ``results/benchmarks``: stage, device, seconds,
    energy and CO2e."""
    jobs = measured_jobs(results)
    if not jobs:
        raise ArtifactError(f"{results / 'benchmarks'}: no benchmark files (*.tsv); run the "
                            "study first")
    rows = []
    for relative, usage, device in jobs:
        gpu_seconds = usage["wall_seconds"] if device.startswith("cuda") else 0.0
        watt_seconds = (usage["cpu_seconds"] * model["cpu_watts_per_core"]
                        + gpu_seconds * model["gpu_watts"] * model["gpu_utilisation"]
                        + usage["wall_seconds"] * usage["max_rss_mb"] / 1024
                        * model["memory_watts_per_gb"])
        energy_wh = model["pue"] * watt_seconds / 3600
        seed = SEED.search(relative.as_posix())
        rows.append({
            "stage": stage_of(relative.as_posix(), model["stages"]), "step": relative.parts[0],
            "job": "/".join(relative.parts[1:]), "seed": int(seed.group(1)) if seed else -1,
            "device": device, **usage, "gpu_seconds": gpu_seconds, "energy_wh": energy_wh,
            "co2e_g": energy_wh / 1000 * model["grid_gco2e_per_kwh"]})
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def scenario_costs(jobs: pd.DataFrame, model: dict) -> pd.DataFrame:
    """Totals per stage, then per scenario (the sum of its stages): reuse against retraining."""
    totals = ["wall_seconds", "cpu_seconds", "gpu_seconds", "energy_wh", "co2e_g"]
    by_stage = jobs.groupby("stage")[totals].sum()
    by_stage["jobs"] = jobs.groupby("stage").size()
    rows = [{"kind": "stage", "name": stage, "stages": stage, **by_stage.loc[stage]}
            for stage in by_stage.index]
    for scenario, stages in model["scenarios"].items():
        present = by_stage.reindex(stages).fillna(0.0)
        rows.append({"kind": "scenario", "name": scenario, "stages": " + ".join(stages),
                     **present[totals].sum(), "jobs": present["jobs"].sum()})
    frame = pd.DataFrame(rows, columns=["kind", "name", "stages", "jobs", *totals])
    frame["jobs"] = frame["jobs"].astype(int)
    return frame


def method_note(model: dict) -> str:
    return ("Estimate, not a measurement (Green Algorithms method): energy = PUE × (CPU "
            f"seconds × {model['cpu_watts_per_core']:g} W per core + GPU seconds × "
            f"{model['gpu_watts']:g} W × utilisation {model['gpu_utilisation']:g} + wall seconds "
            f"× peak RSS (GB) × {model['memory_watts_per_gb']:g} W/GB), PUE "
            f"{model['pue']:g}; CO2e = energy × {model['grid_gco2e_per_kwh']:g} gCO2e/kWh. "
            "CPU seconds, wall seconds and peak RSS are Snakemake's benchmark records; the "
            "device is read from each job's log. Scenarios: "
            + "; ".join(f"{name} = {' + '.join(stages)}"
                        for name, stages in model["scenarios"].items()) + ".")


def cost_figure(jobs: pd.DataFrame, scenarios: pd.DataFrame, path: Path,
                approaches: list[str]) -> None:
    """Energy per stage, split by the approach a job belongs to, and CO2e per scenario."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    jobs = jobs.assign(approach=[_approach_of(job, approaches) for job in jobs.job])
    stages = sorted(jobs.stage.unique())
    bottom = pd.Series(0.0, index=stages)
    for approach, group in jobs.groupby("approach"):
        energy = group.groupby("stage").energy_wh.sum().reindex(stages, fill_value=0.0)
        style = approach_style(approach) if approach else {"color": "lightgray"}
        left.barh(stages, energy, left=bottom, color=style["color"],
                  label=approach or "no approach (shared)")
        bottom += energy
    left.set_xlabel("estimated energy (Wh)")
    left.set_ylabel("stage")
    left.set_title("Energy per stage")
    left.legend(title="approach", fontsize=8)
    chosen = scenarios[scenarios.kind == "scenario"]
    for index, row in enumerate(chosen.itertuples()):
        right.bar(index, row.co2e_g, color=f"C{index}", label=f"{row.name} ({row.stages})")
    right.set_xticks(range(len(chosen)), chosen.name)
    right.set_ylabel("estimated CO2e (g)")
    right.set_xlabel("scenario")
    right.set_title("Reuse against retraining")
    right.legend(title="scenario", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def _approach_of(job: str, approaches: list[str]) -> str:
    """The approach (or modular training kind) named in a job's path, "" for shared jobs."""
    return next((part for part in job.split("/") if part in approaches), "")


def write_cost_report(results: Path, energy: dict | None, csv_path: Path,
                      scenarios_path: Path, figure_path: Path | None = None,
                      metrics_path: Path | None = None) -> None:
    """E8: per-job costs and per-stage/scenario totals as tables, the figure, DVC metrics."""
    from dnnmod.approaches import APPROACHES
    from dnnmod.training.objectives import training_kinds

    model = energy_model(energy)
    jobs = job_costs(Path(results), model)
    scenarios = scenario_costs(jobs, model)
    note = method_note(model)
    write_table(jobs, csv_path, title="E8 cost per job", keys=["stage", "step"],
                values=["wall_seconds", "cpu_seconds", "energy_wh", "co2e_g"], over="jobs",
                notes=note)
    write_table(scenarios, scenarios_path, title="E8 cost per stage and scenario",
                keys=["kind", "name"], values=["energy_wh", "co2e_g"], summary=False,
                notes=note)
    if figure_path:
        cost_figure(jobs, scenarios, figure_path,
                    sorted(set(APPROACHES) | set(training_kinds())))
    if metrics_path:
        write_json(metrics_path, {
            f"{row.kind}/{row.name}": {"wall_seconds": row.wall_seconds,
                                       "energy_wh": row.energy_wh, "co2e_g": row.co2e_g}
            for row in scenarios.itertuples()})

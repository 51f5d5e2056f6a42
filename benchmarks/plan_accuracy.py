"""How close ``dnnmod plan`` comes to a measured run: per rule and for the whole study.

A finished run leaves one Snakemake ``benchmark:`` file per job under
``results/<study>/benchmarks/`` (its wall seconds) with the time it was written (the job's
end). The measured wall time of the run is the time during which at least one job ran (each
from its end minus its seconds to its end): a job rerun after the run, or a paused run, adds
its own time but not the gap before it. The plan's is its list schedule on ``--cores``
cores. Each
row gives the rule's job seconds, planned and measured, and their ratio; the last lines the
run's wall time, planned over measured (the issue's target: within 0.65-1.35).

    python benchmarks/plan_accuracy.py config/demo.yaml --cores 2
    python benchmarks/plan_accuracy.py results/paper_shaped-inputs/config.yaml --cores 2
    python benchmarks/plan_accuracy.py config/demo.yaml --cores 2 --calibrate

The results folder must hold one complete run of the config (every job's benchmark file):
run the study first (``make demo``, ``make paper-shaped``). Job times depend on what else the
machine ran meanwhile; say so with the numbers.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import yaml

from dnnmod.plan import calibrate, make_plan, read_rates


def measured_jobs(benchmarks: Path) -> dict[str, tuple[float, float]]:
    """Benchmark file -> (seconds, end time)."""
    jobs = {}
    for path in benchmarks.rglob("*.tsv"):
        with path.open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        jobs[str(path)] = (float(rows[-1]["s"]), path.stat().st_mtime)
    return jobs


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one job ran: the run's wall time without the gaps in
    which none did (a job rerun later, a paused run)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the study config the run used")
    parser.add_argument("--cores", type=int, default=2, help="--cores of the measured run")
    parser.add_argument("--calibrate", action="store_true",
                        help="plan with this machine's calibrated CPU rates")
    args = parser.parse_args()
    config_path = Path(args.config)
    study = yaml.safe_load(config_path.read_text())["study"]
    benchmarks = Path("results") / study / "benchmarks"
    measured = measured_jobs(benchmarks)
    if not measured:
        raise SystemExit(f"{benchmarks}: no benchmark files; run the study first")

    rates = read_rates()["cpu"]
    if args.calibrate:
        rates = rates.replace(calibrate(), "calibrated")
    plan = make_plan(config_path, "cpu", args.cores, rates)
    planned: dict[str, float] = defaultdict(float)
    runs = [job for job in plan.jobs if job.runs]
    measured_by_rule: dict[str, float] = defaultdict(float)
    benchmark_rule = {}
    for job in runs:
        planned[job.rule] += job.seconds
    for job in runs:  # the benchmark file Snakemake names for each planned job
        benchmark_rule[job.benchmark] = job.rule
    missing = [job.benchmark for job in runs if job.benchmark not in measured]
    if missing:
        raise SystemExit(f"{len(missing)} jobs have no benchmark file (the run is not "
                         f"complete or is of another config), e.g. {missing[0]}")
    for name, (seconds, _) in measured.items():
        if name in benchmark_rule:
            measured_by_rule[benchmark_rule[name]] += seconds

    print(f"{'rule':<26} {'jobs':>5} {'planned s':>10} {'measured s':>11} {'ratio':>6}")
    for rule in sorted(planned, key=lambda r: -measured_by_rule[r]):
        jobs = sum(1 for job in runs if job.rule == rule)
        print(f"{rule:<26} {jobs:>5} {planned[rule]:>10.1f} {measured_by_rule[rule]:>11.1f} "
              f"{planned[rule] / max(measured_by_rule[rule], 1e-9):>6.2f}")
    total_planned = sum(planned.values())
    total_measured = sum(measured_by_rule.values())
    wall = busy_seconds([(measured[job.benchmark][1] - measured[job.benchmark][0],
                          measured[job.benchmark][1]) for job in runs])
    print(f"{'job seconds':<26} {len(runs):>5} {total_planned:>10.1f} {total_measured:>11.1f} "
          f"{total_planned / total_measured:>6.2f}")
    print(f"wall time on {args.cores} cores: planned {plan.wall_seconds:.0f} s, measured "
          f"{wall:.0f} s, ratio {plan.wall_seconds / wall:.2f} (target 0.65-1.35)")


if __name__ == "__main__":
    main()

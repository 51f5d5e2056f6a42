"""dnnmod plan: the workflow's own jobs, a cost model for every GPU rule, the schedule's
bounds, the rate table, and clear errors for bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from workflow_helpers import TINY, make_project, snakemake, write_config

from dnnmod.cli import main
from dnnmod.errors import ConfigError
from dnnmod.job_resources import GPU_RULES
from dnnmod.plan import (
    DATA_RULES,
    QUANTITIES,
    RULE_WORK,
    PlanJob,
    critical_path,
    make_plan,
    read_rates,
    wall_time,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, str]:
    root = make_project(tmp_path_factory.mktemp("plan") / "project")
    return root, write_config(root, TINY)


@pytest.fixture(scope="module")
def tiny_plan(project):
    root, config = project
    return make_plan(root / config, "cpu", 1, read_rates()["cpu"], root / "Snakefile")


def dry_run_counts(root: Path, config: str) -> dict[str, int]:
    """Jobs per rule from Snakemake's own dry run ("Job stats")."""
    run = snakemake(root, "--dry-run", "--forceall", "--configfile", config, "--cores", "1")
    assert run.returncode == 0, run.stdout
    stats = run.stdout.split("Job stats:")[1].split("\n\n")[0]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", stats, re.M)
            if rule != "total"}


def test_jobs_per_rule_are_snakemakes(project, tiny_plan):
    counts: dict[str, int] = {}
    for job in tiny_plan.jobs:
        counts[job.rule] = counts.get(job.rule, 0) + 1
    assert counts == dry_run_counts(*project)
    # every GPU job has work that its model's FLOPs price (but drawing random kernels), light
    # jobs none
    for job in tiny_plan.jobs:
        draws = job.rule == "modularize" and job.wildcards["approach"].startswith("random_")
        assert (job.flops > 0) == (job.gpu and not draws), job
        assert job.seconds > 0 or not job.runs


def test_a_local_runs_jobs_pay_the_fork_servers_fixed_costs(project, tiny_plan):
    # a local run starts its jobs from the fork server; a cluster's, or a study that switches
    # the server off, each job as its own process: the whole fixed cost
    root, config = project
    rates = read_rates()["cpu"]
    cluster = make_plan(root / config, "cpu", 1, rates, root / "Snakefile", cluster=True)
    switched_off = make_plan(root / write_config(root, {**TINY, "fork_server": False},
                                                 "no_fork_server.yaml"),
                             "cpu", 1, rates, root / "Snakefile")
    assert tiny_plan.forked and not cluster.forked and not switched_off.forked
    def by_job(plan):
        return {(job.rule, tuple(sorted(job.wildcards.items()))): job for job in plan.jobs}

    plans = [by_job(plan) for plan in (tiny_plan, cluster, switched_off)]
    assert plans[0].keys() == plans[1].keys() == plans[2].keys()
    for forked, own, off in ([plan[key] for plan in plans] for key in plans[0]):
        if not own.runs:
            continue
        kind = ("gpu_rule" if own.gpu else "data_rule" if own.rule in DATA_RULES
                else "report_rule")
        saved = rates.get(f"job_s.{kind}") - rates.get(f"forked_job_s.{kind}")
        assert own.seconds - forked.seconds == pytest.approx(saved) and saved > 0
        assert off.seconds == own.seconds


def test_every_gpu_rule_has_a_cost_model():
    assert set(RULE_WORK) == set(GPU_RULES)


def test_more_devices_never_slower_and_never_below_the_critical_path(tiny_plan):
    jobs = tiny_plan.jobs
    walls = [wall_time(jobs, devices, cpu_study=True) for devices in (1, 2, 4)]
    assert walls[0] >= walls[1] >= walls[2] >= critical_path(jobs) > 0
    # on one core nothing overlaps: the jobs' seconds one after another
    assert walls[0] == pytest.approx(sum(job.seconds for job in jobs))


def test_schedule_of_a_known_dag():
    """Two independent 10 s GPU jobs, then one of 5 s that needs both; a light job of 1 s."""
    def job(index, seconds, dependencies=(), gpu=True):
        planned = PlanJob(index, f"r{index}", {}, {}, [], [], gpu, 1, True, None, None,
                          list(dependencies))
        planned.seconds = seconds
        return planned

    jobs = [job(0, 10), job(1, 10), job(2, 1, gpu=False), job(3, 5, (0, 1, 2))]
    assert critical_path(jobs) == 15
    assert wall_time(jobs, 1, cpu_study=False) == 25  # the light job runs on the host beside
    assert wall_time(jobs, 2, cpu_study=False) == 15
    assert wall_time(jobs, 1, cpu_study=True) == 26  # on a CPU it takes a core too
    assert wall_time(jobs, 4, cpu_study=True) == 15


def test_rate_table_parses_with_a_source_for_every_row():
    table = read_rates()
    assert {"cpu", "h100", "h200"} <= set(table)
    for rates in table.values():
        for quantity in QUANTITIES:
            assert rates.get(quantity) > 0
            assert all(rate.source for rate in rates.rows[quantity])
    h200 = table["h200"]
    # architecture rows: CIFAR ResNets' thin layers run slower than wide convnets
    assert h200.get("flops_per_s.masked", "resnet20") < h200.get("flops_per_s.masked", "vgg16")
    calibrated = table["cpu"].replace({"flops_per_s.train": 1.0}, "test")
    assert calibrated.get("flops_per_s.train") == 1.0
    assert calibrated.get("job_s.gpu_rule") == table["cpu"].get("job_s.gpu_rule")


@pytest.mark.parametrize(("text", "message"), [
    ("device,quantity,arch,value,source\ncpu,flops_per_s.fast,,1,x\n", "unknown quantity"),
    ("device,quantity,arch,value,source\ncpu,job_s.gpu_rule,,fast,x\n", "not a number"),
    ("device,quantity,arch,value,source\ncpu,job_s.gpu_rule,,1,\n", "its source"),
    ("device,quantity,arch,value,source\ncpu,job_s.gpu_rule,,1,x\n", "no general row"),
    ("device,value\ncpu,1\n", "expected the columns"),
])
def test_bad_rate_table(tmp_path, text, message):
    path = tmp_path / "rates.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_rates(path)


def test_cli_prints_the_plan(project, capsys, monkeypatch):
    root, config = project
    monkeypatch.chdir(root)
    assert main(["plan", config, "--devices", "2", "--device-kind", "h200"]) == 0
    out = capsys.readouterr().out
    assert "train_base_model" in out and "modularize" in out
    assert re.search(r"wall time on 2 x h200: .*critical path", out)


def test_bad_config_is_one_clear_line(project, capsys, monkeypatch, tmp_path):
    root, _ = project
    monkeypatch.chdir(root)
    bad = dict(TINY, base_models=[{"dataset": "digits", "models": ["nosuchnet"],
                                   "recipe": "tiny"}])
    config = write_config(root, bad, "bad.yaml")
    assert main(["plan", config]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dnnmod: error: ") and "nosuchnet" in error
    assert main(["plan", "config/none.yaml"]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["plan", config, "--device-kind", "tpu"]) == 2
    assert "no rates for device 'tpu'" in capsys.readouterr().err


def test_jobs_that_may_pass_their_cluster_runtime_are_named(project, capsys, monkeypatch,
                                                            tmp_path):
    """A CPU a million times slower than the table's: the training outlasts the 1 minute its
    config gives GPU jobs."""
    root, _ = project
    monkeypatch.chdir(root)
    config = write_config(root, dict(TINY, resources={"gpu_jobs": {"runtime": 1}}),
                          "short.yaml")
    rates = tmp_path / "rates.csv"
    table = read_rates()
    with rates.open("w") as out:
        out.write("device,quantity,arch,value,source\n")
        for quantity in QUANTITIES:
            value = table["cpu"].get(quantity)
            if quantity.startswith("flops_per_s."):
                value /= 1e6
            out.write(f"cpu,{quantity},,{value},slowed\n")
    assert main(["plan", config, "--rates", str(rates)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"1 train_base_model jobs may pass their runtime \(resources, 1 min\): "
                     r"up to .* \(digits, simcnn, st, 0\)", out), out
    assert main(["plan", config]) == 0
    assert "may pass their runtime" not in capsys.readouterr().out

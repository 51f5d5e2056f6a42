"""The study report: tables in CSV/Markdown/LaTeX with published values and differences, the
E8 cost estimate from benchmark files, and the HTML report rendered in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from workflow_helpers import REPO, TINY, make_project, snakemake, write_config

from dnnmod.cli import main
from dnnmod.report.cost import ENERGY_DEFAULTS, energy_model, job_costs, stage_of
from dnnmod.report.html import build_report
from dnnmod.report.orderings import ordering_table, write_ordering_report
from dnnmod.report.tables import accuracy_vs_krr_figure, write_table

BENCHMARK_HEADER = "\t".join(["s", "h:m:s", "max_rss", "max_vms", "max_uss", "max_pss", "io_in",
                               "io_out", "mean_load", "cpu_time"])
# (relative path, wall s, peak RSS MB, CPU s, log text): one GPU job, one job too short to sample.
JOBS = [
    ("train/digits/simcnn/st/seed0", 100.0, 1024.0, "200.0",
     "INFO dnnmod.devices: claimed GPU slot 1 (CUDA_VISIBLE_DEVICES=1)\n"),
    ("modularize/digits/simcnn/gradsplitter/seed0", 50.0, 512.0, "50.0", ""),
    ("new_tasks/scratch/pair_0_3/simcnn/seed0", 30.0, 0.0, "NA", ""),
    ("report/e1_base_models", 2.0, 100.0, "1.5", ""),
]


def fabricate_study(results: Path) -> None:
    """A study's results as the real table, figure and benchmark writers leave them."""
    e1 = pd.DataFrame({"dataset": ["digits"] * 3, "model": ["vgg16"] * 3,
                       "training": ["st"] * 3, "seed": [0, 1, 2],
                       "test_accuracy": [90.0, 91.0, 92.0],
                       "published_test_accuracy": [92.62] * 3,
                       "published_source": ["MODA Table 2"] * 3})
    write_table(e1, results / "tables/e1_base_models.csv", "E1 base models",
                ["dataset", "model", "training"], ["test_accuracy"])
    e2 = pd.DataFrame({"approach": ["gradsplitter", "random"], "model": ["simcnn"] * 2,
                       "dataset": ["digits"] * 2, "krr": [0.4, 0.4],
                       "module_size": [0.45, 0.45], "composed_accuracy": [88.0, 40.0]})
    accuracy_vs_krr_figure(e2, results / "figures/e2_accuracy_vs_krr.png")
    for job, seconds, rss, cpu, log in JOBS:
        benchmark = results / "benchmarks" / f"{job}.tsv"
        benchmark.parent.mkdir(parents=True, exist_ok=True)
        rss_text = "NA" if cpu == "NA" else f"{rss:.2f}"
        benchmark.write_text(f"{BENCHMARK_HEADER}\n{seconds:.4f}\t0:00:00\t{rss_text}\t1\t1\t1"
                             f"\t0\t0\t50\t{cpu}\n")
        log_path = results / "logs" / f"{job}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(log)


@pytest.fixture
def study(tmp_path):
    results = tmp_path / "results/tiny"
    fabricate_study(results)
    return results


def test_tables_have_latex_and_published_differences(study):
    tables = study / "tables"
    per_seed = pd.read_csv(tables / "e1_base_models.csv")
    assert list(per_seed.columns[-3:]) == ["published_test_accuracy",
                                           "test_accuracy_minus_published", "published_source"]
    assert per_seed.test_accuracy_minus_published.round(2).tolist() == [-2.62, -1.62, -0.62]
    summary = pd.read_csv(tables / "e1_base_models_summary.csv").iloc[0]
    assert summary.test_accuracy_mean == 91.0 and summary.seeds == 3
    assert round(summary.test_accuracy_minus_published, 2) == -1.62
    markdown = (tables / "e1_base_models.md").read_text()
    assert "test_accuracy (published)" in markdown and "test_accuracy Δ" in markdown
    assert "91.00 ± 1.00" in markdown and "-1.62" in markdown
    latex = (tables / "e1_base_models.tex").read_text()
    assert latex.count("\\begin{table}") == 2 and latex.count("\\toprule") == 2
    assert "\\bottomrule" in latex and "\\label{tab:e1_base_models:0}" in latex
    assert "test\\_accuracy\\_minus\\_published" in latex and "91.00 $\\pm$ 1.00" in latex
    assert "nan" not in latex and "nan" not in markdown


def test_a_value_that_does_not_apply_to_a_row_is_an_empty_cell(tmp_path):
    # E2's union columns exist for MwT and MODA only.
    table = pd.DataFrame({"approach": ["gradsplitter", "moda"], "model": ["simcnn"] * 2,
                          "seed": [0, 0], "krr": [0.7, 0.74],
                          "union_loss_pp": [None, 0.25]})
    write_table(table, tmp_path / "e2.csv", "E2", ["model", "approach"],
                ["krr", "union_loss_pp"])
    markdown = (tmp_path / "e2.md").read_text()
    latex = (tmp_path / "e2.tex").read_text()
    assert " 0.25 |" in markdown and " 0.70 |" in markdown  # one seed: no spread shown
    assert "±" not in markdown
    assert "nan" not in markdown and "nan" not in latex


def test_energy_follows_the_stated_method(study):
    jobs = job_costs(study, energy_model({})).set_index("job")
    d = ENERGY_DEFAULTS
    train = jobs.loc["digits/simcnn/st/seed0"]
    assert train.device == "cuda:1" and train.stage == "training" and train.seed == 0
    expected_wh = d["pue"] * (200 * d["cpu_watts_per_core"] + 100 * d["gpu_watts"]
                              + 100 * 1.0 * d["memory_watts_per_gb"]) / 3600
    assert train.energy_wh == pytest.approx(expected_wh)
    assert train.co2e_g == pytest.approx(expected_wh / 1000 * d["grid_gco2e_per_kwh"])
    # Too short to sample: one busy core for its wall time, no memory.
    scratch = jobs.loc["scratch/pair_0_3/simcnn/seed0"]
    assert scratch.stage == "from_scratch" and scratch.device == "cpu"
    assert scratch.energy_wh == pytest.approx(d["pue"] * 30 * d["cpu_watts_per_core"] / 3600)
    assert jobs.loc["e1_base_models"].seed == -1


def e2_row(approach, model, krr, size, loss, seed=0):
    return {"approach": approach, "model": model, "dataset": "digits", "seed": seed,
            "krr": krr, "module_size": size, "accuracy_loss_pp": loss}


def test_orderings_compare_seed_means_on_the_same_model(tmp_path):
    e2 = pd.DataFrame([
        # simcnn: GradSplitter smaller than CNNSplitter (seed means 0.6 vs 0.8) at less loss
        e2_row("gradsplitter", "simcnn", 0.5, 0.6, 1.0), e2_row("gradsplitter", "simcnn",
                                                                0.7, 0.6, 1.0, seed=1),
        e2_row("cnnsplitter", "simcnn", 0.8, 0.9, 3.0),
        e2_row("mwt", "simcnn", 0.7, 0.7, 0.5), e2_row("moda", "simcnn", 0.9, 0.2, 2.0),
        # vgg16: GradSplitter smaller but at more loss; no MwT or MODA
        e2_row("gradsplitter", "vgg16", 0.5, 0.5, 4.0), e2_row("cnnsplitter", "vgg16",
                                                               0.6, 0.6, 2.0),
        e2_row("pan_rajan", "vgg16", 1.0, 0.9, 0.0)])
    table = ordering_table(e2)
    rows = {(row.model, row.claim.split(" modules")[0], row.claim.split("than ")[1][:6]): row
            for row in table.itertuples()}
    assert set(rows) == {("simcnn", "gradsplitter", "cnnspl"), ("simcnn", "mwt", "cnnspl"),
                         ("simcnn", "mwt", "gradsp"), ("simcnn", "moda", "gradsp"),
                         ("simcnn", "moda", "cnnspl"), ("vgg16", "gradsplitter", "cnnspl")}
    splitters = rows[("simcnn", "gradsplitter", "cnnspl")]
    assert (splitters.first_value, splitters.second_value) == pytest.approx((0.6, 0.8))
    assert splitters.fewer_pct == pytest.approx(25.0) and splitters.holds == "yes"
    assert splitters.published_fewer_pct == 19.88
    assert rows[("simcnn", "mwt", "cnnspl")].published_fewer_pct == 74.31
    # MwT keeps as many kernels as GradSplitter: not fewer
    assert rows[("simcnn", "mwt", "gradsp")].holds == "no"
    assert pd.isna(rows[("simcnn", "mwt", "gradsp")].published_fewer_pct)
    # MODA is judged on module size (0.2 against 0.6), and loss is not part of its claim
    moda = rows[("simcnn", "moda", "gradsp")]
    assert moda.measure == "module_size" and moda.holds == "yes"
    # fewer kernels, but at more loss than the claim allows
    assert rows[("vgg16", "gradsplitter", "cnnspl")].holds == "no"

    write_ordering_report(e2, tmp_path / "e2_orderings.csv")
    assert "fewer_pct_minus_published" in (tmp_path / "e2_orderings.md").read_text()
    assert (tmp_path / "e2_orderings.tex").read_text().count("\\toprule") == 1
    empty = ordering_table(pd.DataFrame([e2_row("gradsplitter", "simcnn", 0.5, 0.6, 1.0)]))
    assert empty.empty and list(empty.columns)[:3] == ["model", "dataset", "claim"]


def test_stages_take_the_longest_matching_path():
    stages = ENERGY_DEFAULTS["stages"]
    assert stage_of("new_tasks/scratch/t/m/seed0", stages) == "from_scratch"
    assert stage_of("new_tasks/s/gradsplitter/seed0", stages) == "reuse"
    assert stage_of("trainer/x", stages) == "other"


def test_cost_tables_figure_metrics_and_report_command(study, tmp_path):
    tables, figures = study / "tables", study / "figures"
    status = main(["table", "cost", "--results", str(study), "--energy",
                   json.dumps({"grid_gco2e_per_kwh": 100.0}), "--out",
                   str(tables / "e8_cost.csv"), "--scenarios", str(tables / "e8_scenarios.csv"),
                   "--figure", str(figures / "e8_energy.png"), "--metrics",
                   str(study / "metrics/e8_cost.json")])
    assert status == 0
    scenarios = pd.read_csv(tables / "e8_scenarios.csv").set_index("name")
    jobs = pd.read_csv(tables / "e8_cost.csv")
    assert scenarios.loc["retraining", "energy_wh"] == pytest.approx(
        jobs[jobs.stage.isin(["training", "from_scratch"])].energy_wh.sum(), abs=1e-3)
    assert scenarios.loc["reuse", "jobs"] == 1 and scenarios.loc["training", "kind"] == "stage"
    assert "100 gCO2e/kWh" in (tables / "e8_scenarios.md").read_text()
    metrics = json.loads((study / "metrics/e8_cost.json").read_text())
    assert set(metrics) >= {"scenario/reuse", "scenario/retraining", "stage/training"}
    assert (figures / "e8_energy.pdf").stat().st_size > 0

    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "e1_base_models.rst").write_text("Base models, *emphasised* caption.\n")
    out = study / "report.html"
    assert main(["report", "html", "--results", str(study), "--out", str(out), "--captions",
                 str(captions), "--config", json.dumps({"study": "tiny", "seeds": [0]})]) == 0
    page = out.read_text()
    assert "<em>emphasised</em>" in page and "E8 Cost" in page and "seeds:\n- 0" in page
    assert page.count("<img ") == 2 and "torch" in page and "cuda:1" in page


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    status = main(["report", "html", "--results", str(tmp_path), "--out",
                   str(tmp_path / "r.html")])
    assert status == 2 and "no tables/*.csv and no figures/*.png" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("module", ["tables", "newtask", "cost", "html", "subtasks", "sensitivity",
                                    "curves", "figures", "patching", "orderings"])
def test_table_and_report_writers_leave_torch_unimported(module):
    """Their jobs read JSON, CSV and benchmark files only: importing torch would cost each job
    about 2 s of the demo's budget."""
    probe = f"import sys, dnnmod.report.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_energy_constants_are_checked():
    with pytest.raises(Exception, match=r"energy\.pue: 0\.5 is out of range"):
        energy_model({"pue": 0.5})
    with pytest.raises(Exception, match=r"energy\.scenarios: stages \['nope'\]"):
        energy_model({"scenarios": {"x": ["nope"]}})


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None,
                    reason="Debian's chromium is not installed (.ci/run installs it as root)")
def test_report_renders_in_a_real_browser(study):
    playwright = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is a dev extra: pip install -e '.[dev]'")
    main(["table", "cost", "--results", str(study), "--out", str(study / "tables/e8_cost.csv"),
          "--scenarios", str(study / "tables/e8_scenarios.csv"),
          "--figure", str(study / "figures/e8_energy.png")])
    out = study / "report.html"
    contents = build_report(study, out, {"study": "tiny"}, REPO / "workflow/report")
    problems = []
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(),
                                         args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.on("console", lambda message: problems.append(message.text)
                if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(out.as_uri(), wait_until="load")
        images = page.evaluate("[...document.images].map(i => [i.alt, i.complete, "
                               "i.naturalWidth])")
        table_ids = page.evaluate("[...document.querySelectorAll('article.table')]"
                                  ".map(a => a.id)")
        headings = page.evaluate("[...document.querySelectorAll('h2')].map(h => h.textContent)")
        browser.close()
    assert not problems, problems
    assert sorted(alt for alt, _, _ in images) == sorted(contents["figures"]) == [
        "e2_accuracy_vs_krr", "e8_energy"]
    assert all(complete and width > 0 for _, complete, width in images), images
    assert sorted(table_ids) == sorted(f"table-{name.replace('_', '-')}"
                                       for name in contents["tables"])
    assert {"E1 Base models", "E8 Cost: time, energy and CO2e", "Environment",
            "Configuration", "Wall time and device of every job"} <= set(headings)


def test_report_rules_are_in_the_dag(tmp_path):
    project = make_project(tmp_path / "project")
    run = snakemake(project, "-n", "--configfile", write_config(project, TINY))
    assert run.returncode == 0, run.stdout[-3000:]
    assert "table_cost" in run.stdout and "study_report" in run.stdout

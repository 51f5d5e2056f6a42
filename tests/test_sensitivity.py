"""E7: sweep points planned from the config, their table and figure, the training curves, and
a tiny study running a decomposition-time and a training-time sweep through Snakemake."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from workflow_helpers import TINY, copy_project, snakemake, write_config

from dnnmod.approaches import run_approach
from dnnmod.artifacts import write_json
from dnnmod.cli import main
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.report.curves import (
    _labels,
    ga_convergence_figure,
    mask_training_figure,
    read_training_runs,
)
from dnnmod.report.sensitivity import (
    DECOMPOSITION,
    TRAINING,
    approach_overrides,
    objective_overrides,
    plan_sweeps,
    read_sensitivity_table,
    sensitivity_figure,
    sensitivity_table,
    write_sensitivity_report,
)
from dnnmod.training.model_io import model_record, save_model
from dnnmod.training.objectives import get_objective
from dnnmod.training.train import Recipe, train

SWEEPS = [
    {"approach": "mwt", "dataset": "digits", "models": ["simcnn"], "parameter": "threshold",
     "values": [0.5, 0.9]},
    {"approach": "mwt", "dataset": "digits", "models": ["simcnn"], "parameter": "alpha",
     "values": [0.5, 0.1]},
]
GRADSPLITTER_ALPHA = {"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"],
                      "parameter": "alpha", "values": [0.3]}
STUDY = {**TINY,
         "approaches": {**TINY["approaches"], "mwt": {"metric_samples": 20}},
         "modularize": [*TINY["modularize"],
                        {"approach": "mwt", "dataset": "digits", "models": ["simcnn"]}],
         "sensitivity": {"sweeps": SWEEPS}}


def _config(*sweeps):
    return {**copy.deepcopy(STUDY), "sensitivity": {"sweeps": list(sweeps)}}


def test_points_know_their_stage_default_and_folder():
    points = {(p.approach, p.variant): p
              for p in plan_sweeps(_config(*SWEEPS, GRADSPLITTER_ALPHA))}
    assert set(points) == {("mwt", "threshold-0.5"), ("mwt", "threshold-0.9"),
                           ("mwt", "alpha-0.5"), ("mwt", "alpha-0.1"),
                           ("gradsplitter", "alpha-0.3")}
    tau = points["mwt", "threshold-0.5"]
    assert (tau.stage, tau.training, tau.default, tau.is_default) == (
        DECOMPOSITION, "mwt", 0.9, False)
    assert points["mwt", "threshold-0.9"].is_default
    assert approach_overrides(STUDY, tau) == {"metric_samples": 20, "threshold": 0.5}
    weight = points["mwt", "alpha-0.1"]
    assert (weight.stage, weight.default, weight.is_default) == (TRAINING, 0.5, False)
    assert points["mwt", "alpha-0.5"].is_default  # the objective's default, not configured
    assert objective_overrides(STUDY, weight) == {"alpha": 0.1}
    assert approach_overrides(STUDY, weight) == {"metric_samples": 20}  # decomposed as usual
    # GradSplitter's alpha is an approach hyperparameter, MwT's a loss weight.
    assert points["gradsplitter", "alpha-0.3"].stage == DECOMPOSITION
    assert points["gradsplitter", "alpha-0.3"].record(0)["configured"] is False


def test_words_and_integers_name_points():
    config = _config({"approach": "cnnsplitter", "dataset": "digits", "models": ["simcnn"],
                      "parameter": "grouping", "values": ["importance", "random"]},
                     {"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"],
                      "parameter": "rounds", "values": [1, 2]})
    points = plan_sweeps(config)
    assert [p.variant for p in points] == ["grouping-importance", "grouping-random",
                                           "rounds-1", "rounds-2"]
    assert [p.is_default for p in points] == [True, False, True, False]  # TINY: rounds 1


@pytest.mark.parametrize("sweep, message", [
    ({"approach": "netsplitter"}, r"sensitivity\.sweeps\[0\]\.approach: unknown approach"),
    ({"parameter": "tau"}, r"'tau' is not a hyperparameter of mwt \(fallback_step, "
                           r"metric_samples, threshold\) or of its training kind 'mwt' "
                           r"\(alpha, beta\)"),
    ({"values": [0.5, 1.5]}, r"sensitivity\.sweeps\[0\]\.values\[1\]: "
                             r"approaches\.mwt\.threshold: 1\.5 is out of range"),
    ({"parameter": "alpha", "values": ["high"]},
     r"sensitivity\.sweeps\[0\]\.values\[0\]: objectives\.mwt\.alpha"),
    ({"models": ["vgg16"]}, r"sensitivity\.sweeps\[0\]\.models: vgg16 on digits is not a "
                            r"base model"),
    ({"parameter": "residual_skip", "approach": "moda", "values": ["a/b"]},
     r"values\[0\]: 'a/b' cannot name a folder"),
])
def test_bad_sweeps_are_named(sweep, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweeps(_config({**SWEEPS[0], **sweep}))


def test_a_point_listed_twice_is_refused():
    with pytest.raises(ConfigError, match=r"sweeps\[1\]\.values\[0\]: mwt on simcnn/digits at "
                                          r"threshold = 0\.5 is already a sweep point"):
        plan_sweeps(_config(SWEEPS[0], {**SWEEPS[0], "values": [0.5]}))


def _metrics(folder, name, approach, model="simcnn", seed=0, loss=1.0, krr=0.5):
    path = folder / f"{name}.json"
    write_json(path, {"approach": approach, "dataset": "digits", "model": model, "seed": seed,
                      "base_accuracy": 90.0, "composed_accuracy": 90.0 - loss,
                      "accuracy_loss_pp": loss, "krr": krr, "module_size": krr / 2,
                      "flops_fraction": krr / 2, "overlap": 0.3, "mean_f1": 80.0,
                      "train_seconds": 10.0, "modularize_seconds": 1.0, "device": "cpu"})
    return path


def _records(config=STUDY, seeds=(0,)):
    return [p.record(seed) for p in plan_sweeps(config) for seed in seeds]


def test_table_has_a_row_per_point_and_seed_sorted_by_value(tmp_path):
    records = _records(_config(*SWEEPS, GRADSPLITTER_ALPHA), seeds=(0, 1))
    paths = [_metrics(tmp_path, f"m{i}", r["approach"], seed=r["seed"], loss=i, krr=0.1 * i)
             for i, r in enumerate(records)]
    csv = tmp_path / "tables" / "e7_sensitivity.csv"
    summary = tmp_path / "metrics" / "e7.json"
    write_sensitivity_report(records, paths, csv, summary)
    table = read_sensitivity_table(csv)
    assert len(table) == 10
    mwt_alpha = table[(table.approach == "mwt") & (table.parameter == "alpha")]
    assert list(mwt_alpha.value) == ["0.1", "0.1", "0.5", "0.5"]  # numbers by value
    assert list(mwt_alpha.configured) == [False, False, True, True]
    assert set(table.stage) == {DECOMPOSITION, TRAINING}
    rendered = (tmp_path / "tables" / "e7_sensitivity_summary.csv").read_text()
    assert "accuracy_loss_pp_mean" in rendered and len(rendered.splitlines()) == 6
    assert csv.with_suffix(".md").read_text().startswith("# E7 sensitivity and ablations")
    assert "mwt/digits/simcnn/threshold=0.5/seed1" in json.loads(summary.read_text())

    figure = tmp_path / "figures" / "e7_sensitivity.png"
    assert main(["sensitivity", "figure", "--table", str(csv), "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0 and figure.with_suffix(".pdf").stat().st_size > 0


def test_words_get_categorical_axes(tmp_path):
    config = _config({"approach": "cnnsplitter", "dataset": "digits", "models": ["simcnn"],
                      "parameter": "initialisation", "values": ["heuristic", "random"]})
    records = _records(config)
    paths = [_metrics(tmp_path, f"m{i}", "cnnsplitter", loss=i) for i in range(len(records))]
    table = sensitivity_table(records, paths)
    assert list(table.value) == ["heuristic", "random"]
    sensitivity_figure(table, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.pdf").is_file()


def test_a_record_of_another_point_or_a_miscount_is_refused(tmp_path):
    records = _records(_config(SWEEPS[0]))
    wrong = [_metrics(tmp_path, "a", "mwt"), _metrics(tmp_path, "b", "mwt", model="vgg16")]
    with pytest.raises(ArtifactError, match=r"b\.json: a record of model 'vgg16', but the "
                                            r"sweep point it stands for has 'simcnn'"):
        sensitivity_table(records, wrong)
    with pytest.raises(ConfigError, match=r"2 sweep points for 1 metrics files"):
        sensitivity_table(records, wrong[:1])
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ArtifactError, match=r"other\.csv: not an E7 sensitivity table"):
        read_sensitivity_table(tmp_path / "other.csv")


@pytest.fixture(scope="module")
def base_model(small_digits):
    torch.manual_seed(0)
    net = build_model("simcnn", small_digits.num_classes, width=0.0625)
    model = train(net, small_digits, Recipe(epochs=1, batch_size=64, lr=0.05), seed=0).model
    return model.eval(), {"arch": "simcnn", "model": "simcnn", "dataset": "digits",
                          "num_classes": 10, "width": 0.0625, "options": {}, "seed": 0,
                          "training": "st", "weights_sha256": "f" * 64}


@pytest.mark.parametrize("approach, figure, settings", [
    ("gradsplitter", mask_training_figure,
     [{"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1, "head_epochs": 1,
       "max_train_samples": 128, "alpha": alpha} for alpha in (0.1, 0.5)]),
    ("cnnsplitter", ga_convergence_figure,
     [{"population": 4, "generations": 2, "parents": 2, "elites": 1, "survivors": [4, 6],
       "fitness_samples": 40, "grouping": grouping} for grouping in ("importance", "random")]),
])
def test_curves_of_real_runs(approach, figure, settings, base_model, small_digits, tmp_path):
    model, meta = base_model
    paths = []
    for index, hyperparameters in enumerate(settings):
        modules = run_approach(approach, model, meta, small_digits, hyperparameters, seed=0,
                               progress=False)
        paths.append(tmp_path / f"{index}" / "modules.safetensors")
        modules.save(paths[-1])
    figure(paths, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size and (tmp_path / "curves.pdf").is_file()
    other = ga_convergence_figure if figure is mask_training_figure else mask_training_figure
    with pytest.raises(ArtifactError, match=rf"0/modules\.safetensors: a {approach} module "
                                            r"set; this figure shows"):
        other(paths, tmp_path / "wrong.png")
    assert not (tmp_path / "wrong.png").exists()


def test_modular_training_curves_from_the_command_line(small_digits, tmp_path):
    recipe = Recipe(epochs=2, batch_size=64, lr=0.05)
    paths = []
    for kind, overrides in (("mwt", {}), ("mwt", {"alpha": 0.1}), ("moda", {})):
        torch.manual_seed(0)
        objective = get_objective(kind, overrides)
        result = train(build_model("simcnn", 10, width=0.0625), small_digits, recipe, seed=0,
                       objective=objective)
        paths.append(tmp_path / f"{kind}{len(paths)}" / "model.safetensors")
        save_model(paths[-1], result.model, model_record(
            arch="simcnn", name="simcnn", width=0.0625, options={}, dataset="digits",
            data=small_digits, seed=0, objective=objective, recipe=recipe, result=result,
            accuracies={"train": 0.0, "val": 0.0, "test": 0.0}, device="cpu"))
    out = tmp_path / "figures" / "e7_modular_training.png"
    assert main(["curves", "modular-training", "--inputs", *map(str, paths),
                 "--out", str(out)]) == 0
    assert out.stat().st_size and out.with_suffix(".pdf").stat().st_size
    runs = read_training_runs(paths)
    assert _labels(runs) == ["simcnn/digits (alpha=0.5)", "simcnn/digits (alpha=0.1)",
                             "simcnn/digits"]
    assert set(runs[2]["records"][0]["losses"]) == {"cross_entropy", "affinity", "dispersion",
                                                    "compactness"}


def test_modularize_with_metrics_writes_what_evaluate_modules_writes(data_root, tmp_path):
    model, modules = tmp_path / "model.safetensors", tmp_path / "modules.safetensors"
    assert main(["train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
                 "--training", "moda", "--recipe", '{"epochs": 1, "batch_size": 64, "lr": 0.05}',
                 "--seed", "0", "--data-root", str(data_root), "--out", str(model),
                 "--device", "cpu"]) == 0
    common = ["--model", str(model), "--data-root", str(data_root), "--device", "cpu"]
    assert main(["modularize", "--approach", "moda", "--seed", "0", "--out", str(modules),
                 "--metrics", str(tmp_path / "together.json"), *common]) == 0
    assert main(["evaluate-modules", "--modules", str(modules), "--out",
                 str(tmp_path / "apart.json"), *common]) == 0
    together = json.loads((tmp_path / "together.json").read_text())
    assert together == json.loads((tmp_path / "apart.json").read_text())
    assert together["approach"] == "moda" and 0 < together["krr"] <= 1


def test_curve_labels_name_only_what_differs_among_runs_of_a_model():
    runs = [{"group": "simcnn/digits", "approach": "cnnsplitter",
             "hyperparameters": {"grouping": g, "initialisation": i, "population": 10}}
            for g, i in (("importance", "heuristic"), ("random", "heuristic"))]
    runs.append({"group": "vgg16/digits", "approach": "cnnsplitter",
                 "hyperparameters": {"grouping": "importance", "initialisation": "heuristic",
                                     "population": 10}})
    assert _labels(runs) == ["simcnn/digits (grouping=importance)",
                             "simcnn/digits (grouping=random)", "vgg16/digits"]


@pytest.mark.slow
def test_tiny_study_sweeps_a_threshold_and_a_loss_weight(tiny_study, tmp_path):
    project = copy_project(tiny_study, tmp_path / "project")  # digits and its model: done
    configfile = write_config(project, STUDY)
    results = project / "results/tiny"
    table_target, figure_target = "results/tiny/tables/e7_sensitivity.csv", \
        "results/tiny/figures/e7_sensitivity.png"
    run = snakemake(project, table_target, "--cores", "2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]

    # Only the points off the configured values ran: one decomposition, one model trained.
    points = results / "sensitivity/modules/digits/simcnn"
    assert sorted(p.relative_to(points).as_posix() for p in points.glob("*/*")) == [
        "mwt/alpha-0.1", "mwt/threshold-0.5"]
    assert sorted(p.name for p in (results / "sensitivity/models/digits/simcnn/mwt").iterdir()
                  ) == ["alpha-0.1"]
    trained = json.loads((results / "sensitivity/models/digits/simcnn/mwt/alpha-0.1/seed0/"
                                    "model.json").read_text())
    assert trained["objective"] == {"alpha": 0.1, "beta": 1.5}
    tau = json.loads((points / "mwt/threshold-0.5/seed0/modules.json").read_text())
    assert tau["provenance"]["hyperparameters"]["threshold"] == 0.5
    # The point decomposes the study's MwT model; the loss-weight point its own.
    main_mwt = json.loads((results / "models/digits/simcnn/mwt/seed0/model.json").read_text())
    assert tau["base"]["weights_sha256"] == main_mwt["weights_sha256"]
    weight = json.loads((points / "mwt/alpha-0.1/seed0/modules.json").read_text())
    assert weight["base"]["weights_sha256"] == trained["weights_sha256"]

    table = pd.read_csv(results / "tables/e7_sensitivity.csv", dtype={"value": str})
    assert len(table) == 4 and table.configured.sum() == 2
    row = table[(table.parameter == "threshold") & (table.value == "0.9")].iloc[0]
    main = json.loads((results / "modules/digits/simcnn/mwt/seed0/metrics.json").read_text())
    assert row.krr == pytest.approx(main["krr"], abs=1e-4)  # the study's module set, reused
    lower = table[(table.parameter == "threshold") & (table.value == "0.5")].iloc[0]
    assert lower.krr >= row.krr  # a lower frequency threshold keeps at least as many kernels

    # A new value runs one point and rebuilds the table; nothing else reruns. (The figure,
    # never built here, is listed too: its command is tested in-process above.)
    grown = copy.deepcopy(STUDY)
    grown["sensitivity"]["sweeps"][0]["values"].append(0.7)
    dry = snakemake(project, table_target, figure_target, "-n", "--configfile",
                    write_config(project, grown))
    assert dry.returncode == 0, dry.stdout[-3000:]
    stats = dry.stdout[dry.stdout.index("Job stats"):].split("\n\n")[0].splitlines()[3:]
    jobs = dict(line.split() for line in stats)
    assert jobs == {"modularize_sensitivity": "1", "table_sensitivity": "1",
                    "figure_sensitivity": "1", "total": "3"}

"""E3 patching: the min-max patch rule on hand-made scores, MODA's calibration layer on a
synthetic weak model and module, the weak-model epoch rule, config checks, and the workflow
end to end on a tiny study with both protocols (weak models, patches, table, figure)."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
from workflow_helpers import TINY, copy_project, snakemake, write_config

from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.report.patching import METRICS, WEAK_TYPES
from dnnmod.reuse import patch_scores, patching, patching_moda
from dnnmod.training.train import Recipe, train

# A tiny study with patching: three digits classes plus one target digit (the cheapest weak
# task: no second dataset to prepare), patched with GradSplitter's module.
PATCHING_STUDY = {
    **TINY,
    "models": {**TINY["models"],
               "simple_simcnn": {"arch": "simple_simcnn", "width": 0.125},
               "simcnn_nodropout": {"arch": "simcnn", "width": 0.0625,
                                    "options": {"dropout": 0.0}}},
    "recipes": {**TINY["recipes"],
                "weak_simple": {"epochs": 2, "batch_size": 16, "lr": 0.05,
                                "selection": "best_val"},
                "weak_full": {"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.0,
                              "schedule": "constant"}},
    "modularize": [{"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"]}],
    "reuse": {"patching": {
        "recipes": {"simple": "weak_simple", "full": "weak_full"},
        "settings": {"tiny": {
            "dataset": "digits", "target_classes": [8],
            "others": {"dataset": "digits", "classes": [0, 1, 2]},
            "samples_per_class": {"train": 20, "test": 10},
            "models": {"simcnn": {"simple": "simple_simcnn", "full": "simcnn_nodropout"}}}}}},
}


# A second setting patches with MODA's protocol: LeNet-5 weak models of the same digits, a
# trained calibration layer (a few epochs: the weak tasks hold 16 training images per class).
MODA_STUDY = copy.deepcopy(PATCHING_STUDY)
MODA_STUDY["models"]["lenet5"] = {"arch": "lenet5", "width": 0.5}
MODA_STUDY["reuse"]["patching"]["calibration_layer"] = {"epochs": 10, "batch_size": 16}
MODA_STUDY["reuse"]["patching"]["settings"]["tiny_moda"] = {
    "protocol": "moda", "dataset": "digits", "target_classes": [8],
    "others": {"dataset": "digits", "classes": [4, 5, 6]},
    "samples_per_class": {"train": 20, "test": 10},
    "models": {"simcnn": {"simple": "lenet5", "full": "lenet5"}}}


# The patch rule on hand-made numbers: TC column 2, module calibrated on scores 2..6.


def test_patch_on_hand_made_scores():
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3],
                                  [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 2, 1, 2])
    low, high = patching.minmax_calibration(torch.tensor([2.0, 4.0, 6.0]))
    assert (low, high) == (2.0, 6.0)
    calibrated = patching.calibrate(torch.tensor([1.0, 4.4, 5.2, 5.0]), low, high)
    assert torch.allclose(calibrated, torch.tensor([-0.25, 0.6, 0.8, 0.75]))

    predicted = patching.patched_predictions(probabilities, calibrated, tc_column=2)
    assert predicted.tolist() == [0, 2, 2, 2]
    assert probabilities[0, 2] == 0.1  # the weak model's output is left as it was

    # Weak: predicts TC only for sample 2 (wrong): P = R = F1 = 0; non-TC 1 of 2 right.
    weak = patch_scores.target_metrics(labels, probabilities.argmax(1), tc_column=2)
    assert weak == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "non_tc_accuracy": 50.0}
    # Patched: TC claimed for 1, 2, 3 (2 right): P = 2/3, R = 1, F1 = 0.8; non-TC 1 of 2.
    patched = patch_scores.target_metrics(labels, predicted, tc_column=2)
    assert patched == pytest.approx({"precision": 200 / 3, "recall": 100.0, "f1": 80.0,
                                     "non_tc_accuracy": 50.0})


def test_module_auc_is_the_chance_a_target_image_outscores_another():
    from sklearn.metrics import roc_auc_score

    # Target images score 3, 2 and 1; the others 2 and 0: of the 6 pairs the target wins 4,
    # ties 1 (2 against 2) and loses 1 (1 against 2): (4 + 1/2) / 6.
    scores = torch.tensor([3.0, 2.0, 1.0, 2.0, 0.0])
    target = torch.tensor([True, True, True, False, False])
    assert patch_scores.ranking_auc(scores, target) == 4.5 / 6
    # scikit-learn's, on scores with many ties; NaN without images of one side
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=generator).float()
    target = torch.rand(200, generator=generator) < 0.3
    assert patch_scores.ranking_auc(scores, target) == pytest.approx(
        roc_auc_score(target.numpy(), scores.numpy()), abs=1e-12)
    assert math.isnan(patch_scores.ranking_auc(scores, torch.zeros(200, dtype=torch.bool)))


def test_module_output_of_one_score_and_of_concern_votes():
    assert patch_scores.module_output(torch.tensor([[0.2], [0.9]])).tolist() == \
        pytest.approx([0.2, 0.9])
    votes = torch.tensor([[[3.0, 1.0]], [[0.5, 2.0]]])  # (V_c, V_uc) of one module
    assert patch_scores.module_output(votes).tolist() == [2.0, -1.5]
    with pytest.raises(ArtifactError, match=r"shape \(1, 3\)"):
        patch_scores.module_output(torch.zeros(2, 1, 3))


def test_calibration_needs_target_images_and_survives_a_constant_module():
    with pytest.raises(ConfigError, match="target-class validation images"):
        patching.minmax_calibration(torch.tensor([]))
    assert patching.calibrate(torch.tensor([3.0, 4.0]), 3.0, 3.0).tolist() == [0.0, 1.0]


def test_target_class_is_the_weak_tasks_last_part():
    meta = {"num_classes": 4, "source": {"kind": "task", "parts": [
        {"dataset": "shapes", "classes": [0, 1, 2]}, {"dataset": "digits", "classes": [8]}]}}
    assert patching.target_of(meta, "digits", "w") == (8, 3)
    with pytest.raises(ArtifactError, match="not one class of the strong model's dataset"):
        patching.target_of(meta, "svhn", "w")
    with pytest.raises(ArtifactError, match="not trained on a derived task"):
        patching.target_of({"num_classes": 10, "source": {"kind": "sklearn"}}, "digits", "w")
    # Published numbers are filed under the dataset a one-dataset task comes from.
    assert patching.source_dataset({"name": "svhn_0_4", "source": {"kind": "task", "parts": [
        {"dataset": "svhn", "classes": [0, 1, 2, 3, 4]}]}}) == "svhn"
    assert patching.source_dataset(meta | {"name": "e3_tc8"}) == "e3_tc8"


# MODA's protocol: the calibration layer over the weak model's other logits and the module.


def test_calibration_inputs_put_the_module_in_the_mixed_class_column():
    weak = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    module = torch.tensor([0.5, -0.5])
    # The mixed class (TC) is the weak task's last class: every class keeps its column.
    assert patching_moda.calibration_inputs(weak, module, tc_column=3).tolist() == \
        [[1.0, 2.0, 3.0, 0.5], [5.0, 6.0, 7.0, -0.5]]
    assert patching_moda.calibration_inputs(weak, module, tc_column=1).tolist() == \
        [[1.0, 3.0, 4.0, 0.5], [5.0, 7.0, 8.0, -0.5]]
    with pytest.raises(ConfigError, match="2 weak-model outputs but 3 module scores"):
        patching_moda.calibration_inputs(weak, torch.zeros(3), tc_column=3)


def test_calibration_layer_starts_as_moda_initialises_it():
    layer = patching_moda.CalibrationLayer(6, torch.Generator().manual_seed(0))
    assert layer.weight.shape == (6, 6) and (layer.bias == 0).all()
    assert layer.weight.std().item() == pytest.approx(patching_moda.INIT_STD, rel=0.5)
    again = patching_moda.CalibrationLayer(6, torch.Generator().manual_seed(0))
    assert torch.equal(layer.weight, again.weight)


def _blind_weak_model_and_perfect_module(images_per_class: int, seed: int):
    """Logits of a weak model that knows classes 0-2 and never predicts the TC (column 3), and
    the scores of a module that separates the TC perfectly."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat(images_per_class)
    logits = torch.randn(len(labels), 4, generator=generator)
    known = labels < 3
    logits[known, labels[known]] += 4.0
    logits[:, 3] -= 6.0
    module = torch.where(labels == 3, 2.0, -2.0) + 0.3 * torch.randn(len(labels),
                                                                     generator=generator)
    return logits, module, labels


def test_calibration_layer_lets_a_perfect_module_fix_a_blind_weak_model():
    train_logits, train_module, train_labels = _blind_weak_model_and_perfect_module(40, 0)
    test_logits, test_module, test_labels = _blind_weak_model_and_perfect_module(25, 1)
    layer, history = patching_moda.train_calibration_layer(
        patching_moda.calibration_inputs(train_logits, train_module, 3), train_labels,
        {"epochs": 20, "batch_size": 32}, seed=0)
    assert len(history) == 20 and history[-1]["train_loss"] < history[0]["train_loss"]
    patched = patching_moda.calibrated_predictions(
        layer, patching_moda.calibration_inputs(test_logits, test_module, 3))
    metrics = patching.compare_predictions(test_labels, test_logits.argmax(1), patched, 3)
    assert metrics["weak_recall"] == 0.0 and metrics["patched_recall"] == 100.0
    assert metrics["patched_precision"] == 100.0
    assert metrics["patched_non_tc_accuracy"] >= metrics["weak_non_tc_accuracy"] - 5.0
    # Seeded: the same inputs train the same layer.
    again, _ = patching_moda.train_calibration_layer(
        patching_moda.calibration_inputs(train_logits, train_module, 3), train_labels,
        {"epochs": 20, "batch_size": 32}, seed=0)
    assert torch.equal(layer.weight, again.weight)


def test_calibration_layer_settings_default_to_modas_and_name_a_bad_key():
    assert patching_moda.resolve_calibration_layer("k", None) == \
        {"epochs": 20, "lr": 0.05, "batch_size": 128, "split": "train"}
    with pytest.raises(ConfigError, match=r"k\.lr: 0 is out of range \(0, inf\]"):
        patching_moda.resolve_calibration_layer("k", {"lr": 0})
    with pytest.raises(ConfigError, match=r"k: unknown keys \['momentum'\]"):
        patching_moda.resolve_calibration_layer("k", {"momentum": 0.9})
    with pytest.raises(ConfigError, match=r"calibration layer: \(3, 4\) inputs for 2 labels"):
        patching_moda.train_calibration_layer(torch.zeros(3, 4), torch.zeros(2, dtype=int),
                                              {}, seed=0)


def test_protocol_per_setting_and_its_patch_arguments():
    assert patching.setting_protocol(MODA_STUDY, "tiny") == "minmax"
    assert patching.setting_protocol(MODA_STUDY, "tiny_moda") == "moda"
    assert patching.protocol_arguments(MODA_STUDY, "tiny") == \
        "--protocol minmax --calibration-images all"
    moda = patching.protocol_arguments(MODA_STUDY, "tiny_moda")
    assert moda.startswith("--protocol moda --calibration-layer '{")
    assert json.loads(moda.split(" ", 3)[3].strip("'")) == \
        {"batch_size": 16, "epochs": 10, "lr": 0.05, "split": "train"}
    # The mixed class: the weak task's last part, one class of the strong model's dataset.
    task = patching.weak_tasks(MODA_STUDY)["e3_tiny_moda_tc8"]
    assert task["parts"] == [{"dataset": "digits", "classes": [4, 5, 6]},
                             {"dataset": "digits", "classes": [8]}]
    patching.check_patching_config(MODA_STUDY)


def test_patch_weak_models_rejects_a_bad_protocol_before_loading(tmp_path):
    gone = tmp_path / "gone.safetensors"
    with pytest.raises(ConfigError, match="--protocol: unknown protocol 'moda2'"):
        patching.patch_weak_models(gone, gone, [("simple", gone)], tmp_path, "s",
                                   protocol="moda2")
    with pytest.raises(ConfigError, match=r"--calibration-layer\.batch_size: 0 is out of"):
        patching.patch_weak_models(gone, gone, [("simple", gone)], tmp_path, "s",
                                   protocol="moda", calibration_layer={"batch_size": 0})


# Weak models: tasks, recipes and the epoch rule.


def test_weak_tasks_and_recipes_follow_the_config():
    tasks = patching.weak_tasks(PATCHING_STUDY)
    assert sorted(tasks) == ["e3_tiny_tc8"]
    assert tasks["e3_tiny_tc8"]["parts"][-1] == {"dataset": "digits", "classes": [8]}
    assert tasks["e3_tiny_tc8"]["samples_per_class"] == {"train": 20, "test": 10}
    assert patching.weak_recipe(PATCHING_STUDY, "simple")["selection"] == "best_val"
    assert patching.weak_recipe(PATCHING_STUDY, "overfit")["epochs"] == 2
    assert patching.weak_recipe(PATCHING_STUDY, "underfit")["epochs"] == 1
    assert [patching.underfit_epochs(e, 0.5) for e in (1, 3, 100)] == [1, 2, 50]
    assert patching.weak_model_name(PATCHING_STUDY, "tiny", "simcnn", "underfit") == \
        "simcnn_nodropout"
    assert patching.weak_tasks(TINY) == {}
    scarce = copy.deepcopy(PATCHING_STUDY)
    scarce["reuse"]["patching"]["settings"]["tiny"]["target_samples_per_class"] = {"train": 5}
    assert patching.weak_tasks(scarce)["e3_tiny_tc8"]["parts"] == [
        PATCHING_STUDY["reuse"]["patching"]["settings"]["tiny"]["others"],
        {"dataset": "digits", "classes": [8], "samples_per_class": {"train": 5}}]


def test_underfit_run_replays_the_overfit_runs_first_epochs(small_digits):
    """The epoch rule: at a constant rate with seeded per-epoch shuffling, training for the
    underfit epoch count reproduces the overfit run's checkpoint at that epoch."""
    runs = {}
    for weak_type in ("overfit", "underfit"):
        recipe = Recipe.from_dict(patching.weak_recipe(PATCHING_STUDY, weak_type))
        torch.manual_seed(0)
        model = build_model("simcnn", 10, 0.0625, dropout=0.0)
        runs[weak_type] = train(model, small_digits, recipe, seed=0, progress=False)
    overfit, underfit = runs["overfit"], runs["underfit"]
    assert len(overfit.history) == 2 and len(underfit.history) == 1
    assert (overfit.history[0].train_loss, overfit.history[0].val_accuracy) == \
        (underfit.history[0].train_loss, underfit.history[0].val_accuracy)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["recipes"]["weak_full"].update(schedule="cosine"),
     r"recipes\.full: recipe 'weak_full' must train with a constant learning rate"),
    (lambda c: c["recipes"]["weak_full"].update(augmentation=["flip"]), "no augmentation"),
    (lambda c: c["recipes"]["weak_simple"].update(selection="last"),
     r"recipes\.simple: .*\(selection: best_val\)"),
    (lambda c: c["reuse"]["patching"]["recipes"].update(full="nope"),
     r"recipes\.full: 'nope' is not defined under recipes"),
    (lambda c: c["reuse"]["patching"]["settings"]["tiny"].update(target_classes=[10]),
     r"settings\.tiny\.target_classes: class 10 is out of range: digits has 10"),
    (lambda c: c["reuse"]["patching"]["settings"]["tiny"]["models"]["simcnn"].update(
        simple="lenet"), r"models\.simcnn\.simple: 'lenet' is not defined under models"),
    (lambda c: c.update(modularize=[]), "no modularize entry decomposes simcnn on digits"),
    (lambda c: c["reuse"]["patching"]["settings"]["tiny"]["others"].update(classes=[12]),
     r"settings\.tiny\.others\.classes: class 12 is out of range"),
    (lambda c: c["reuse"]["patching"]["settings"]["tiny"].update(dataset="svhn"),
     r"settings\.tiny\.dataset: 'svhn' is not a configured dataset"),
    (lambda c: c["reuse"]["patching"]["settings"]["tiny"].update(protocol="modas"),
     r"settings\.tiny\.protocol: unknown protocol 'modas'; known: minmax, moda"),
    (lambda c: c["reuse"]["patching"].update(protocol="calibrated"),
     r"reuse\.patching\.protocol: unknown protocol 'calibrated'"),
    (lambda c: c["reuse"]["patching"].update(calibration_layer={"epochs": 0}),
     r"reuse\.patching\.calibration_layer\.epochs: 0 is out of range"),
    (lambda c: c["reuse"]["patching"].update(calibration_layer={"split": "test"}),
     r"reuse\.patching\.calibration_layer\.split: 'test' is not one of \['train', 'val'\]"),
])
def test_bad_patching_config_names_the_key(change, message):
    config = copy.deepcopy(PATCHING_STUDY)
    change(config)
    with pytest.raises(ConfigError, match=message):
        patching.check_patching_config(config)


# The table and the figure, from hand-made records.


def _record(approach, seed, rows, protocol="minmax", setting="cifar"):
    return {"protocol": protocol, "setting": setting, "approach": approach, "model": "simcnn",
            "arch": "simcnn", "dataset": "cifar10", "source_dataset": "cifar10",
            "training": "st", "seed": seed,
            "rows": [{"weak_type": weak_type, "target_class": tc, "target_name": name,
                      "weak_model": "simple_simcnn", "weak_train_accuracy": 90.0,
                      "weak_test_accuracy": 70.0,
                      **{f"{stage}_{metric}": value + (10 if stage == "patched" else 0)
                         for stage in ("weak", "patched") for metric in METRICS}}
                     for weak_type, tc, name, value in rows]}


def test_table_averages_over_target_classes_with_published_beside(tmp_path):
    from dnnmod.report.patching import patching_figure, write_patching_table

    paths = []
    for approach in ("cnnsplitter", "gradsplitter"):
        path = tmp_path / f"{approach}.json"
        path.write_text(json.dumps(_record(approach, 0, [
            ("simple", 0, "airplane", 60.0), ("simple", 3, "cat", 70.0),
            ("overfit", 0, "airplane", 40.0), ("overfit", 3, "cat", 50.0)])))
        paths.append(path)
    csv = tmp_path / "e3.csv"
    write_patching_table(paths, csv, tmp_path / "e3.json")
    table = pd.read_csv(csv, keep_default_na=False)
    average = table[(table.target == "average") & (table.approach == "cnnsplitter")
                    & (table.weak_type == "simple")].iloc[0]
    # Mean over the two target classes, metric by metric; the gain in percentage points.
    assert average.weak_precision == 65.0 and average.patched_f1 == 75.0
    assert average.precision_gain_pp == 10.0
    # ASE's SimCNN/CIFAR-10 simple average beside ours; per-TC rows carry none.
    assert float(average.published_weak_precision) == 73.3
    assert float(average.published_patched_precision) == 82.75
    assert "ASE2022" in average.published_source
    assert (table[table.target == "cat"].published_weak_precision == "").all()
    order = table[(table.approach == "cnnsplitter")].target.tolist()
    assert order == ["airplane", "cat", "average"] * 2  # weak types: simple, then overfit
    summary = json.loads((tmp_path / "e3.json").read_text())
    assert summary["cnnsplitter/mean_gain_pp"]["precision_gain_pp"] == 10.0
    assert summary["cnnsplitter/mean_gain_pp"]["published_precision_gain_pct"] == 12.54
    assert (tmp_path / "e3_summary.csv").is_file() and (tmp_path / "e3.md").is_file()

    patching_figure(paths, tmp_path / "e3.png")
    for suffix in ("png", "pdf"):
        assert (tmp_path / f"e3.{suffix}").stat().st_size > 0


def test_table_names_the_protocol_and_files_headlines_per_protocol(tmp_path):
    from dnnmod.report.patching import write_patching_table

    paths = []
    for protocol, setting in (("minmax", "cifar"), ("moda", "cifar_moda")):
        path = tmp_path / f"{protocol}.json"
        path.write_text(json.dumps(_record("moda", 0, [("simple", 0, "airplane", 60.0)],
                                           protocol=protocol, setting=setting)))
        paths.append(path)
    csv = tmp_path / "e3.csv"
    write_patching_table(paths, csv, tmp_path / "e3.json")
    table = pd.read_csv(csv, keep_default_na=False)
    assert sorted(set(zip(table.setting, table.protocol, strict=True))) == \
        [("cifar", "minmax"), ("cifar_moda", "moda")]
    assert (tmp_path / "e3.md").read_text().startswith(
        "# E3 patching weak models (protocols: minmax, moda)")
    summary = json.loads((tmp_path / "e3.json").read_text())
    # MODA's abstract headline (target-class accuracy +12 %) stands beside its protocol only.
    assert summary["moda/moda/mean_gain_pp"]["recall_gain_pp"] == 10.0
    assert summary["moda/moda/mean_gain_pp"]["published_recall_gain_pct"] == 12.0
    assert "published_recall_gain_pct" not in summary["moda/mean_gain_pp"]


# The workflow, end to end: weak tasks, weak models, patches by both protocols, table, figure
# (one Snakemake run of a study with a min-max and a MODA setting, read by two tests).

TARGETS = ["results/tiny/tables/e3_patching.csv", "results/tiny/figures/e3_patching.png"]


@pytest.fixture(scope="module")
def patched_study(tiny_study, tmp_path_factory):
    # On the session's TINY run: digits and its simcnn are done.
    project = copy_project(tiny_study, tmp_path_factory.mktemp("patching") / "project")
    configfile = write_config(project, MODA_STUDY)
    run = snakemake(project, *TARGETS, "--cores", "2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    return project, configfile


@pytest.mark.slow
def test_patching_workflow_end_to_end(patched_study):
    project, configfile = patched_study
    results = project / "results/tiny"

    weak = json.loads((results / "patching/weak/tiny/simcnn/underfit/tc8/seed0/model.json")
                      .read_text())
    assert weak["dataset"] == "e3_tiny_tc8" and len(weak["history"]) == 1
    assert weak["arch"] == "simcnn" and weak["options"] == {"dropout": 0.0}
    task = json.loads((project / "data/e3_tiny_tc8/meta.json").read_text())
    assert task["class_names"] == ["0", "1", "2", "8"]
    assert task["counts"] == {"train": 80, "test": 40}
    record = json.loads((results / "patching/tiny/simcnn/gradsplitter/seed0/metrics.json")
                        .read_text())
    assert record["approach"] == "gradsplitter" and len(record["rows"]) == 3
    assert record["source_dataset"] == "digits"
    assert {row["weak_type"] for row in record["rows"]} == set(WEAK_TYPES)
    for row in record["rows"]:
        assert row["target_class"] == 8 and row["tc_column"] == 3
        assert row["tc_test_images"] == 10 and row["calibration"]["strong_val_tc_images"] > 0
        for key in ("weak_precision", "patched_recall", "patched_non_tc_accuracy"):
            assert 0 <= row[key] <= 100
        assert 0 <= row["module_auc"] <= 1
    # one module per weak task: every weak model's row has its ranking
    assert len({row["module_auc"] for row in record["rows"]}) == 1

    assert record["protocol"] == "minmax" and "calibration_layer" not in record
    table = pd.read_csv(results / "tables/e3_patching.csv", keep_default_na=False)
    assert set(table.approach) == {"gradsplitter"}
    table = table[table.setting == "tiny"]
    assert set(table.protocol) == {"minmax"}
    assert sorted(table.target) == ["8"] * 3 + ["average"] * 3
    assert table.module_auc.astype(float).tolist() == pytest.approx(
        [record["rows"][0]["module_auc"]] * 6, abs=1e-4)  # the CSV's 4 decimals
    assert (results / "tables/e3_patching.md").read_text().startswith("# E3 patching")
    assert "tiny/simcnn/gradsplitter/overfit/seed0" in json.loads(
        (results / "metrics/e3_patching.json").read_text())
    for suffix in ("png", "pdf"):
        assert (results / f"figures/e3_patching.{suffix}").stat().st_size > 0

    # A lost figure reruns the figure only: no weak model, patch or table job.
    (results / "figures/e3_patching.png").unlink()
    again = snakemake(project, *TARGETS, "-n", "--configfile", configfile)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "rule figure_patching:" in again.stdout
    for rule in ("table_patching", "patch_weak_models", "train_weak_model"):
        assert f"rule {rule}:" not in again.stdout


@pytest.mark.slow
def test_moda_protocol_workflow_end_to_end(patched_study):
    project, _ = patched_study
    results = project / "results/tiny"
    # The mixed class: the weak task is the other digits, then the TC as its last class.
    task = json.loads((project / "data/e3_tiny_moda_tc8/meta.json").read_text())
    assert task["class_names"] == ["4", "5", "6", "8"]
    weak = json.loads((results / "patching/weak/tiny_moda/simcnn/overfit/tc8/seed0/model.json")
                      .read_text())
    assert weak["arch"] == "lenet5" and weak["dataset"] == "e3_tiny_moda_tc8"

    record = json.loads((results / "patching/tiny_moda/simcnn/gradsplitter/seed0/metrics.json")
                        .read_text())
    assert record["protocol"] == "moda"
    assert record["calibration_layer"] == {"epochs": 10, "lr": 0.05, "batch_size": 16,
                                           "split": "train"}
    assert {row["weak_type"] for row in record["rows"]} == set(WEAK_TYPES)
    for row in record["rows"]:
        calibration = row["calibration"]
        assert row["tc_column"] == 3 and calibration["layer"] == "linear 4x4"
        assert calibration["images"] == 64 and calibration["tc_images"] == 16
        assert len(calibration["history"]) == 10
        for key in ("weak_recall", "patched_precision", "patched_non_tc_accuracy"):
            assert 0 <= row[key] <= 100
        assert 0 <= row["module_auc"] <= 1

    table = pd.read_csv(results / "tables/e3_patching.csv", keep_default_na=False)
    moda = table[table.setting == "tiny_moda"]
    assert set(moda.protocol) == {"moda"} and len(moda) == 6
    assert "tiny_moda/simcnn/gradsplitter/simple/seed0" in json.loads(
        (results / "metrics/e3_patching.json").read_text())

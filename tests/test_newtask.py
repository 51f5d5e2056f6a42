"""E4 new tasks: pairs of a setting, module choice by best F1, composed binary classifiers
(across models, datasets and combination rules), the table, and the workflow end to end."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score
from workflow_helpers import TINY, make_project, snakemake, write_config

from dnnmod.artifacts import write_json
from dnnmod.data import ImageSet, combine
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.modules import combination
from dnnmod.modules.heads import Head, LogitMLPHead, OwnLogitHead
from dnnmod.modules.masking import ensure_nonempty
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure
from dnnmod.report.newtask import new_task_figure, new_task_table, write_new_task_report
from dnnmod.reuse.newtask import (
    Candidate,
    Pair,
    choose_module,
    f1_by_class,
    pair_record,
    plan_new_tasks,
    setting_pairs,
)

CLASSES = {"digits": 10, "shapes": 10}


# ------------------------------------------------------------------------- pairs, plans


def test_pairs_of_a_setting_all_listed_and_sampled():
    inter = setting_pairs("x", {"datasets": ["digits", "shapes"]}, CLASSES)
    assert len(inter) == 100 and inter[0] == Pair("digits", 0, "shapes", 0)
    intra = setting_pairs("i", {"datasets": ["digits", "digits"], "pairs": "all"}, CLASSES)
    assert len(intra) == 45 and all(p.class_a < p.class_b for p in intra)
    listed = setting_pairs("l", {"datasets": ["digits", "shapes"], "pairs": [[3, 1], [0, 9]]},
                           CLASSES)
    assert [p.task for p in listed] == ["pair_digits_3_shapes_1", "pair_digits_0_shapes_9"]
    assert listed[0].task_spec() == {"parts": [{"dataset": "digits", "classes": [3]},
                                               {"dataset": "shapes", "classes": [1]}]}
    sample = {"datasets": ["digits", "shapes"], "max_pairs": 7, "pair_seed": 3}
    assert setting_pairs("s", sample, CLASSES) == setting_pairs("s", sample, CLASSES)
    assert len(setting_pairs("s", sample, CLASSES)) == 7


@pytest.mark.parametrize("setting, message", [
    ({"datasets": ["digits", "cifar10"]}, r"settings\.s\.datasets: 'cifar10' is not a "
                                          "configured dataset"),
    ({"datasets": ["digits"]}, r"settings\.s\.datasets: expected \[dataset A, dataset B\]"),
    ({"datasets": ["digits", "shapes"], "pairs": [[3, 10]]},
     r"settings\.s\.pairs\[0\]: class 10 is out of range for shapes"),
    ({"datasets": ["digits", "digits"], "pairs": [[3, 3]]},
     r"settings\.s\.pairs\[0\]: a pair within digits needs two distinct classes"),
    ({"datasets": ["digits", "shapes"], "pairs": [[3, 1], [3, 1]]}, "listed twice"),
    ({"datasets": ["digits", "shapes"], "pairs": [["3", 1]]}, r"pairs\[0\]: expected"),
])
def test_bad_settings_name_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        setting_pairs("s", setting, CLASSES)


def _study(**new_tasks):
    return {"datasets": {"digits": {}, "shapes": {}}, "recipes": {"r": {}},
            "models": {"simcnn": {}, "vgg16": {}},
            "reuse": {"new_tasks": {"recipe": "r", **new_tasks}}}


def test_plan_takes_the_approaches_with_module_sets_on_both_datasets():
    decomposed = [("gradsplitter", "digits", "simcnn"), ("gradsplitter", "shapes", "simcnn"),
                  ("gradsplitter", "shapes", "vgg16"), ("mwt", "digits", "simcnn")]
    plans = plan_new_tasks(_study(settings={
        "cross": {"datasets": ["digits", "shapes"], "model": "simcnn",
                  "pool": ["simcnn", "vgg16"], "pairs": [[0, 1]]},
        "intra": {"datasets": ["digits", "digits"], "model": "simcnn", "pairs": [[0, 1]]},
        "unserved": {"datasets": ["digits", "digits"], "model": "vgg16"}}),
        decomposed)
    assert plans["cross"].candidates == {"gradsplitter": (
        ("digits", "simcnn"), ("shapes", "simcnn"), ("shapes", "vgg16"))}
    assert plans["cross"].kind == "inter" and plans["intra"].kind == "intra"
    assert set(plans["intra"].candidates) == {"gradsplitter", "mwt"}
    assert set(plans) == {"cross", "intra"}  # nothing decomposed vgg16 on digits
    assert plan_new_tasks({"reuse": {}}, decomposed) == {}


@pytest.mark.parametrize("study, message", [
    ({**_study(settings={}), "reuse": {"new_tasks": {"recipe": "fast", "settings": {}}}},
     r"reuse\.new_tasks\.recipe: 'fast' is not defined under recipes"),
    (_study(settings={"s": {"datasets": ["digits", "shapes"], "model": "lenet"}}),
     r"settings\.s\.model: 'lenet' is not defined under models"),
    (_study(settings={"s": {"datasets": ["digits", "shapes"], "model": "simcnn",
                            "pool": ["simcnn", "rescnn"]}}),
     r"settings\.s\.pool: 'rescnn' is not defined under models"),
])
def test_plan_names_unresolvable_keys(study, message):
    with pytest.raises(ConfigError, match=message):
        plan_new_tasks(study, [])


# ------------------------------------------------------------------ module choice by F1


@pytest.fixture(scope="module")
def tiny_structure():
    return trace_structure(build_model("simcnn", 10, width=0.0625))


def hand_made_modules(structure, head: Head, seed: int = 0, combination_rule: str = "argmax",
                      normalization=None, dataset: str = "digits") -> ModuleSet:
    generator = torch.Generator().manual_seed(seed)
    masks = ensure_nonempty(
        {g.name: torch.rand(10, g.size, generator=generator) < 0.5 for g in structure.groups},
        {g.name: torch.rand(10, g.size, generator=generator) for g in structure.groups})
    return ModuleSet(approach="test", classes=list(range(10)), masks=masks, head=head,
                     combination=combination_rule, structure=structure,
                     base={"weights_sha256": str(seed) * 64, "dataset": dataset,
                           "normalization": normalization})


def test_f1_of_argmax_and_thresholded_modules_on_hand_made_scores(tiny_structure):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 5])
    scores = torch.full((8, 10), -1.0)
    winners = [0, 1, 1, 1, 2, 0, 2, 5]  # argmax per image
    scores[torch.arange(8), winners] = 1.0
    own_logit = hand_made_modules(tiny_structure, OwnLogitHead(list(range(10)), 10))
    f1 = f1_by_class(own_logit, scores, labels)
    predicted = torch.tensor(winners)
    for cls in range(10):
        expected = 100 * f1_score((labels == cls).numpy(), (predicted == cls).numpy(),
                                  zero_division=0)
        assert f1[cls] == pytest.approx(expected)
    assert f1[1] == pytest.approx(100 * 2 * 2 / (2 * 2 + 1))  # tp 2, fp 1, fn 0
    # A sigmoid head claims its class above 0.5, whatever the other modules say.
    sigmoid = hand_made_modules(tiny_structure, LogitMLPHead(list(range(10)), 10))
    probabilities = torch.zeros(8, 10)
    probabilities[:, 2] = torch.tensor([0.9, 0.1, 0.1, 0.1, 0.6, 0.7, 0.2, 0.1])
    assert f1_by_class(sigmoid, probabilities, labels)[2] == pytest.approx(
        100 * 2 * 2 / (2 * 2 + 1 + 1))  # tp 2 (images 4, 5), fp 1 (image 0), fn 1 (image 6)


def _candidate(f1: dict[int, float], dataset: str, name: str, modules=None, model=None,
               normalization=None) -> Candidate:
    return Candidate(model=model, modules=modules, source=name, f1=f1, meta={
        "dataset": dataset, "arch": "simcnn", "model": name, "training": "st", "seed": 0,
        "class_names": [f"{dataset}{c}" for c in range(10)], "normalization": normalization})


def test_module_choice_takes_the_best_f1_of_the_class_dataset():
    first = _candidate({3: 80.0, 8: 60.0}, "digits", "first")
    better = _candidate({3: 90.0, 8: 60.0}, "digits", "better")
    other = _candidate({3: 99.0}, "shapes", "other")
    candidates = [first, better, other]
    assert choose_module(candidates, "digits", 3) is better
    assert choose_module(candidates, "digits", 8) is first  # a tie: the first in pool order
    assert choose_module(candidates, "shapes", 3) is other
    with pytest.raises(ArtifactError, match="no candidate module set of shapes has a module "
                                            "for class 8"):
        choose_module(candidates, "shapes", 8)


# --------------------------------------------------- composition, by hand and fused


def _normalise(x, normalization):
    mean = torch.tensor(normalization["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def pair_test(digits):
    """A pair task's test images: digit 3 (label 0) and digit 8 (label 1)."""
    return combine([digits.test.subset([3]), digits.test.subset([8])])


def _two_model_parts(digits):
    """Untrained simcnn 'on digits' and vgg16 'on shapes', each with hand-made modules and its
    own normalisation (as composing models of two datasets needs)."""
    torch.manual_seed(0)
    simcnn = build_model("simcnn", 10, width=0.0625).eval()
    vgg16 = build_model("vgg16", 10, width=0.0625).eval()
    digits_norm = {"mean": digits.train.mean.tolist(), "std": digits.train.std.tolist()}
    shapes_norm = {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]}
    a = hand_made_modules(trace_structure(simcnn), LogitMLPHead(list(range(10)), 10), 1,
                          normalization=digits_norm)
    b = hand_made_modules(trace_structure(vgg16), LogitMLPHead(list(range(10)), 10), 2,
                          normalization=shapes_norm, dataset="shapes")
    return (_candidate({3: 70.0}, "digits", "simcnn", a, simcnn, digits_norm),
            _candidate({8: 70.0}, "shapes", "vgg16", b, vgg16, shapes_norm))


def _by_hand(parts: Sequence[tuple[Candidate, int]], images: ImageSet) -> torch.Tensor:
    """Predicted labels: the part whose module scores highest on its own normalised input."""
    x, _ = images.unit_batch()
    columns = []
    for part, cls in parts:
        normalised = _normalise(x, part.meta["normalization"])
        columns.append(part.modules.scores(part.model, normalised)[:, part.modules.classes.index(
            cls)])
    return torch.stack(columns, dim=1).argmax(dim=1)


def test_cross_model_composition_equals_the_hand_computation(digits, pair_test):
    part_a, part_b = _two_model_parts(digits)
    pair = Pair("digits", 3, "shapes", 8)
    record = pair_record(pair, part_a, part_b, pair_test)
    predicted = _by_hand([(part_a, 3), (part_b, 8)], pair_test)
    correct = predicted == pair_test.labels
    assert record["composed_accuracy"] == pytest.approx(100 * correct.float().mean().item())
    assert record["recall_a"] == pytest.approx(
        100 * correct[pair_test.labels == 0].float().mean().item())
    assert record["recall_b"] == pytest.approx(
        100 * correct[pair_test.labels == 1].float().mean().item())
    assert record["test_images"] == len(pair_test)
    assert (record["module_a"]["model"], record["module_b"]["model"]) == ("simcnn", "vgg16")
    assert record["class_name_b"] == "shapes8"


def test_intra_dataset_pair_fuses_one_module_set(digits, pair_test):
    part, _ = _two_model_parts(digits)
    both = Candidate(part.model, part.meta, part.modules, "one", {3: 50.0, 8: 50.0})
    record = pair_record(Pair("digits", 3, "digits", 8), both, both, pair_test)
    predicted = _by_hand([(both, 3), (both, 8)], pair_test)
    assert record["composed_accuracy"] == pytest.approx(
        100 * (predicted == pair_test.labels).float().mean().item())


class _VoteHead(Head):
    """Two outputs per module, like Pan & Rajan's (V_c, V_uc): own logit and the mean of the
    others."""

    kind = "test_votes"

    def forward(self, logits):
        own = torch.stack([logits[m, :, c] for m, c in enumerate(self.classes)], dim=1)
        return torch.stack([own, (logits.sum(dim=2).T - own) / (self.num_outputs - 1)], dim=2)

    def subset(self, index):
        return _VoteHead([self.classes[i] for i in index], self.num_outputs)


def _votes(scores, classes):
    """Voters (V_c > V_uc) win; among several voters, or none, the highest V_c."""
    own, other = scores[..., 0], scores[..., 1]
    voters = own > other
    ranked = torch.where(voters.any(dim=1, keepdim=True), own.masked_fill(~voters, -torch.inf),
                         own)
    return classes[ranked.argmax(dim=1)]


def test_a_rule_over_two_scores_per_module_composes_unchanged(digits, pair_test, monkeypatch):
    monkeypatch.setitem(combination.COMBINATIONS, "test_votes", _votes)
    part, _ = _two_model_parts(digits)
    modules = hand_made_modules(trace_structure(part.model), _VoteHead(list(range(10)), 10), 1,
                                combination_rule="test_votes",
                                normalization=part.meta["normalization"])
    voter = Candidate(part.model, part.meta, modules, "votes", {3: 1.0, 8: 1.0})
    record = pair_record(Pair("digits", 3, "digits", 8), voter, voter, pair_test)
    x, labels = pair_test.unit_batch()
    scores = modules.scores(part.model, _normalise(x, part.meta["normalization"]))[:, [3, 8]]
    expected = _votes(scores, torch.tensor([0, 1]))
    assert scores.shape[1:] == (2, 2)
    assert record["composed_accuracy"] == pytest.approx(
        100 * (expected == labels).float().mean().item())
    f1 = f1_by_class(modules, modules.scores(part.model, _normalise(
        x, part.meta["normalization"])), torch.where(labels == 0, 3, 8))
    assert set(f1) == set(range(10))
    argmax_part, _ = _two_model_parts(digits)
    with pytest.raises(ArtifactError, match="combine by different rules"):
        pair_record(Pair("digits", 3, "digits", 8), voter, argmax_part, pair_test)


def test_a_test_set_that_is_not_a_pair_task_is_refused(digits):
    part, _ = _two_model_parts(digits)
    both = Candidate(part.model, part.meta, part.modules, "one", {3: 50.0, 8: 50.0})
    with pytest.raises(ArtifactError, match="not those of a pair task"):
        pair_record(Pair("digits", 3, "digits", 8), both, both, digits.test.subset([3]))


# ------------------------------------------------------------------ table and figure


def _composed_json(path, setting, approach, kind, accuracies):
    pairs = [{"task": f"pair_{i}", "pair": f"d/{i} + e/{i}", "dataset_a": "d", "class_a": i,
              "class_name_a": str(i), "dataset_b": "e", "class_b": i, "class_name_b": str(i),
              "module_a": {"model": "simcnn", "training": "st", "selection_f1": 90.0},
              "module_b": {"model": "simcnn", "training": "st", "selection_f1": 80.0},
              "test_images": 20, "composed_accuracy": accuracy}
             for i, accuracy in enumerate(accuracies)]
    write_json(path, {"setting": setting, "kind": kind, "approach": approach,
                      "model": "simcnn", "seed": 0, "pairs": pairs})
    return path


def _scratch_json(directory, task, accuracy):
    weights = directory / task / "model.safetensors"
    write_json(weights.with_suffix(".json"), {
        "format": "dnnmod.model/1", "arch": "simcnn", "model": "simcnn", "num_classes": 2,
        "width": 1.0, "options": {}, "dataset": task, "training": "st", "objective": {},
        "normalization": {}, "seed": 0, "selected_epoch": 3, "history": [{}] * 5,
        "metrics": {"test_accuracy": accuracy}})
    return weights


def test_table_differences_means_and_published_beside(tmp_path):
    composed = [_composed_json(tmp_path / "a.json", "pairs", "pan_rajan", "intra", [90, 70]),
                _composed_json(tmp_path / "b.json", "pairs", "gradsplitter", "intra", [80, 60])]
    scratch = [_scratch_json(tmp_path, "pair_0", 85.0), _scratch_json(tmp_path, "pair_1", 75.0)]
    table = new_task_table(composed, scratch)
    ours = table[table.approach == "pan_rajan"].set_index("pair")
    assert list(ours.accuracy_difference_pp) == [5.0, -5.0, 0.0]  # pairs, then their mean
    assert ours.loc["mean", "composed_accuracy"] == 80.0 and ours.loc["mean", "pairs"] == 2
    assert ours.loc["mean", "published_accuracy_difference_pp"] == 2.5  # Pan & Rajan, intra
    assert "ICSE2022-Pan" in ours.loc["mean", "published_source"]
    grad = table[(table.approach == "gradsplitter") & (table.pair == "mean")].iloc[0]
    assert grad.accuracy_difference_pp == -10.0 and pd.isna(grad.published_accuracy_difference_pp)
    assert ours.loc["d/0 + e/0", "scratch_epochs"] == 5
    write_new_task_report(composed, scratch, tmp_path / "e4.csv", tmp_path / "e4.json")
    assert json.loads((tmp_path / "e4.json").read_text())["pairs/pan_rajan/seed0"] == {
        "mean_accuracy_difference_pp": 0.0, "mean_composed_accuracy": 80.0,
        "mean_scratch_accuracy": 80.0, "pairs": 2}
    assert (tmp_path / "e4_summary.csv").is_file() and (tmp_path / "e4.md").is_file()
    written = pd.read_csv(tmp_path / "e4.csv")
    assert written.accuracy_difference_pp_minus_published.dropna().tolist() == [-2.5]
    new_task_figure(composed, scratch, tmp_path / "e4.png")
    assert (tmp_path / "e4.png").stat().st_size and (tmp_path / "e4.pdf").stat().st_size
    with pytest.raises(ArtifactError, match=r"no from-scratch simcnn \(seed 0\) on pair_1"):
        new_task_table(composed, scratch[:1])
    write_json(tmp_path / "other.json", {"setting": "pairs", "pairs": []})
    with pytest.raises(ArtifactError, match=r"other\.json: not a reuse new-task record"):
        new_task_table([tmp_path / "other.json"], scratch)


# ------------------------------------------------------------------- workflow, for real


TINY_E4 = {
    **TINY,
    "datasets": {"digits": {}, "shapes": {"options": {"train_count": 400, "test_count": 100,
                                                      "seed": 0}}},
    "recipes": {**TINY["recipes"],
                "scratch": {"epochs": 3, "batch_size": 64, "lr": 0.002, "optimizer": "adam",
                            "selection": "best_val", "patience": 1}},
    "base_models": [{"dataset": "digits", "models": ["simcnn"], "recipe": "tiny"},
                    {"dataset": "shapes", "models": ["simcnn"], "recipe": "tiny"}],
    "modularize": [{"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"]},
                   {"approach": "gradsplitter", "dataset": "shapes", "models": ["simcnn"]}],
    "reuse": {"new_tasks": {"recipe": "scratch", "settings": {
        "cross": {"datasets": ["digits", "shapes"], "model": "simcnn", "pairs": [[3, 1]]}}}},
}


@pytest.mark.slow
def test_workflow_composes_new_tasks_and_reports_them(tmp_path):
    project = make_project(tmp_path / "project")
    configfile = write_config(project, TINY_E4)
    targets = ["results/tiny/tables/e4_new_tasks.csv", "results/tiny/figures/e4_new_tasks.png"]
    run = snakemake(project, *targets, "--cores", "2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]

    results = project / "results/tiny"
    composed = json.loads((results / "new_tasks/cross/gradsplitter/seed0/composed.json")
                          .read_text())
    (record,) = composed["pairs"]
    assert record["task"] == "pair_digits_3_shapes_1" and composed["kind"] == "inter"
    assert record["module_b"]["dataset"] == "shapes" and 0 <= record["composed_accuracy"] <= 100
    scratch = json.loads((results / "new_tasks/scratch/pair_digits_3_shapes_1/simcnn/seed0/"
                                    "model.json").read_text())
    assert scratch["num_classes"] == 2 and scratch["recipe"]["selection"] == "best_val"
    # Both are tested on the pair task's test images: every digit 3 and every square.
    pair_meta = json.loads((project / "data/pair_digits_3_shapes_1/meta.json").read_text())
    assert record["test_images"] == pair_meta["counts"]["test"]

    table = pd.read_csv(results / "tables/e4_new_tasks.csv")
    assert set(table.setting) == {"cross"}
    assert list(table[table.setting == "cross"].pair) == ["digits/3 + shapes/1", "mean"]
    row = table[(table.setting == "cross") & (table.pair != "mean")].iloc[0]
    assert row.accuracy_difference_pp == pytest.approx(row.composed_accuracy
                                                       - row.scratch_accuracy, abs=1e-3)
    assert row.scratch_accuracy == pytest.approx(scratch["metrics"]["test_accuracy"], abs=1e-3)
    mean = table[(table.setting == "cross") & (table.pair == "mean")].iloc[0]
    assert mean.published_accuracy_difference_pp == pytest.approx(-2.46)
    assert "TOSEM2023" in mean.published_source
    assert (results / "tables/e4_new_tasks.md").read_text().startswith("# E4 new tasks")
    metrics = json.loads((results / "metrics/e4_new_tasks.json").read_text())
    assert set(metrics) == {"cross/gradsplitter/seed0"}
    for suffix in ("png", "pdf"):
        assert (results / f"figures/e4_new_tasks.{suffix}").stat().st_size > 0

    again = snakemake(project, *targets, "--cores", "2", "--configfile", configfile)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout
    # A figure rebuilt reruns only the figure: nothing upstream, not the table.
    (results / "figures/e4_new_tasks.png").unlink()
    dry = snakemake(project, *targets, "-n", "--configfile", configfile)
    assert dry.returncode == 0, dry.stdout[-3000:]
    jobs = dry.stdout[dry.stdout.index("Job stats:"):]
    assert "figure_new_tasks" in jobs and "table_new_tasks" not in jobs
    assert "compose_new_tasks" not in jobs and "train_new_task_scratch" not in jobs

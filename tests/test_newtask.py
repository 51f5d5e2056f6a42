"""E4 new tasks: pairs of a setting, module choice by best F1, composed binary classifiers
(across models, datasets and combination rules), the table, and the workflow end to end."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score
from workflow_helpers import TINY, copy_project, snakemake, write_config

from dnnmod.artifacts import load_tensors, write_json
from dnnmod.cli import main
from dnnmod.data import ImageSet, Task, combine, derive_task
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.modules import combination
from dnnmod.modules.heads import ConcernVotesHead, Head, LogitMLPHead, OwnLogitHead
from dnnmod.modules.masking import channel_view, ensure_nonempty
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure
from dnnmod.report.newtask import new_task_figure, new_task_table, write_new_task_report
from dnnmod.reuse.newtask import (
    Candidate,
    Pair,
    PoolMember,
    choose_module,
    continue_learning,
    continuous_learning_loss,
    f1_by_class,
    pair_record,
    plan_new_tasks,
    pool_draw,
    pool_recipes,
    pool_tasks,
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


def test_plan_carries_the_continuous_learning_settings_with_defaults():
    decomposed = [("pan_rajan", "digits", "simcnn"), ("pan_rajan", "shapes", "simcnn")]
    plans = plan_new_tasks(_study(settings={
        "with": {"datasets": ["digits", "shapes"], "model": "simcnn", "pairs": [[0, 1]],
                 "continuous_learning": {"epochs": 2}},
        "without": {"datasets": ["digits", "shapes"], "model": "simcnn", "pairs": [[0, 1]]}}),
        decomposed)
    assert plans["with"].continuous_learning == {"epochs": 2, "lr": 0.00001, "batch_size": 64}
    assert plans["without"].continuous_learning is None


@pytest.mark.parametrize("study, message", [
    ({**_study(settings={}), "reuse": {"new_tasks": {"recipe": "fast", "settings": {}}}},
     r"reuse\.new_tasks\.recipe: 'fast' is not defined under recipes"),
    (_study(settings={"s": {"datasets": ["digits", "shapes"], "model": "simcnn",
                            "continuous_learning": {"epochs": 0}}}),
     r"settings\.s\.continuous_learning\.epochs: 0 is out of range"),
    (_study(settings={"s": {"datasets": ["digits", "shapes"], "model": "simcnn",
                            "continuous_learning": {"epoch": 2}}}),
     r"settings\.s\.continuous_learning: unknown keys \['epoch'\]"),
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
                      normalization=None, dataset: str = "digits",
                      positions: bool = False) -> ModuleSet:
    """Random masks: kept channels, or with ``positions`` active output positions of the
    groups that take them (Pan & Rajan's granularity)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {g.name: (g.size,) if not positions or len(g.shape) != 3 else tuple(g.shape)
              for g in structure.groups}
    masks = ensure_nonempty(
        {name: torch.rand(10, *shape, generator=generator) < 0.5
         for name, shape in shapes.items()},
        {name: torch.rand(10, *shape, generator=generator) for name, shape in shapes.items()})
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


# ------------------------------------------------------------ GradSplitter's Dirichlet pool


def _draw(data_root, alpha, seed=0, min_per_class=1, split_seed=0):
    """A pool member's task drawn from digits (its name says its draw); its training labels,
    test images and meta.json."""
    member = PoolMember("digits", 10, "simcnn", "r", alpha, min_per_class, seed)
    name = member.task(split_seed)
    derive_task(Task.from_config(name, member.task_spec(split_seed)), data_root)
    tensors = load_tensors(data_root / name / "images.safetensors")
    return name, tensors, json.loads((data_root / name / "meta.json").read_text())


def test_dirichlet_draw_is_seeded_and_skewed_as_alpha_says(data_root, digits):
    name, skewed, meta = _draw(data_root, 0.1, seed=3)
    assert name == "digits_dir0p1_min1_draw3_split0"
    again = Task.from_config("again", PoolMember("digits", 10, "simcnn", "r", 0.1, 1, 3)
                             .task_spec(0))
    derive_task(again, data_root)
    assert torch.equal(load_tensors(data_root / "again/images.safetensors")["train_images"],
                       skewed["train_images"])  # same seed and split: the same images
    drawn = meta["source"]["dirichlet"]
    available = torch.bincount(digits.train.labels, minlength=10).tolist()
    counts = torch.bincount(skewed["train_labels"], minlength=10).tolist()
    assert drawn["available_per_class"] == available and drawn["kept_per_class"] == counts
    assert sum(drawn["proportions"]) == pytest.approx(1.0) and drawn["alpha"] == 0.1
    # Small alpha: a few classes dominate, the others keep their minimum of one image.
    assert max(counts) == available[counts.index(max(counts))] and min(counts) == 1
    assert sum(c < 0.1 * n for c, n in zip(counts, available, strict=True)) >= 5
    _, even, _ = _draw(data_root, 1000.0, seed=3)
    even_counts = torch.bincount(even["train_labels"], minlength=10)
    assert (even_counts >= 0.85 * torch.tensor(available)).all()  # near uniform
    _, other, _ = _draw(data_root, 0.1, seed=4)
    assert torch.bincount(other["train_labels"], minlength=10).tolist() != counts
    # Training images come from the training split of the seed, never its validation split;
    # the test images are the dataset's.
    train_rows = {bytes(x.numpy()) for x in digits.train.images}
    assert all(bytes(x.numpy()) in train_rows for x in skewed["train_images"])
    assert torch.equal(skewed["test_images"], digits.test.images)
    assert meta["class_names"] == digits.class_names
    _, floored, _ = _draw(data_root, 0.1, seed=3, min_per_class=20)
    assert torch.bincount(floored["train_labels"], minlength=10).min() == 20


@pytest.mark.parametrize("entry, message", [
    ({"alpha": 0, "split_seed": 0}, r"tasks\.t\.dirichlet\.alpha: 0 is out of range \(0, inf\]"),
    ({"alpha": "x", "split_seed": 0}, r"tasks\.t\.dirichlet\.alpha: expected float"),
    ({"alpha": float("inf"), "split_seed": 0}, r"dirichlet\.alpha: expected a finite number"),
    ({"alpha": 1.0}, r"tasks\.t\.dirichlet: missing keys \['split_seed'\]"),
    ({"alpha": 1.0, "split_seed": 0, "min_per_class": 0},
     r"dirichlet\.min_per_class: 0 is out of range"),
    ({"alpha": 1.0, "split_seed": 0, "beta": 1}, r"tasks\.t\.dirichlet: unknown keys \['beta'\]"),
])
def test_bad_dirichlet_draws_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        Task.from_config("t", {"parts": [{"dataset": "digits", "classes": [0, 1]}],
                               "dirichlet": entry})


def test_dirichlet_draws_of_one_dataset_only_and_no_more_than_it_has(data_root):
    draw = {"alpha": 1.0, "split_seed": 0}
    with pytest.raises(ConfigError, match=r"tasks\.t\.dirichlet: draws from the training split "
                                          "of one dataset; the task has 2 parts"):
        Task.from_config("t", {"parts": [{"dataset": "digits", "classes": [0]},
                                         {"dataset": "shapes", "classes": [1]}],
                               "dirichlet": draw})
    with pytest.raises(ConfigError, match="samples_per_class.train and dirichlet both"):
        Task.from_config("t", {"parts": [{"dataset": "digits", "classes": [0]}],
                               "samples_per_class": {"train": 5}, "dirichlet": draw})
    with pytest.raises(ConfigError, match="samples_per_class.train and dirichlet both"):
        Task.from_config("t", {"parts": [{"dataset": "digits", "classes": [0],
                                          "samples_per_class": {"train": 5}}],
                               "dirichlet": draw})
    greedy = Task.from_config("greedy", {"parts": [{"dataset": "digits", "classes": [0, 1]}],
                                         "dirichlet": {**draw, "min_per_class": 1000}})
    with pytest.raises(ConfigError, match=r"tasks\.greedy\.dirichlet\.min_per_class: 1000 "
                                          r"images per class asked for, but class '0' has only"):
        derive_task(greedy, data_root)
    assert not (data_root / "greedy").exists()


def _pool_study(dirichlet_pool, **setting):
    study = _study(settings={"p": {"datasets": ["digits", "shapes"], "model": "simcnn",
                                   "pairs": [[0, 1]], "dirichlet_pool": dirichlet_pool,
                                   **setting}})
    study["base_models"] = [{"dataset": d, "models": ["simcnn"], "recipe": "r"}
                            for d in ("digits", "shapes")]
    return study


def test_plan_trains_the_dirichlet_pool_for_its_approaches():
    decomposed = [(a, d, "simcnn") for a in ("gradsplitter", "pan_rajan")
                  for d in ("digits", "shapes")]
    pool = {"members": 3, "alpha": {"digits": 0.5, "shapes": 1}, "seed": 7,
            "approaches": ["gradsplitter"]}
    (plan,) = plan_new_tasks(_pool_study(pool), decomposed).values()
    # The pool's approach composes from its members only, the other from the base models.
    assert plan.candidates == {"gradsplitter": (),
                               "pan_rajan": (("digits", "simcnn"), ("shapes", "simcnn"))}
    members = plan.members["gradsplitter"]
    assert [(m.dataset, m.alpha, m.draw, m.recipe) for m in members] == [
        ("digits", 0.5, 7, "r"), ("digits", 0.5, 8, "r"), ("digits", 0.5, 9, "r"),
        ("shapes", 1.0, 7, "r"), ("shapes", 1.0, 8, "r"), ("shapes", 1.0, 9, "r")]
    assert plan.trained_models("gradsplitter", 2)[0] == ("digits_dir0p5_min1_draw7_split2",
                                                         "simcnn")
    assert plan.trained_models("pan_rajan", 2) == [("digits", "simcnn"), ("shapes", "simcnn")]
    tasks = pool_tasks({"p": plan}, [0, 1])
    assert len(tasks) == 12 and tasks["shapes_dir1p0_min1_draw9_split1"] == {
        "parts": [{"dataset": "shapes", "classes": list(range(10))}], "seed": 9,
        "dirichlet": {"alpha": 1.0, "min_per_class": 1, "split_seed": 1}}
    assert pool_recipes({"p": plan}, [0])[("digits_dir0p5_min1_draw8_split0", "simcnn")] == "r"
    # Without approaches: every approach of the setting; an approach needs no base modules.
    (every,) = plan_new_tasks(_pool_study({"members": 1}), decomposed).values()
    assert set(every.members) == {"gradsplitter", "pan_rajan"}
    (alone,) = plan_new_tasks(_pool_study({"members": 1, "approaches": ["mwt"]}), []).values()
    assert alone.candidates == {"mwt": ()} and len(alone.members["mwt"]) == 2


@pytest.mark.parametrize("pool, message", [
    ({"members": 0}, r"settings\.p\.dirichlet_pool\.members: 0 is out of range"),
    ({"alpha": {"digits": 0.5}}, r"dirichlet_pool\.alpha: expected a value for each of the "
                                 r"setting's datasets \['digits', 'shapes'\]; missing "
                                 r"\['shapes'\]"),
    ({"alpha": -1}, r"dirichlet_pool\.alpha: expected a finite number > 0; got -1"),
    ({"min_per_class": {"digits": 1, "shapes": 0}},
     r"dirichlet_pool\.min_per_class\.shapes: expected an integer >= 1; got 0"),
    ({"approaches": ["gradsplit"]}, r"dirichlet_pool\.approaches: 'gradsplit' is not an approach"),
    ({"recipe": "slow"}, r"dirichlet_pool\.recipe: 'slow' is not defined under recipes"),
    ({"size": 3}, r"settings\.p\.dirichlet_pool: unknown keys \['size'\]"),
])
def test_bad_dirichlet_pools_name_the_key(pool, message):
    with pytest.raises(ConfigError, match=message):
        plan_new_tasks(_pool_study(pool), [("gradsplitter", "digits", "simcnn"),
                                           ("gradsplitter", "shapes", "simcnn")])


def test_a_pool_member_without_recipe_needs_a_base_model_to_take_it_from():
    study = _pool_study({"members": 2}, pool=["vgg16"])
    with pytest.raises(ConfigError, match=r"dirichlet_pool\.recipe: not given, and vgg16 on digits "
                                          "is not a base model"):
        plan_new_tasks(study, [("gradsplitter", "digits", "vgg16"),
                               ("gradsplitter", "shapes", "vgg16")])
    study["reuse"]["new_tasks"]["settings"]["p"]["dirichlet_pool"]["recipe"] = "r"
    assert plan_new_tasks(study, [("gradsplitter", "digits", "vgg16"),
                                  ("gradsplitter", "shapes", "vgg16")])


def test_module_choice_picks_across_pool_members(data_root):
    """Three members of digits: member 2 (draw seed 1) has the best module for class 3, member 1
    for class 8; their models trained on their tasks, their modules stand for digits'."""
    name, _, _ = _draw(data_root, 0.5, seed=1)
    meta = {"dataset": name, "seed": 0, "class_names": [str(c) for c in range(10)]}
    draw = pool_draw(data_root, meta, "model.safetensors")
    assert draw["dataset"] == "digits" and draw["seed"] == 1 and draw["alpha"] == 0.5
    members = [_candidate({3: f1_3, 8: f1_8}, name, f"member{k}")
               for k, (f1_3, f1_8) in enumerate([(70.0, 95.0), (90.0, 60.0), (80.0, 95.0)], 1)]
    members = [dataclasses.replace(c, draw=draw) for c in members]
    assert all(c.dataset == "digits" and c.describe()["trained_on"] == name for c in members)
    assert choose_module(members, "digits", 3).source == "member2"
    assert choose_module(members, "digits", 8).source == "member1"  # a tie: the first member
    with pytest.raises(ArtifactError, match="no candidate module set of shapes"):
        choose_module(members, "shapes", 3)
    # A model of another seed than its draw's split would be chosen on images it trained on.
    with pytest.raises(ArtifactError, match="drawn from the training split of seed 0"):
        pool_draw(data_root, {**meta, "seed": 1}, "model.safetensors")
    assert pool_draw(data_root, {**meta, "dataset": "digits"}, "model.safetensors") is None


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


# --------------------------------------------------------- continuous learning


HEADS = {"own_logit": (OwnLogitHead, "argmax", False),
         "logit_mlp": (LogitMLPHead, "argmax", False),
         "concern_votes": (ConcernVotesHead, "voting", True)}


def _learning_parts(digits, kind: str) -> tuple[Candidate, Candidate]:
    """The two parts of :func:`_two_model_parts` with modules of one of the three ways a
    module's score is read; Pan & Rajan's (V_c, V_uc) with position masks."""
    part_a, part_b = _two_model_parts(digits)
    head, rule, positions = HEADS[kind]
    parts = []
    for seed, part in enumerate((part_a, part_b), start=1):
        normalization = part.meta["normalization"]
        modules = hand_made_modules(trace_structure(part.model), head(list(range(10)), 10), seed,
                                    combination_rule=rule, normalization=normalization,
                                    dataset=part.dataset, positions=positions)
        parts.append(Candidate(part.model, part.meta, modules, part.source, part.f1))
    return parts[0], parts[1]


@pytest.fixture(scope="module")
def pair_train(digits):
    """A pair task's training images: digit 3 (label 0) and digit 8 (label 1)."""
    return combine([digits.train.subset([3]), digits.train.subset([8])])


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_continuous_learning_changes_only_the_kept_weights(digits, pair_train, kind):
    part_a, part_b = _learning_parts(digits, kind)
    originals = [{k: v.clone() for k, v in part.model.state_dict().items()}
                 for part in (part_a, part_b)]
    heads = [{k: v.clone() for k, v in part.modules.head.state_dict().items()}
             for part in (part_a, part_b)]
    tuned, history = continue_learning(part_a, 3, part_b, 8, pair_train,
                                       {"epochs": 2, "lr": 0.01, "batch_size": 64})
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train_loss"] >= 0 and 0 <= h["train_accuracy"] <= 100 for h in history)
    for part, cls, original, head, result in zip((part_a, part_b), (3, 8), originals, heads,
                                                tuned, strict=True):
        # The candidates are left as they were; the retrained module has its own copy.
        assert all(torch.equal(t, part.model.state_dict()[k]) for k, t in original.items())
        assert all(torch.equal(t, part.modules.head.state_dict()[k]) for k, t in head.items())
        assert result.model is not part.model and result.class_index == cls
        masks = part.modules.module_masks(part.modules.classes.index(cls))
        assert all(torch.equal(result.modules.masks[name][0], mask)
                   for name, mask in masks.items())
        state = result.model.state_dict()
        # BatchNorm's running statistics stay (eval mode).
        assert all(torch.equal(state[k], t) for k, t in original.items()
                   if k.endswith(("running_mean", "running_var")))
        changed = False
        for group in part.modules.structure.groups:
            kept = channel_view(masks[group.name][None])[0]
            for name in group.convs:
                weight, retrained = original[f"{name}.weight"], state[f"{name}.weight"]
                assert torch.equal(weight[~kept], retrained[~kept]), (kind, name)
                changed |= not torch.equal(weight[kept], retrained[kept])
            for name, offset in zip(group.norms, group.norm_offsets, strict=True):
                dropped = (~kept).nonzero().flatten() + offset
                for tensor in ("weight", "bias"):
                    if f"{name}.{tensor}" in original:
                        assert torch.equal(original[f"{name}.{tensor}"][dropped],
                                           state[f"{name}.{tensor}"][dropped]), (kind, name)
        assert changed, kind  # the kept weights did learn
        if kind == "logit_mlp":  # GradSplitter's head is the module's own: it learns too
            retrained_head = result.modules.head.state_dict()
            assert not torch.equal(retrained_head["w2"][0],
                                   head["w2"][part.modules.classes.index(cls)])


def test_continuous_learning_trains_on_the_training_split_and_only_scores_test(
        digits, pair_train, pair_test):
    part_a, part_b = _learning_parts(digits, "concern_votes")
    pair = Pair("digits", 3, "shapes", 8)
    settings = {"epochs": 1, "batch_size": 32}
    record = pair_record(pair, part_a, part_b, pair_test, pair_train, settings, seed=5)
    # Test images replaced by noise: the same training, hence the same retrained modules.
    noise = ImageSet(torch.randint(0, 256, pair_test.images.shape, dtype=torch.uint8),
                     pair_test.labels, pair_test.class_names, pair_test.mean, pair_test.std)
    on_noise = pair_record(pair, part_a, part_b, noise, pair_train, settings, seed=5)
    learned = record["continuous_learning"]
    assert on_noise["continuous_learning"]["history"] == learned["history"]
    assert learned["train_images"] == len(pair_train)
    # The retrained composition, scored by hand: Pan & Rajan's vote of the retrained modules.
    tuned, history = continue_learning(part_a, 3, part_b, 8, pair_train, settings, seed=5)
    assert history == learned["history"]
    x, labels = pair_test.unit_batch()
    scores = torch.cat([part.modules.scores(part.model, _normalise(
        x, part.modules.base["normalization"])) for part in tuned], dim=1)
    expected = _votes(scores, torch.tensor([0, 1]))
    assert learned["composed_accuracy"] == pytest.approx(
        100 * (expected == labels).float().mean().item())
    # The plain composition is scored as before, beside it.
    assert record["composed_accuracy"] == pair_record(pair, part_a, part_b,
                                                      pair_test)["composed_accuracy"]
    with pytest.raises(ArtifactError, match="continuous learning needs the pair task's "
                                            "training images"):
        pair_record(pair, part_a, part_b, pair_test, None, settings)
    with pytest.raises(ArtifactError, match="not those of a pair task"):
        continue_learning(part_a, 3, part_b, 8, digits.train.subset([3]), settings)


def test_continuous_learning_loss_reads_scores_as_the_rule_does():
    labels = torch.tensor([0, 1])
    votes = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]])
    # Module 0 should vote (V_c, node 0) on label 0 and abstain (V_uc, node 1) on label 1;
    # where both or neither vote, the right module's V_c should be the highest.
    assert continuous_learning_loss(votes, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(votes.flatten(0, 1), torch.tensor([0, 1, 1, 0])).item()
        + torch.nn.functional.cross_entropy(votes[..., 0], labels).item())
    # argmax: one softmax across the two modules' scores.
    logits = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    assert continuous_learning_loss(logits, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item())


def test_bad_continuous_learning_option_is_refused_before_loading(tmp_path, capsys):
    status = main(["reuse", "new-task", "--approach", "pan_rajan", "--setting", "s",
                   "--model", "simcnn", "--pairs", '[["digits", 3, "shapes", 1]]',
                   "--candidate", str(tmp_path / "m.safetensors"), str(tmp_path / "w"),
                   "--continuous-learning", '{"lr": 0}', "--out", str(tmp_path / "o.json")])
    assert status == 2
    assert "--continuous-learning.lr: 0 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


# ------------------------------------------------------------------ table and figure


def _composed_json(path, setting, approach, kind, accuracies, continuous=None,
                   candidates=None):
    """A composed record; ``candidates``: dicts of the candidates (default one base model of
    each of d and e), the chosen modules those of the first candidate of each dataset."""
    candidates = candidates or [{"dataset": d, "trained_on": d, "dirichlet": None}
                                for d in ("d", "e")]
    chosen = {c["dataset"]: c for c in reversed(candidates)}
    pairs = [{"task": f"pair_{i}", "pair": f"d/{i} + e/{i}", "dataset_a": "d", "class_a": i,
              "class_name_a": str(i), "dataset_b": "e", "class_b": i, "class_name_b": str(i),
              "module_a": {"model": "simcnn", "training": "st", "selection_f1": 90.0,
                           **chosen["d"]},
              "module_b": {"model": "simcnn", "training": "st", "selection_f1": 80.0,
                           **chosen["e"]},
              "test_images": 20, "composed_accuracy": accuracy}
             for i, accuracy in enumerate(accuracies)]
    for record, accuracy in zip(pairs, continuous or [], strict=False):
        record["continuous_learning"] = {"composed_accuracy": accuracy, "history": []}
    write_json(path, {"setting": setting, "kind": kind, "approach": approach,
                      "model": "simcnn", "seed": 0, "pairs": pairs, "candidates": candidates})
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


def test_table_says_which_pool_member_each_module_came_from(tmp_path):
    draw = {"alpha": 0.5, "min_per_class": 1, "split_seed": 0}
    members = [{"dataset": d, "trained_on": f"{d}_dir0p5_min1_draw{k}_split0",
                "dirichlet": {**draw, "dataset": d, "seed": k}}
               for d, k in (("d", 1), ("d", 0), ("e", 0), ("e", 1), ("e", 2))]
    composed = [_composed_json(tmp_path / "pool.json", "p", "gradsplitter", "inter", [90, 70],
                               candidates=members),
                _composed_json(tmp_path / "base.json", "p", "random", "inter", [80, 60])]
    scratch = [_scratch_json(tmp_path, "pair_0", 85.0), _scratch_json(tmp_path, "pair_1", 75.0)]
    table = new_task_table(composed, scratch)
    pool = table[table.approach == "gradsplitter"]
    assert set(pool.pool) == {"dirichlet"} and set(table[table.approach == "random"].pool) == {
        "base_models"}
    assert set(pool.pool_size_a) == {2} and set(pool.pool_size_b) == {3}  # mean rows too
    rows = pool[pool.pair != "mean"]
    assert set(rows.trained_on_a) == {"d_dir0p5_min1_draw1_split0"}
    assert set(rows.trained_on_b) == {"e_dir0p5_min1_draw0_split0"}
    new_task_figure(composed, scratch, tmp_path / "pool.png")
    assert (tmp_path / "pool.png").stat().st_size


def test_table_and_figure_give_both_variants_with_their_published_means(tmp_path):
    composed = [_composed_json(tmp_path / "a.json", "c10_x_c100", "pan_rajan", "inter",
                               [90, 70], continuous=[95, 85])]
    scratch = [_scratch_json(tmp_path, "pair_0", 85.0), _scratch_json(tmp_path, "pair_1", 75.0)]
    table = new_task_table(composed, scratch)
    assert list(zip(table.variant, table.pair, strict=True)) == [
        ("composed", "d/0 + e/0"), ("composed", "d/1 + e/1"), ("composed", "mean"),
        ("continuous_learning", "d/0 + e/0"), ("continuous_learning", "d/1 + e/1"),
        ("continuous_learning", "mean")]
    means = table[table.pair == "mean"].set_index("variant")
    assert means.loc["composed", "accuracy_difference_pp"] == 0.0
    assert means.loc["continuous_learning", "accuracy_difference_pp"] == 10.0
    # Pan & Rajan's inter-dataset means: -12.06 without, -7.63 with continuous learning.
    assert means.loc["composed", "published_accuracy_difference_pp"] == -12.06
    assert means.loc["continuous_learning", "published_accuracy_difference_pp"] == -7.63
    assert means.loc["continuous_learning", "scratch_accuracy"] == 80.0
    write_new_task_report(composed, scratch, tmp_path / "e4.csv", tmp_path / "e4.json")
    metrics = json.loads((tmp_path / "e4.json").read_text())
    assert metrics["c10_x_c100/pan_rajan/seed0"]["mean_accuracy_difference_pp"] == 0.0
    assert metrics["c10_x_c100/pan_rajan/seed0/continuous_learning"][
        "mean_accuracy_difference_pp"] == 10.0
    summary = pd.read_csv(tmp_path / "e4_summary.csv")
    assert set(summary.variant) == {"composed", "continuous_learning"}
    new_task_figure(composed, scratch, tmp_path / "e4.png")
    assert (tmp_path / "e4.png").stat().st_size and (tmp_path / "e4.pdf").stat().st_size


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
        "cross": {"datasets": ["digits", "shapes"], "model": "simcnn", "pairs": [[3, 1]],
                  "continuous_learning": {"epochs": 1}}}}},
}


@pytest.mark.slow
def test_workflow_composes_new_tasks_and_reports_them(tiny_study, tmp_path):
    project = copy_project(tiny_study, tmp_path / "project")  # digits and its model: done
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
    assert composed["continuous_learning"] == {"epochs": 1, "lr": 0.00001, "batch_size": 64}
    learned = record["continuous_learning"]
    assert len(learned["history"]) == 1 and 0 <= learned["composed_accuracy"] <= 100
    scratch = json.loads((results / "new_tasks/scratch/pair_digits_3_shapes_1/simcnn/seed0/"
                                    "model.json").read_text())
    assert scratch["num_classes"] == 2 and scratch["recipe"]["selection"] == "best_val"
    # Both are tested on the pair task's test images: every digit 3 and every square.
    pair_meta = json.loads((project / "data/pair_digits_3_shapes_1/meta.json").read_text())
    assert record["test_images"] == pair_meta["counts"]["test"]

    table = pd.read_csv(results / "tables/e4_new_tasks.csv")
    assert set(table.setting) == {"cross"}
    # Both variants: the modules as composed, and after continuous learning.
    assert list(zip(table.variant, table.pair, strict=True)) == [
        ("composed", "digits/3 + shapes/1"), ("composed", "mean"),
        ("continuous_learning", "digits/3 + shapes/1"), ("continuous_learning", "mean")]
    row = table[(table.variant == "composed") & (table.pair != "mean")].iloc[0]
    assert row.accuracy_difference_pp == pytest.approx(row.composed_accuracy
                                                       - row.scratch_accuracy, abs=1e-3)
    assert row.scratch_accuracy == pytest.approx(scratch["metrics"]["test_accuracy"], abs=1e-3)
    learned_row = table[(table.variant == "continuous_learning") & (table.pair != "mean")]
    assert learned_row.composed_accuracy.item() == pytest.approx(
        learned["composed_accuracy"], abs=1e-3)
    mean = table[(table.variant == "composed") & (table.pair == "mean")].iloc[0]
    assert mean.published_accuracy_difference_pp == pytest.approx(-2.46)
    assert "TOSEM2023" in mean.published_source
    assert (results / "tables/e4_new_tasks.md").read_text().startswith("# E4 new tasks")
    metrics = json.loads((results / "metrics/e4_new_tasks.json").read_text())
    assert set(metrics) == {"cross/gradsplitter/seed0",
                            "cross/gradsplitter/seed0/continuous_learning"}
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


TINY_POOL = {
    **TINY,
    "modularize": [{"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"]}],
    # GradSplitter's pool of 2 members on digits, trained with the base model's recipe.
    "reuse": {"new_tasks": {"recipe": "tiny", "settings": {
        "pool": {"datasets": ["digits", "digits"], "model": "simcnn", "pairs": [[3, 8]],
                 "dirichlet_pool": {"members": 2, "alpha": 0.5, "seed": 1,
                                    "approaches": ["gradsplitter"]}}}}},
}


@pytest.mark.slow
def test_workflow_trains_decomposes_and_chooses_among_a_dirichlet_pool(tiny_study, tmp_path):
    project = copy_project(tiny_study, tmp_path / "project")  # digits and its model: done
    configfile = write_config(project, TINY_POOL)
    members = ["digits_dir0p5_min1_draw1_split0", "digits_dir0p5_min1_draw2_split0"]
    # The composition only: the table's scratch baseline adds nothing the pool changes.
    composed_path = "results/tiny/new_tasks/pool/gradsplitter/seed0/composed.json"
    run = snakemake(project, composed_path, "--cores", "2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    for member in members:  # each member derived, trained and decomposed like a base model
        for path in (f"data/{member}/images.safetensors",
                     f"results/tiny/models/{member}/simcnn/st/seed0/model.safetensors",
                     f"results/tiny/modules/{member}/simcnn/gradsplitter/seed0/"
                     "modules.safetensors"):
            assert path in run.stdout
    jobs = run.stdout[run.stdout.index("Job stats:"):]
    # The pool replaces the base model: only the members are trained and decomposed.
    assert re.search(r"train_base_model\s+2\b", jobs) and re.search(r"modularize\s+2\b", jobs)
    composed = json.loads((project / composed_path).read_text())
    assert [c["trained_on"] for c in composed["candidates"]] == members
    assert {c["dataset"] for c in composed["candidates"]} == {"digits"}
    (record,) = composed["pairs"]
    for side, cls in (("a", 3), ("b", 8)):
        chosen = record[f"module_{side}"]
        best = max(composed["candidates"], key=lambda c: c["selection_f1"][str(cls)])
        assert chosen["trained_on"] == best["trained_on"]
        assert chosen["selection_f1"] == best["selection_f1"][str(cls)]
    member_meta = json.loads((project / "data" / members[0] / "meta.json").read_text())
    assert composed["candidates"][0]["dirichlet"]["kept_per_class"] == member_meta["source"][
        "dirichlet"]["kept_per_class"]
    scratch = _scratch_json(tmp_path, record["task"], 90.0)
    table = new_task_table([project / composed_path], [scratch])
    assert set(table.pool) == {"dirichlet"} and set(table.pool_size_a) == {2}
    row = table[table.pair != "mean"].iloc[0]
    assert (row.trained_on_a, row.trained_on_b) == (record["module_a"]["trained_on"],
                                                    record["module_b"]["trained_on"])

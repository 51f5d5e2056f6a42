"""Derived tasks: class subsets and unions of prepared datasets, written as one more dataset."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from workflow_helpers import TINY, make_project, snakemake, write_config

from dnnmod.artifacts import load_tensors
from dnnmod.cli import main
from dnnmod.data import Task, derive_task, load_dataset, load_prepared, prepare
from dnnmod.data.registry import channel_stats
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.study import check_study_config

SHAPES_OPTIONS = {"train_count": 200, "test_count": 100, "seed": 0}
WEAK = {"parts": [{"dataset": "shapes", "classes": [0, "star"]},
                  {"dataset": "digits", "classes": [7]}],
        "samples_per_class": {"train": 10, "test": 5}, "seed": 0}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """digits and a small shapes, prepared."""
    root = tmp_path_factory.mktemp("tasks")
    prepare("digits", root)
    prepare("shapes", root, options=SHAPES_OPTIONS)
    return root


def derive(root, name, entry):
    derive_task(Task.from_config(name, entry), root)
    tensors = load_tensors(root / name / "images.safetensors")
    return tensors, json.loads((root / name / "meta.json").read_text())


def test_class_subset_of_one_dataset_keeps_its_images_in_order(root):
    tensors, meta = derive(root, "digits_3v8",
                           {"parts": [{"dataset": "digits", "classes": [8, 3]}]})
    train, test, source_meta = load_prepared(root, "digits")
    for split, source in (("train", train), ("test", test)):
        wanted = torch.isin(source.labels, torch.tensor([3, 8]))
        assert torch.equal(tensors[f"{split}_images"], source.images[wanted])
        # Labels follow the order the classes are listed in: 8 → 0, 3 → 1.
        assert torch.equal(tensors[f"{split}_labels"], (source.labels[wanted] == 3).long())
        assert meta["counts"][split] == int(wanted.sum())
    assert meta["class_names"] == ["8", "3"] and meta["num_classes"] == 2
    assert meta["image_size"] == source_meta["image_size"] == 32
    assert meta["source"]["kind"] == "task"
    assert meta["source"]["parts"] == [{"dataset": "digits", "classes": [8, 3],
                                        "class_names": ["8", "3"]}]
    assert set(meta["source"]["datasets"]) == {"digits"}
    mean, std = channel_stats(tensors["train_images"].numpy())
    assert meta["channels_mean"] == mean and meta["channels_std"] == std
    assert meta["channels_mean"] != source_meta["channels_mean"]


def test_union_of_datasets_draws_stratified_seeded_samples(root):
    tensors, meta = derive(root, "weak", WEAK)
    assert meta["class_names"] == ["shapes/circle", "shapes/star", "digits/7"]
    assert meta["counts"] == {"train": 30, "test": 15}
    assert meta["source"]["samples_per_class"] == {"train": 10, "test": 5}
    assert [p["classes"] for p in meta["source"]["parts"]] == [[0, 5], [7]]
    sources = {name: load_prepared(root, name) for name in ("shapes", "digits")}
    for split, count in (("train", 10), ("test", 5)):
        labels = tensors[f"{split}_labels"]
        assert torch.bincount(labels).tolist() == [count] * 3
        # Every image is an image of its source class.
        for label, (dataset, source_class) in enumerate([("shapes", 0), ("shapes", 5),
                                                         ("digits", 7)]):
            source = sources[dataset][0 if split == "train" else 1]
            pool = {image.numpy().tobytes()
                    for image in source.images[source.labels == source_class]}
            assert all(image.numpy().tobytes() in pool
                       for image in tensors[f"{split}_images"][labels == label])
    mean, std = channel_stats(tensors["train_images"].numpy())
    assert meta["channels_mean"] == mean and meta["channels_std"] == std

    again, _ = derive(root, "weak", WEAK)
    assert all(torch.equal(again[key], tensors[key]) for key in tensors)
    reseeded, _ = derive(root, "weak_seed1", {**WEAK, "seed": 1})
    assert not torch.equal(reseeded["train_images"], tensors["train_images"])


def test_a_part_draws_its_own_count_over_the_tasks(root):
    # E3's weak tasks: the target class (last part) gets fewer training images.
    scarce = copy.deepcopy(WEAK)
    scarce["parts"][1]["samples_per_class"] = {"train": 3}
    tensors, meta = derive(root, "scarce", scarce)
    assert torch.bincount(tensors["train_labels"]).tolist() == [10, 10, 3]
    assert torch.bincount(tensors["test_labels"]).tolist() == [5, 5, 5]
    assert meta["source"]["parts"][1]["samples_per_class"] == {"train": 3}
    assert "samples_per_class" not in meta["source"]["parts"][0]
    # The other parts draw exactly what they drew without the override.
    plain, _ = derive(root, "plain", WEAK)
    for split in ("train", "test"):
        for label in (0, 1):
            assert torch.equal(tensors[f"{split}_images"][tensors[f"{split}_labels"] == label],
                               plain[f"{split}_images"][plain[f"{split}_labels"] == label])
    # A part may draw where the task keeps all images.
    alone, _ = derive(root, "alone", {"parts": [
        {"dataset": "digits", "classes": [1]},
        {"dataset": "digits", "classes": [2], "samples_per_class": {"train": 4}}]})
    train, _, _ = load_prepared(root, "digits")
    assert torch.bincount(alone["train_labels"]).tolist() == [int((train.labels == 1).sum()), 4]


def test_a_task_loads_splits_and_normalises_as_a_dataset(root):
    derive(root, "weak_split", WEAK)
    data = load_dataset(root, "weak_split", seed=0)
    assert data.num_classes == 3 and data.class_names[2] == "digits/7"
    # The validation split is stratified: round(0.2 x 10) images of every class.
    assert torch.bincount(data.val.labels).tolist() == [2, 2, 2]
    assert len(data.train) == 24 and len(data.test) == 15
    x, _ = data.train.float_batch()
    unit, _ = data.train.unit_batch()
    assert unit.min() >= 0 and unit.max() <= 1
    assert torch.allclose(x, (unit - data.train.mean.view(1, -1, 1, 1))
                          / data.train.std.view(1, -1, 1, 1))
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.1)


@pytest.mark.parametrize("name, entry, message", [
    ("big", {**WEAK, "samples_per_class": {"train": 1000}},
     r"tasks\.big\.samples_per_class\.train: 1000 images per class asked for, but class "
     r"'shapes/circle' has only \d+"),
    ("part_big", {"parts": [{"dataset": "shapes", "classes": [0]},
                            {"dataset": "digits", "classes": [7],
                             "samples_per_class": {"train": 1000}}]},
     r"tasks\.part_big\.parts\[1\]\.samples_per_class\.train: 1000 images per class asked "
     r"for, but class 'digits/7' has only \d+"),
    ("named", {"parts": [{"dataset": "shapes", "classes": ["circle"]},
                         {"dataset": "digits", "classes": ["seven"]}]},
     r"tasks\.named\.parts\[1\]\.classes: digits has no class 'seven'; its classes: 0, 1"),
    ("twice", {"parts": [{"dataset": "shapes", "classes": ["circle"]},
                         {"dataset": "shapes", "classes": [0]}]},
     r"tasks\.twice\.parts\[1\]\.classes: class 0 of shapes is already in the task "
     r"\(tasks\.twice\.parts\[0\]\.classes\)"),
])
def test_derive_errors_name_the_key(root, name, entry, message):
    with pytest.raises(ConfigError, match=message):
        derive_task(Task.from_config(name, entry), root)
    assert not (root / name).exists()


def test_a_source_that_is_not_prepared_names_the_command(tmp_path):
    task = Task.from_config("t", {"parts": [{"dataset": "digits", "classes": [1]}]})
    with pytest.raises(ArtifactError, match="dnnmod data prepare --dataset digits"):
        derive_task(task, tmp_path)


@pytest.mark.parametrize("name, entry, message", [
    ("digits", {"parts": [{"dataset": "shapes", "classes": [1]}]},
     r"tasks\.digits: 'digits' is a registered dataset; a task needs a name of its own"),
    ("t", {"parts": [{"dataset": "shapes", "classes": [1]}], "samples": 3},
     r"tasks\.t: unknown keys \['samples'\]"),
    ("t", {"parts": []}, r"tasks\.t\.parts: expected a non-empty list"),
    ("t", {"parts": [{"dataset": "shapes", "classes": [True]}]},
     r"tasks\.t\.parts\[0\]\.classes: expected a non-empty list of class indices or class names"),
    ("t", {"parts": [{"dataset": "shapes"}]}, r"tasks\.t\.parts\[0\]: missing keys \['classes'\]"),
    ("t", {"parts": [{"dataset": "shapes", "classes": [1]}], "samples_per_class": {"val": 3}},
     r"tasks\.t\.samples_per_class: unknown keys \['val'\]"),
    ("t", {"parts": [{"dataset": "shapes", "classes": [1]}], "samples_per_class": {"test": 0}},
     r"tasks\.t\.samples_per_class\.test: expected an integer >= 1"),
    ("t", {"parts": [{"dataset": "shapes", "classes": [1], "samples_per_class": {"train": 0}}]},
     r"tasks\.t\.parts\[0\]\.samples_per_class\.train: expected an integer >= 1"),
    ("t", {"parts": [{"dataset": "shapes", "classes": [1], "samples_per_class": 3}]},
     r"tasks\.t\.parts\[0\]\.samples_per_class: expected a mapping split → count"),
])
def test_malformed_task_entries(name, entry, message):
    with pytest.raises(ConfigError, match=message):
        Task.from_config(name, entry)


def study_config(**changes):
    config = copy.deepcopy({**TINY, "datasets": {"digits": {}, "shapes": {}},
                            "tasks": {"weak": WEAK}})
    config["base_models"] = [{"dataset": "weak", "models": ["simcnn"], "recipe": "tiny"}]
    config["modularize"] = [{"approach": "gradsplitter", "dataset": "weak", "models": ["simcnn"]}]
    config.update(changes)
    return config


def test_a_base_model_may_train_on_a_task():
    check_study_config(study_config())


@pytest.mark.parametrize("changes, message", [
    ({"tasks": {"weak": {"parts": [{"dataset": "digits", "classes": [3, 12]}]}}},
     r"tasks\.weak\.parts\[0\]\.classes: class 12 is out of range: digits has 10 classes"),
    ({"tasks": {"weak": {"parts": [{"dataset": "shapes", "classes": [1]},
                                   {"dataset": "svhn", "classes": [7]}]}}},
     r"tasks\.weak\.parts\[1\]\.dataset: 'svhn' is not a configured dataset \(configured: "
     r"\['digits', 'shapes'\]\)"),
    ({"tasks": {"shapes": {"parts": [{"dataset": "digits", "classes": [1]}]}}},
     r"tasks\.shapes: 'shapes' is a registered dataset"),
    ({"tasks": {}}, r"base_models\[0\]\.dataset: 'weak' has no entry under datasets "
                    r"\(configured: \['digits', 'shapes'\]\) or tasks \(configured: \[\]\)"),
])
def test_study_config_checks_tasks(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_study_config(study_config(**changes))


def test_command_line_derives_and_reports_errors(root, capsys):
    spec = json.dumps({"parts": [{"dataset": "shapes", "classes": ["ring", "cross"]}]})
    assert main(["data", "derive", "--task", "rings", "--spec", spec, "--root", str(root)]) == 0
    assert json.loads((root / "rings/meta.json").read_text())["class_names"] == ["ring", "cross"]
    bad = json.dumps({"parts": [{"dataset": "shapes", "classes": ["rings"]}]})
    assert main(["data", "derive", "--task", "bad", "--spec", bad, "--root", str(root)]) == 2
    assert "tasks.bad.parts[0].classes: shapes has no class 'rings'" in capsys.readouterr().err


def test_workflow_derives_a_task_for_the_base_model_trained_on_it(tmp_path):
    project = make_project(tmp_path / "project")
    config = study_config(datasets={"digits": {}, "shapes": {"options": SHAPES_OPTIONS}})
    run = snakemake(project, "-n", "--configfile", write_config(project, config))
    assert run.returncode == 0, run.stdout[-3000:]
    jobs: dict[str, list[dict[str, str]]] = {}
    for line in run.stdout.splitlines():  # "rule NAME:" then its "    key: value" lines
        if line.startswith("rule "):
            fields = {}
            jobs.setdefault(line[5:].rstrip(":"), []).append(fields)
        elif line.startswith("    ") and ": " in line and jobs:
            key, value = line.strip().split(": ", 1)
            fields[key] = value
    [derive] = jobs["derive_task"]
    assert derive["input"] == "data/shapes/images.safetensors, data/digits/images.safetensors"
    assert derive["output"] == "data/weak/images.safetensors, data/weak/meta.json"
    assert derive["log"] == "results/tiny/logs/data/weak/derive.log"
    assert sorted(job["wildcards"] for job in jobs["prepare_dataset"]) == [
        "dataset=digits", "dataset=shapes"]
    [split] = jobs["split_dataset"]
    assert split["input"] == "data/weak/images.safetensors"
    [train] = jobs["train_base_model"]
    assert train["output"].startswith("results/tiny/models/weak/simcnn/st/seed0/")

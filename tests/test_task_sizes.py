"""Task sizes and class names are checked against the datasets before any job: the registry's
class names and official images per class, a task's draw, a patching setting's weak tasks."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import yaml
from workflow_helpers import REPO, TINY, make_project, snakemake, write_config

from dnnmod.data import DATASETS, prepare
from dnnmod.data.synthetic import make_digits, make_shapes, shapes_per_class
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.reuse.patching import check_patching_config
from dnnmod.study import check_study_config, study_inventories

# The official releases' images in all (train, test).
OFFICIAL_TOTALS = {"cifar10": (50000, 10000), "cifar100": (50000, 10000),
                   "svhn": (73257, 26032), "tinyimagenet": (100000, 10000),
                   "fashion_mnist": (60000, 10000)}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_names_its_classes_and_counts_them_per_split(name):
    spec = DATASETS[name]
    inventory = spec.inventory()
    assert len(inventory.class_names) == len(set(inventory.class_names)) == spec.num_classes
    assert set(inventory.per_class) == {"train", "test"}
    for counts in inventory.per_class.values():
        assert len(counts) == spec.num_classes and all(count >= 1 for count in counts)
    if name in OFFICIAL_TOTALS:
        totals = tuple(sum(inventory.per_class[split]) for split in ("train", "test"))
        assert totals == OFFICIAL_TOTALS[name]


def test_the_embedded_and_generated_datasets_count_what_they_make():
    digits = make_digits()
    assert DATASETS["digits"].inventory().per_class == {
        "train": tuple(np.bincount(digits.train_labels).tolist()),
        "test": tuple(np.bincount(digits.test_labels).tolist())}
    assert tuple(digits.class_names) == DATASETS["digits"].class_names
    options = {"train_count": 23, "test_count": 7, "seed": 3}
    shapes = make_shapes(**options)
    assert shapes_per_class(**options) == {
        "train": tuple(np.bincount(shapes.train_labels, minlength=10).tolist()),
        "test": tuple(np.bincount(shapes.test_labels, minlength=10).tolist())}
    assert DATASETS["shapes"].inventory({"options": options}).per_class["train"] == \
        (3, 3, 3, 2, 2, 2, 2, 2, 2, 2)


def test_prepare_refuses_files_that_name_other_classes(tmp_path, monkeypatch):
    renamed = dataclasses.replace(DATASETS["shapes"],
                                  class_names=("disc", *DATASETS["shapes"].class_names[1:]))
    monkeypatch.setitem(DATASETS, "shapes", renamed)
    with pytest.raises(ArtifactError, match=r"shapes: the files name class 0 'circle', "
                                            r"where the registry .* names it 'disc'"):
        prepare("shapes", tmp_path, options={"train_count": 20, "test_count": 10})


def study(**changes):
    config = copy.deepcopy({**TINY, "datasets": {"digits": {}, "shapes": {}, "cifar100": {},
                                                 "svhn": {}}, "tasks": {}})
    config.update(changes)
    return config


def test_tasks_that_fit_their_datasets_pass_and_describe_themselves():
    config = study(tasks={
        "mixed": {"parts": [{"dataset": "cifar100", "classes": ["apple", 9]},
                            {"dataset": "svhn", "classes": [0],
                             "samples_per_class": {"test": 1744}}],
                  "samples_per_class": {"train": 500}},
        "imbalanced": {"parts": [{"dataset": "digits", "classes": [8]}],
                       "dirichlet": {"alpha": 1.0, "split_seed": 0, "min_per_class": 111}}})
    check_study_config(config)
    inventories = study_inventories(config)
    assert inventories["mixed"].class_names == ("cifar100/apple", "cifar100/bottle", "svhn/0")
    assert inventories["mixed"].per_class == {"train": (500, 500, 500), "test": (100, 100, 1744)}
    assert inventories["imbalanced"].per_class == {"train": (None,), "test": (35,)}


@pytest.mark.parametrize("tasks, message", [
    ({"t": {"parts": [{"dataset": "svhn", "classes": [1, 9]}],
            "samples_per_class": {"train": 100000}}},
     "tasks.t.samples_per_class.train: 100000 images per class asked for, but class '1' of svhn "
     "has only 13861 in its train split"),
    ({"t": {"parts": [{"dataset": "svhn", "classes": [1, 0]}],
            "samples_per_class": {"test": 1745}}},
     "tasks.t.samples_per_class.test: 1745 images per class asked for, but class '0' of svhn "
     "has only 1744 in its test split"),
    ({"t": {"parts": [{"dataset": "shapes", "classes": [0]},
                      {"dataset": "cifar100", "classes": ["rose"],
                       "samples_per_class": {"train": 501}}]}},
     "tasks.t.parts[1].samples_per_class.train: 501 images per class asked for, but class 'rose' "
     "of cifar100 has only 500 in its train split"),
    ({"t": {"parts": [{"dataset": "cifar100", "classes": ["apple", "appel"]}]}},
     "tasks.t.parts[0].classes: cifar100 has no class 'appel'; closest: apple"),
    ({"t": {"parts": [{"dataset": "digits", "classes": ["seven"]}]}},
     "tasks.t.parts[0].classes: digits has no class 'seven'; its classes: 0, 1, 2"),
    ({"t": {"parts": [{"dataset": "digits", "classes": [8]}],
            "dirichlet": {"alpha": 1.0, "split_seed": 0, "min_per_class": 112}}},
     "tasks.t.dirichlet.min_per_class: 112 images per class asked for, but class '8' of digits "
     "has only 111 in the training split"),
])
def test_a_task_that_asks_more_than_a_dataset_has_is_refused(tasks, message):
    with pytest.raises(ConfigError) as caught:
        check_study_config(study(tasks=tasks))
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_generator_options_and_overridden_files_set_what_is_known():
    # 30 shapes make 3 of each class; files of another release leave the counts to the job
    with pytest.raises(ConfigError, match=r"tasks\.t\.samples_per_class\.train: 4 images per "
                                          r"class asked for, but class 'circle' of shapes has "
                                          r"only 3 in its train split"):
        check_study_config(study(datasets={"shapes": {"options": {"train_count": 30}}},
                                 tasks={"t": {"parts": [{"dataset": "shapes", "classes": [0]}],
                                              "samples_per_class": {"train": 4}}}))
    check_study_config(study(
        datasets={"digits": {}, "svhn": {"files": {"train": {"md5": "0" * 32}}}},
        tasks={"t": {"parts": [{"dataset": "svhn", "classes": [0]}],
                     "samples_per_class": {"train": 100000}}}))


def demo():
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


@pytest.mark.parametrize("setting, message", [
    ({"samples_per_class": {"train": 100000, "test": 30}},
     "reuse.patching.settings.shapes_plus_digit.samples_per_class.train: 100000 images per class "
     "asked for, but class 'circle' of shapes has only 200 in its train split"),
    ({"target_samples_per_class": {"test": 100}},
     "reuse.patching.settings.shapes_plus_digit.target_samples_per_class.test: 100 images per "
     "class asked for, but class '3' of digits has only 37 in its test split"),
    ({"others": {"dataset": "digits", "classes": [5, "six"]}},
     "reuse.patching.settings.shapes_plus_digit.others.classes: digits has no class 'six'"),
    ({"others": {"dataset": "digits", "classes": [5, 3]}},
     "reuse.patching.settings.shapes_plus_digit.target_classes: class 3 of digits is already in "
     "the task (reuse.patching.settings.shapes_plus_digit.others.classes)"),
])
def test_a_patching_setting_is_checked_by_its_own_keys(setting, message):
    config = demo()
    config["reuse"]["patching"]["settings"]["shapes_plus_digit"].update(setting)
    check_study_config(config)
    with pytest.raises(ConfigError) as caught:
        check_patching_config(config)
    assert str(caught.value).startswith(message)


def test_the_dry_run_refuses_a_task_too_large_before_any_job(tmp_path):
    project = make_project(tmp_path / "project")
    configfile = write_config(project, {
        **TINY, "tasks": {"many": {"parts": [{"dataset": "digits", "classes": [0, 1]}],
                                   "samples_per_class": {"train": 100000}}}})
    run = snakemake(project, "-n", "--configfile", configfile)
    assert run.returncode != 0
    assert ("tasks.many.samples_per_class.train: 100000 images per class asked for, but class "
            "'0' of digits has only 142 in its train split") in run.stdout
    assert not (project / "results").exists() and not (project / "data").exists()

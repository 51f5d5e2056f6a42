"""The paper-shaped study: `dnnmod study shrink` and the official-format archives it reads.

The run itself (every job of the derived study through Snakemake, data from a local HTTP
mirror) is `make paper-shaped`, a step of .ci/run; here: that the derived study's DAG runs
every rule, architecture, approach, training kind, approach-architecture and approach-dataset
pair, dataset and class count of config/config.yaml's, and that the archives go through the
registry's real download, checksum and parser path.
"""

from __future__ import annotations

import functools
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from workflow_helpers import REPO, snakemake

from dnnmod.artifacts import load_tensors, read_json
from dnnmod.cli import main
from dnnmod.data import DATASETS, prepare
from dnnmod.data.official_archives import (
    CIFAR100_CLASSES,
    MANIFEST,
    ArchiveSizes,
    class_factors,
    class_images,
    write_archives,
)
from dnnmod.errors import ChecksumError, ConfigError
from dnnmod.study import SHRUNK_EPOCHS, shrink_study

PAPER = REPO / "config" / "config.yaml"
MIRROR = "http://127.0.0.1:9/"  # dry runs download nothing
SIZES = ArchiveSizes(train_per_class=6, test_per_class=3)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mirror")
    write_archives(folder, SIZES)
    return folder


@pytest.fixture(scope="module")
def paper() -> dict:
    return yaml.safe_load(PAPER.read_text())


@pytest.fixture(scope="module")
def shrunk(paper, archives) -> dict:
    return shrink_study(paper, read_json(archives / MANIFEST), MIRROR, data_root="data/shaped")


def dry_run_paths(configfile: Path, config: dict) -> dict[str, set]:
    """What a forced dry run of ``configfile`` would execute: its rules, trained
    architectures, training kinds, approaches, (approach, architecture) and (approach,
    dataset) pairs of its module sets, and the datasets and class counts it trains on."""
    result = snakemake(REPO, "-n", "-p", "--forceall", "--nolock", "--configfile",
                       str(configfile))
    assert result.returncode == 0, result.stdout[-3000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?=^(?:local)?rule |\Z)", result.stdout,
                      re.M | re.S)
    architecture = {name: entry["arch"] for name, entry in config["models"].items()}
    tasks = config.get("tasks", {})

    def classes(dataset: str) -> int:
        if dataset in DATASETS:
            return DATASETS[dataset].num_classes
        return sum(len(part["classes"]) for part in tasks[dataset]["parts"])

    paths: dict[str, set] = {key: set() for key in (
        "rules", "architectures", "trainings", "approaches", "approach architectures",
        "approach datasets", "datasets", "class counts")}
    for rule, body in jobs:
        paths["rules"].add(rule)
        paths["architectures"] |= set(re.findall(r"--arch (\w+)", body))
        wildcards = dict(re.findall(r"(\w+)=([\w.-]+)", "".join(
            re.findall(r"wildcards: (.*)", body))))
        if "training" in wildcards:
            paths["trainings"].add(wildcards["training"])
        if rule == "modularize":
            approach = wildcards["approach"]
            # E4's pool members train on draws <dataset>_dir<alpha>_min<m>_draw<k>_split<s>
            dataset = re.sub(r"_dir\w+_draw\d+_split\d+$", "", wildcards["dataset"])
            paths["approaches"].add(approach)
            paths["approach architectures"].add((approach,
                                                 architecture[wildcards["model"]]))
            paths["approach datasets"].add((approach, dataset))
        if rule == "train_base_model" and (wildcards["dataset"] in DATASETS
                                           or wildcards["dataset"] in tasks):  # not E4's pool
            paths["datasets"].add(wildcards["dataset"])
            paths["class counts"].add(classes(wildcards["dataset"]))
    return paths


def test_the_shrunk_study_executes_every_path_of_the_paper_study(paper, shrunk, tmp_path):
    configfile = tmp_path / "paper_shaped.yaml"
    configfile.write_text(yaml.safe_dump(shrunk, sort_keys=False))
    paper_paths = dry_run_paths(PAPER, paper)
    shrunk_paths = dry_run_paths(configfile, shrunk)
    for kind, executed in paper_paths.items():
        assert executed, kind  # the parse above found what it looks for
        assert shrunk_paths[kind] == executed, (
            f"{kind} of config/config.yaml that the paper-shaped study does not execute: "
            f"{sorted(executed - shrunk_paths[kind], key=str)}; fix dnnmod.study.shrink_study")
    assert 100 in shrunk_paths["class counts"]


def test_the_shrunk_study_keeps_every_recipe_kind_small(paper, shrunk):
    def kinds(config):
        return {(recipe.get("schedule", "cosine"), recipe.get("selection", "last"),
                 recipe.get("optimizer", "sgd")) for recipe in config["recipes"].values()}

    assert kinds(shrunk) == kinds(paper)
    assert {"step", "cosine", "constant"} <= {kind[0] for kind in kinds(shrunk)}
    for recipe in shrunk["recipes"].values():
        assert recipe["epochs"] <= SHRUNK_EPOCHS
        assert all(0 < milestone < recipe["epochs"] for milestone in recipe.get("milestones", []))
    assert set(shrunk["datasets"]) == set(paper["datasets"])
    assert len(shrunk["seeds"]) == 1 and shrunk["device"] == "cpu"
    assert shrunk["data"]["root"] == "data/shaped"  # never the real datasets' folder
    for name, entry in shrunk["models"].items():
        assert entry["width"] < paper["models"][name].get("width", 1.0)
    new_tasks = shrunk["reuse"]["new_tasks"]["settings"]
    assert all(setting.get("max_pairs", 0) <= 2 for setting in new_tasks.values())


def test_the_datasets_come_from_the_mirror_with_the_archives_checksums(shrunk, archives):
    manifest = read_json(archives / MANIFEST)
    for name, entry in shrunk["datasets"].items():
        assert entry["mirror"] == MIRROR
        assert entry["files"] == {key: {"md5": file["md5"]}
                                  for key, file in manifest["datasets"][name].items()}


def test_shrink_refuses_a_manifest_without_the_studys_datasets(paper, archives):
    manifest = read_json(archives / MANIFEST)
    del manifest["datasets"]["svhn"]
    with pytest.raises(ConfigError, match="no svhn"):
        shrink_study(paper, manifest, MIRROR)


def test_the_command_writes_what_shrink_study_derives(shrunk, archives, tmp_path):
    out = tmp_path / "derived.yaml"
    assert main(["study", "shrink", "--config", str(PAPER), "--archives", str(archives),
                 "--mirror", MIRROR, "--data-root", "data/shaped", "--out", str(out)]) == 0
    assert out.read_text().startswith("# Generated by `dnnmod study shrink")
    assert yaml.safe_load(out.read_text()) == shrunk


@pytest.fixture(scope="module")
def mirror(archives):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archives))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
        httpd.shutdown()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "fashion_mnist"])
def test_official_format_archives_download_verify_and_parse(name, archives, mirror, tmp_path):
    manifest = read_json(archives / MANIFEST)
    files = {key: {"md5": entry["md5"]} for key, entry in manifest["datasets"][name].items()}
    folder = prepare(name, tmp_path, mirror=mirror, files=files, progress=False)
    meta = read_json(folder / "meta.json")
    assert all("url" in entry and entry["url"].startswith(mirror)
               for entry in meta["source"]["files"].values())  # downloaded, not a local copy
    tensors = load_tensors(folder / "images.safetensors")
    classes = DATASETS[name].num_classes
    for split, per_class in manifest["per_class"][name].items():
        counts = np.bincount(tensors[f"{split}_labels"].numpy(), minlength=classes)
        assert counts.tolist() == [per_class] * classes  # SVHN's label 10 read as digit 0
        assert tensors[f"{split}_images"].shape[1:] == (3, 32, 32)
    if name == "cifar100":
        assert meta["class_names"] == CIFAR100_CLASSES


def test_a_tampered_archive_fails_its_checksum(archives, mirror, tmp_path):
    files = read_json(archives / MANIFEST)["datasets"]["cifar10"]
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        prepare("cifar10", tmp_path, mirror=mirror, progress=False,
                files={"archive": {"md5": files["archive"]["md5"][::-1]}})
    assert not (tmp_path / "cifar10" / "images.safetensors").exists()


def nearest_class_mean(num_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions of a nearest-class-mean classifier (raw pixels) fitted on one
    draw of the archives' images and applied to another."""
    labels = np.repeat(np.arange(num_classes), per_class)
    train, test = (class_images(labels, num_classes, seed=1, draw=draw)
                   .reshape(len(labels), -1).astype(float) for draw in (0, 1))
    means = np.stack([train[labels == c].mean(0) for c in range(num_classes)])
    return labels, np.argmin(((test[:, None] - means[None]) ** 2).sum(-1), axis=1)


def test_images_are_learnable_but_not_trivially():
    """A nearest-class-mean classifier beats chance (10 %) by far, but clutter, occluders,
    jitter and noise keep it far from perfect: the shrunk models' accuracies say something."""
    labels, predicted = nearest_class_mean(10, 20)
    assert 0.35 < (predicted == labels).mean() < 0.9


def test_a_hundred_classes_need_both_shape_and_appearance():
    """Classes share shapes and appearances: on 100 classes the nearest-class-mean errors
    mostly confuse classes that share one of them (18 % of the other classes do)."""
    assert class_factors(10) == (2, 5) and class_factors(100) == (10, 10)
    labels, predicted = nearest_class_mean(100, 10)
    assert (predicted == labels).mean() > 0.05  # chance: 0.01
    shapes, _ = class_factors(100)
    wrong = predicted != labels
    shared = ((predicted % shapes == labels % shapes)
              | (predicted // shapes == labels // shapes))[wrong]
    assert shared.mean() > 0.5


def test_images_follow_the_seed_and_draw():
    labels = np.arange(10).repeat(2)
    image = functools.partial(class_images, labels, 10)
    assert np.array_equal(image(seed=3, draw=1), image(seed=3, draw=1))
    assert not np.array_equal(image(seed=3, draw=1), image(seed=3, draw=2))
    assert not np.array_equal(image(seed=3, draw=1), image(seed=4, draw=1))
    grey = image(seed=3, draw=1, size=28, channels=1)
    assert grey.shape == (20, 1, 28, 28) and grey.dtype == np.uint8


def test_a_class_count_without_enough_appearances_is_refused():
    with pytest.raises(ConfigError, match="200 classes as 10 shapes x 20 appearances"):
        class_factors(200)


def test_a_dataset_of_many_classes_gets_as_many_images_in_all_not_per_class(archives):
    per_class = read_json(archives / MANIFEST)["per_class"]
    assert per_class["cifar10"] == {"train": SIZES.train_per_class,
                                    "test": SIZES.test_per_class}
    assert ArchiveSizes(60, 30).for_classes(100) == ArchiveSizes(6, 3)
    assert per_class["cifar100"] == {"train": 5, "test": 2}  # at least one validation image


def test_archive_sizes_must_be_positive():
    with pytest.raises(ConfigError, match="at least 1"):
        ArchiveSizes(0, 3)

"""A modularize entry's hyperparameters: an author's setting for some models and datasets, over
the study's approach settings (CNNSplitter's SVHN and SVHN 0-4 rows)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from workflow_helpers import REPO, TINY, make_project, snakemake, write_config

from dnnmod.approaches import APPROACHES
from dnnmod.approaches.base import Approach
from dnnmod.artifacts import read_json
from dnnmod.data.official_archives import MANIFEST, ArchiveSizes, write_archives
from dnnmod.errors import ConfigError
from dnnmod.report.sensitivity import approach_overrides, plan_sweeps
from dnnmod.study import (
    SHRUNK_APPROACHES,
    check_study_config,
    modularization_hyperparameters,
    shrink_study,
)

OVERRIDES = {"population": 6, "mutation_rate": 0.1}


def study(**entry):
    config = copy.deepcopy({**TINY, "datasets": {"digits": {}, "shapes": {}}})
    config["base_models"] = [{"dataset": "digits", "models": ["simcnn"], "recipe": "tiny"},
                             {"dataset": "shapes", "models": ["simcnn"], "recipe": "tiny"}]
    config["approaches"] = {"cnnsplitter": {"population": 4, "parents": 2, "elites": 1,
                                            "generations": 1}}
    config["modularize"] = [
        {"approach": "cnnsplitter", "dataset": "digits", "models": ["simcnn"], **entry},
        {"approach": "cnnsplitter", "dataset": "shapes", "models": ["simcnn"]},
        {"approach": "gradsplitter", "dataset": "digits", "models": ["simcnn"]},
        {"approach": "random_gradsplitter", "dataset": "digits", "models": ["simcnn"]}]
    return config


def test_an_entry_sets_its_module_sets_hyperparameters_over_the_studys():
    config = study(hyperparameters=OVERRIDES)
    check_study_config(config)
    assert modularization_hyperparameters(config, "cnnsplitter", "digits", "simcnn") == {
        "population": 6, "parents": 2, "elites": 1, "generations": 1, "mutation_rate": 0.1}
    assert modularization_hyperparameters(config, "cnnsplitter", "shapes", "simcnn") == \
        config["approaches"]["cnnsplitter"]
    # a set no entry makes (an E4 pool member's) takes the study's
    assert modularization_hyperparameters(config, "gradsplitter", "digits_dir1.0", "simcnn") == {}


@pytest.mark.parametrize("entry, message", [
    ({"hyperparameters": {"populaton": 6}},
     r"modularize\[0\]\.hyperparameters: unknown keys \['populaton'\]"),
    ({"hyperparameters": {"mutation_rate": 2}},
     r"modularize\[0\]\.hyperparameters\.mutation_rate: must be in \[0, 1\], got 2"),
    ({"hyperparameters": {"population": 1}},
     r"modularize\[0\]\.hyperparameters\.population: must be at least 2"),
    ({"approach": "random_gradsplitter", "hyperparameters": {"match": "cnnsplitter"}},
     r"modularize\[0\]\.hyperparameters: unknown keys \['match'\]"),
    ({"approach": "reader", "hyperparameters": {"reads": "cnnsplitter"}},
     r"modularize\[0\]\.hyperparameters: would change the module sets reader reads"),
])
def test_bad_entry_hyperparameters_are_named_by_their_key(entry, message, monkeypatch):
    monkeypatch.setitem(APPROACHES, "reader", Reader())
    config = study(**entry)
    if entry.get("approach") == "random_gradsplitter":  # the control on digits, listed twice
        del config["modularize"][3]
    with pytest.raises(ConfigError, match=message):
        check_study_config(config)


class Reader(Approach):
    """An approach whose hyperparameter names the module sets it reads (as a plug-in's may):
    a modularize entry must not change them."""

    name = "reader"
    defaults = {"reads": "gradsplitter"}

    def references(self, hyperparameters):
        return [hyperparameters["reads"]]

    def decompose(self, context):
        raise AssertionError("only the config is checked")


def test_a_module_set_made_by_two_entries_is_refused():
    config = study()
    config["modularize"].append({"approach": "cnnsplitter", "dataset": "digits",
                                 "models": ["simcnn"], "hyperparameters": OVERRIDES})
    with pytest.raises(ConfigError, match=r"modularize\[4\]\.models: cnnsplitter decomposes "
                                          r"simcnn on digits in modularize\[0\] already"):
        check_study_config(config)


def test_a_sweep_varies_around_the_entrys_values():
    config = study(hyperparameters=OVERRIDES)
    config["sensitivity"] = {"sweeps": [{"approach": "cnnsplitter", "dataset": "digits",
                                         "models": ["simcnn"], "parameter": "mutation_rate",
                                         "values": [0.1, 0.2]}]}
    points = plan_sweeps(config)
    assert [(p.value, p.default, p.is_default) for p in points] == [(0.1, 0.1, True),
                                                                     (0.2, 0.1, False)]
    assert approach_overrides(config, points[1]) == {
        **modularization_hyperparameters(config, "cnnsplitter", "digits", "simcnn"),
        "mutation_rate": 0.2}


def test_the_modularize_job_takes_the_entrys_hyperparameters(tmp_path):
    project = make_project(tmp_path / "project")
    configfile = write_config(project, study(hyperparameters=OVERRIDES))
    run = snakemake(project, "-n", "-p", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    commands = dict(re.findall(r"dnnmod modularize --approach cnnsplitter --model "
                               r"\S+/models/(\w+)/simcnn/\S+ --hyperparameters '([^']+)'",
                               run.stdout))
    assert json.loads(commands["digits"]) == {"elites": 1, "generations": 1, "mutation_rate": 0.1,
                                              "parents": 2, "population": 6}
    assert json.loads(commands["shapes"])["population"] == 4


def test_the_paper_shaped_study_keeps_the_entries_and_shrinks_their_work(tmp_path):
    paper = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    write_archives(tmp_path, ArchiveSizes(train_per_class=6, test_per_class=3))
    shrunk = shrink_study(paper, read_json(tmp_path / MANIFEST), "http://127.0.0.1:9/")
    svhn_0_4 = [entry for entry in shrunk["modularize"]
                if (entry["approach"], entry["dataset"]) == ("cnnsplitter", "svhn_0_4")]
    assert svhn_0_4, "the paper's CNNSplitter SVHN 0-4 sets are E3's strong models"
    for entry in svhn_0_4:
        hyperparameters = entry["hyperparameters"]
        assert hyperparameters["population"] == SHRUNK_APPROACHES["cnnsplitter"]["population"]
        assert hyperparameters["generations"] == SHRUNK_APPROACHES["cnnsplitter"]["generations"]
        assert hyperparameters["mutation_rate"] == 0.1  # not a work count: the paper's
    check_study_config(shrunk)

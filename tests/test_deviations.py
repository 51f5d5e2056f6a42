"""Every setting of the paper-scale study that differs from the papers states why.

reference/paper_settings.yaml holds the papers' settings (from the papers and their authors'
artifacts); config/config.yaml gives the reason for each difference under ``deviations:``. A
setting the config leaves out takes dnnmod's default, which is checked here the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from dnnmod.deviations import (
    ABSENT,
    compared_settings,
    config_value,
    deviation_table,
    paper_settings,
    unexplained,
)
from dnnmod.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


def paper_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def schema_default(path: str) -> Any:
    """The schema's ``default`` of a dotted path (through ``properties``), else ABSENT."""
    node = SCHEMA
    for key in path.split("."):
        properties = node.get("properties", {})
        if key not in properties:
            return ABSENT
        node = properties[key]
    return node.get("default", ABSENT)


def dnnmod_default(path: str) -> Any:
    """What dnnmod uses where the config leaves ``path`` out: an approach's or objective's
    reference hyperparameter, a recipe field's default, or the schema's default."""
    from dnnmod.approaches import APPROACHES
    from dnnmod.training.objectives import get_objective
    from dnnmod.training.train import Recipe

    parts = path.split(".")
    if parts[0] == "approaches" and len(parts) == 3:
        return APPROACHES[parts[1]].defaults.get(parts[2], ABSENT)
    if parts[0] == "objectives" and len(parts) == 3:
        return get_objective(parts[1]).defaults.get(parts[2], ABSENT)
    if parts[0] == "recipes" and len(parts) == 3:
        fields = {field.name: field.default for field in dataclasses.fields(Recipe)}
        value = fields.get(parts[2], ABSENT)
        return list(value) if isinstance(value, tuple) else value
    return schema_default(path)


def test_every_difference_from_the_papers_has_a_reason():
    missing = unexplained(paper_config(), dnnmod_default)
    assert not missing, (
        f"config/config.yaml differs from reference/paper_settings.yaml in {missing} with no "
        "reason under deviations: set the paper's value or state why not"
    )


def test_the_paper_config_names_each_reason_and_a_scaled_study_may_give_one_for_all():
    assert "*" not in paper_config().get("deviations", {})
    scaled = yaml.safe_load((REPO / "config/demo.yaml").read_text())
    assert unexplained(scaled, dnnmod_default) == []
    rows = deviation_table(scaled)
    reasons = scaled["deviations"]
    assert rows and all(row["why"] == reasons.get(row["setting"], reasons["*"]) for row in rows)
    del scaled["deviations"]
    assert "seeds" in unexplained(scaled, dnnmod_default)


def test_every_reference_setting_resolves_in_the_paper_config():
    """A path that names nothing (a renamed key) would hide a difference."""
    unresolved = [
        entry.setting
        for entry, ours in compared_settings(paper_config(), dnnmod_default)
        if ours is ABSENT
    ]
    assert not unresolved, unresolved


def test_no_reason_is_given_for_a_setting_that_matches_the_papers():
    config = paper_config()
    reasons = config.get("deviations") or {}
    stale = [
        entry.setting
        for entry, ours in compared_settings(config, dnnmod_default)
        if entry.setting in reasons and entry.path is not None and not entry.differs(ours)
    ]
    assert not stale, f"deviations: {stale} match the papers now; drop their reasons"


def test_a_difference_without_a_reason_is_caught_and_a_reason_clears_it():
    config = paper_config()
    config["recipes"]["gradsplitter"]["lr"] = 0.1
    assert "recipes.gradsplitter.lr" in unexplained(config, dnnmod_default)
    config["deviations"] = {**config.get("deviations", {}), "recipes.gradsplitter.lr": "why"}
    assert "recipes.gradsplitter.lr" not in unexplained(config, dnnmod_default)
    row = next(r for r in deviation_table(config) if r["setting"] == "recipes.gradsplitter.lr")
    assert row == {
        "setting": "recipes.gradsplitter.lr",
        "paper": "0.01",
        "ours": "0.1",
        "why": "why",
        "source": "GradSplitter train.py",
        "affects": "",
    }


def test_a_reason_for_an_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError, match=r"deviations: \['recipes.nope'\] name no setting"):
        unexplained({"deviations": {"recipes.nope": "typo"}})


def test_paths_select_list_entries_count_and_measure():
    config = {
        "seeds": [0, 1],
        "sensitivity": {
            "sweeps": [
                {"approach": "mwt", "parameter": "alpha", "values": [1]},
                {"approach": "moda", "parameter": "alpha", "values": [0, 2]},
            ]
        },
        "modularize": [
            {"approach": "mwt", "dataset": "cifar10", "models": ["simcnn"]},
            {"approach": "gradsplitter", "dataset": "cifar10", "models": ["simcnn", "vgg16"]},
        ],
    }
    assert config_value(config, "seeds|count") == 2
    assert config_value(config, "sensitivity.sweeps[approach=moda,parameter=alpha].values") == [
        0,
        2,
    ]
    assert config_value(config, "sensitivity.sweeps[approach=moda,parameter=beta].values") is (
        ABSENT
    )
    assert config_value(config, "@models_shared_by_mwt_and_splitters") == ["cifar10/simcnn"]
    assert config_value(config, "recipes.mwt.lr") is ABSENT


def test_the_reference_names_each_setting_once_with_a_source():
    settings = paper_settings()
    assert len({entry.setting for entry in settings}) == len(settings)
    assert all(entry.source and (entry.path or entry.ours) for entry in settings)


@pytest.mark.parametrize(
    "name, sampled",
    [
        ("config", ["cifar10_x_cifar100_resnet20: 100 sampled pairs"]),
        ("fidelity", ["fashion_x_digits: 5 sampled pairs"]),
        (
            "medium",
            ["fashion_x_digits: 20 sampled pairs", "fashion_x_digits_pool: 20 sampled pairs"],
        ),
        ("demo", ["digits_x_shapes: 2 listed pairs"]),
    ],
)
def test_each_config_that_samples_cross_dataset_pairs_says_why(name, sampled):
    """E4's headline composes every class of one dataset with every class of the other; a
    config that samples says so, setting by setting, with its own reason."""
    config = yaml.safe_load((REPO / f"config/{name}.yaml").read_text())
    assert config_value(config, "@sampled_cross_dataset_pairs") == sampled
    row = next(r for r in deviation_table(config) if r["setting"] == "e4_cross_dataset_pairs")
    assert row["paper"] == "[]" and row["why"] == config["deviations"]["e4_cross_dataset_pairs"]
    # within one dataset is no cross-dataset pair: the paper config's intra setting is not listed
    assert not any("intra" in entry for entry in sampled)


def test_mwts_fine_tune_epoch_is_a_stated_deviation():
    row = next(
        r for r in deviation_table(paper_config()) if r["setting"] == "mwt_union_fine_tune_epoch"
    )
    assert "best accuracy on the test images" in row["paper"]
    assert row["ours"].startswith("the last epoch") and row["affects"] == "e5:mwt"
    assert row["why"] != "no reason stated"

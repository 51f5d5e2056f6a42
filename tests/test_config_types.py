"""Every typed value of a study config is checked by its type before any job runs: approach
hyperparameters whose default is None, model options, generator options; unknown keys
anywhere (the ``reuse`` section included) are refused by the schema the dry run applies."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from dnnmod.approaches import APPROACHES, resolve_hyperparameters
from dnnmod.approaches.base import Approach
from dnnmod.errors import ConfigError
from dnnmod.hyperparameters import resolve
from dnnmod.models import build_model
from dnnmod.study import check_study_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
SHIPPED = sorted((REPO / "config").glob("*.yaml"))


@pytest.fixture
def demo():
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


@pytest.mark.parametrize("approach, key, value, message", [
    ("gradsplitter", "max_train_samples", "many", "expected int or null, got 'many'"),
    ("gradsplitter", "max_train_samples", 2.5, "expected int or null, got 2.5"),
    ("gradsplitter", "mask_travel", "far", "expected float or null, got 'far'"),
    ("cnnsplitter", "fitness_samples", True, "expected int or null, got True"),
])
def test_a_value_of_a_none_default_is_checked_by_its_declared_type(demo, approach, key, value,
                                                                   message):
    demo["approaches"] = {**demo.get("approaches", {}), approach: {key: value}}
    with pytest.raises(ConfigError, match=f"approaches.{approach}.{key}: {message}"):
        check_study_config(demo)


def test_none_and_values_of_the_declared_type_pass():
    assert resolve_hyperparameters("gradsplitter", {"max_train_samples": None})[
        "max_train_samples"] is None
    assert resolve_hyperparameters("gradsplitter", {"mask_travel": 2})["mask_travel"] == 2


def test_every_none_default_declares_its_type():
    for approach in APPROACHES.values():
        untyped = [key for key, value in approach.defaults.items()
                   if value is None and key not in approach.types]
        assert not untyped, (approach.name, untyped)
    with pytest.raises(TypeError, match=r"\['limit'\] default to None and declare no type"):
        type("Untyped", (Approach,), {"name": "untyped", "defaults": {"limit": None},
                                      "modularize": lambda *a, **k: None})


def test_a_declared_float_takes_ints_but_not_bools():
    types = {"rate": float}
    assert resolve("x", {"rate": None}, {"rate": 1}, types=types)["rate"] == 1
    with pytest.raises(ConfigError, match="x.rate: expected float or null, got True"):
        resolve("x", {"rate": None}, {"rate": True}, types=types)


@pytest.mark.parametrize("options, message", [
    ({"batch_norm": "no"}, "models.resnet20.options.batch_norm: expected bool, got 'no'"),
    ({"batch_norm": 0}, "expected bool, got 0"),
    ({"dropout": 0.5}, "resnet20 has no option 'dropout'"),
])
def test_model_options_are_checked_by_type(demo, options, message):
    demo["models"]["resnet20"]["options"] = options
    with pytest.raises(ConfigError, match=message):
        check_study_config(demo)


@pytest.mark.parametrize("arch, options, message", [
    ("resnet20", {"batch_norm": "no"}, "option batch_norm: expected bool, got 'no'"),
    ("simcnn", {"dropout": "half"}, "option dropout: expected float, got 'half'"),
    ("simcnn", {"dropout": 1.5}, "option dropout: 1.5 is out of range"),
])
def test_build_model_refuses_a_mistyped_option(arch, options, message):
    with pytest.raises(ConfigError, match=message):
        build_model(arch, 10, width=0.125, **options)


@pytest.mark.parametrize("options, message", [
    ({"train_cont": 100}, r"datasets.shapes.options: unknown keys \['train_cont'\]"),
    ({"train_count": "many"}, "datasets.shapes.options.train_count: expected int"),
])
def test_generator_options_are_checked(demo, options, message):
    demo["datasets"]["shapes"]["options"] = options
    with pytest.raises(ConfigError, match=message):
        check_study_config(demo)


def test_downloaded_datasets_take_no_options(demo):
    demo["datasets"]["digits"] = {"options": {"seed": 1}}
    with pytest.raises(ConfigError, match=r"datasets.digits.options: unknown keys \['seed'\]"):
        check_study_config(demo)


@pytest.mark.parametrize("where", [("reuse", "replacment"), ("reuse",), ("data",),
                                   ("threads",), ("sensitivity",)])
def test_an_unknown_key_is_refused_by_the_schema(demo, where):
    config = copy.deepcopy(demo)
    holder = config
    for key in where[:-1]:
        holder = holder.setdefault(key, {})
    if len(where) == 2:  # a typo of a section's name, e.g. reuse.replacement
        holder[where[-1]] = copy.deepcopy(demo["reuse"]["replacement"])
    else:
        holder.setdefault(where[-1], {})["typo_key"] = 1
    with pytest.raises(WorkflowError, match="Additional properties are not allowed"):
        validate(config, SCHEMA)


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_every_shipped_config_validates_and_checks(path):
    config = yaml.safe_load(path.read_text())
    validate(config, SCHEMA)
    check_study_config(config)

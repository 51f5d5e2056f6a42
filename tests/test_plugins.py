"""Registries filled from entry points (dnnmod.plugins): dnnmod's built-ins come from its own
metadata, and another distribution's models, datasets, objectives and rules join them; a
clash or an import failure is one PluginError naming the distribution and the entry point."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest

from dnnmod import plugins
from dnnmod.approaches import APPROACHES
from dnnmod.data.registry import DATASETS, DatasetSpec
from dnnmod.errors import UnknownNameError
from dnnmod.models import ARCHITECTURES, build_model
from dnnmod.modules.combination import COMBINATIONS
from dnnmod.plugins import GROUPS, PluginError, Registry, callable_object
from dnnmod.training.objectives import OBJECTIVES


class FakeDistribution(importlib.metadata.Distribution):
    """An installed distribution known only by its name and entry_points.txt."""

    def __init__(self, name: str, entry_points: dict[str, dict[str, str]]) -> None:
        self._name = name
        self._entry_points = "\n".join(
            f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items())
            for group, points in entry_points.items())

    def read_text(self, filename):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {self._name}\nVersion: 1.0\n"
        if filename == "entry_points.txt":
            return self._entry_points
        return None

    def locate_file(self, path):
        raise FileNotFoundError(path)


@pytest.fixture
def installed(monkeypatch):
    """``install(name, {group: {entry: value}})`` adds a fake distribution to what
    importlib.metadata sees; returns a fresh Registry maker reading that view."""
    extra: list[FakeDistribution] = []
    real = importlib.metadata.distributions

    def distributions(**kwargs):
        yield from real(**kwargs)
        yield from extra

    monkeypatch.setattr(importlib.metadata, "distributions", distributions)

    def install(name: str, entry_points: dict[str, dict[str, str]]) -> None:
        extra.append(FakeDistribution(name, entry_points))

    return install


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A module ``fake_dnnmod_plugin`` on sys.path holding a model builder, a dataset spec, a
    combination rule and an objective; removed from sys.modules afterwards."""
    (tmp_path / "fake_dnnmod_plugin.py").write_text(textwrap.dedent('''
        from torch import nn

        from dnnmod.data.registry import DIGITS, DatasetSpec
        from dnnmod.training.objectives import StandardTraining
        import dataclasses


        def tiny_mlp(num_classes, width=1.0):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


        MORE_DIGITS = dataclasses.replace(DIGITS, name="more_digits")
        WRONG_NAME = dataclasses.replace(DIGITS, name="something_else")


        def lowest(scores, classes):
            return classes[scores.argmin(dim=1)]


        class Smoothed(StandardTraining):
            name = "smoothed"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fake_dnnmod_plugin"
    sys.modules.pop("fake_dnnmod_plugin", None)


def test_the_built_ins_come_from_dnnmods_own_entry_points():
    for registry, names in [(APPROACHES, {"cnnsplitter", "gradsplitter", "mwt", "moda",
                                          "pan_rajan", "random_mwt"}),
                            (OBJECTIVES, {"st", "mwt", "moda"}),
                            (ARCHITECTURES, {"simcnn", "resnet20", "vgg16"}),
                            (DATASETS, {"cifar10", "digits", "shapes"}),
                            (COMBINATIONS, {"argmax", "voting"})]:
        assert names <= set(registry)
        assert {registry.source(name) for name in names} == {"dnnmod"}
    assert set(plugins.GROUPS.values()) == {
        entry_point.group for entry_point in importlib.metadata.distribution(
            "dnnmod").entry_points if entry_point.group.startswith("dnnmod.")}


def test_a_plugin_registers_a_model_dataset_objective_and_rule(installed, plugin_module):
    installed("dnnmod-fake-plugin", {
        GROUPS["models"]: {"tiny_mlp": f"{plugin_module}:tiny_mlp"},
        GROUPS["datasets"]: {"more_digits": f"{plugin_module}:MORE_DIGITS"},
        GROUPS["combination_rules"]: {"lowest": f"{plugin_module}:lowest"},
        GROUPS["objectives"]: {"smoothed": f"{plugin_module}:Smoothed"}})
    from dnnmod.data.registry import _named_spec
    from dnnmod.training.objectives import Objective

    models = Registry(GROUPS["models"], "model", callable_object)
    datasets = Registry(GROUPS["datasets"], "dataset", _named_spec)
    rules = Registry(GROUPS["combination_rules"], "combination rule", callable_object)
    objectives = Registry(GROUPS["objectives"], "training kind",
                          plugins.named_subclass(Objective))
    assert "tiny_mlp" in models and "simcnn" in models
    assert plugin_module not in sys.modules  # names come from metadata; nothing imported yet
    assert models.source("tiny_mlp") == "dnnmod-fake-plugin"
    assert models["tiny_mlp"](10)[1].out_features == 10
    assert isinstance(datasets["more_digits"], DatasetSpec)
    assert datasets["more_digits"].num_classes == 10
    assert rules["lowest"].__name__ == "lowest"
    assert objectives["smoothed"].name == "smoothed"


def test_a_plugin_model_is_built_by_name_like_a_built_in(installed, plugin_module,
                                                           monkeypatch):
    installed("dnnmod-fake-plugin", {GROUPS["models"]: {"tiny_mlp": f"{plugin_module}:tiny_mlp"}})
    import dnnmod.models

    monkeypatch.setattr(dnnmod.models, "ARCHITECTURES",
                        Registry(GROUPS["models"], "model", callable_object))
    assert build_model("tiny_mlp", 4)[1].out_features == 4
    with pytest.raises(UnknownNameError, match="unknown model 'nope'; known: .*tiny_mlp"):
        build_model("nope", 4)


def test_a_name_claimed_twice_names_both_distributions(installed, plugin_module):
    installed("dnnmod-fake-plugin", {GROUPS["models"]: {"simcnn": f"{plugin_module}:tiny_mlp"}})
    models = Registry(GROUPS["models"], "model", callable_object)
    with pytest.raises(PluginError, match=r"model 'simcnn' is claimed twice: entry point "
                       r"'simcnn' = 'dnnmod.models.simcnn:simcnn' \(dnnmod.models, distribution "
                       r"'dnnmod'\) and entry point 'simcnn' = 'fake_dnnmod_plugin:tiny_mlp' "
                       r"\(dnnmod.models, distribution 'dnnmod-fake-plugin'\)"):
        "simcnn" in models  # noqa: B015 - looking a name up reads the entry points


def test_a_plugin_that_fails_to_import_names_its_distribution(installed):
    installed("dnnmod-broken", {GROUPS["models"]: {"broken": "dnnmod_no_such_module:build"}})
    models = Registry(GROUPS["models"], "model", callable_object)
    assert "broken" in models  # listed from metadata without importing it
    with pytest.raises(PluginError, match=r"entry point 'broken' = 'dnnmod_no_such_module:build' "
                       r"\(dnnmod.models, distribution 'dnnmod-broken'\) failed to import: "
                       r"ModuleNotFoundError"):
        models["broken"]
    assert models["simcnn"] is ARCHITECTURES["simcnn"]  # the others still load


def test_an_entry_point_holding_the_wrong_object_is_refused(installed, plugin_module):
    from dnnmod.data.registry import _named_spec

    installed("dnnmod-fake-plugin", {GROUPS["datasets"]: {
        "more_digits": f"{plugin_module}:lowest", "renamed": f"{plugin_module}:WRONG_NAME"}})
    datasets = Registry(GROUPS["datasets"], "dataset", _named_spec)
    with pytest.raises(PluginError, match=r"'more_digits' .* is not a "
                                          r"dnnmod.data.registry.DatasetSpec"):
        datasets["more_digits"]
    with pytest.raises(PluginError, match=r"named 'something_else', not 'renamed'"):
        datasets["renamed"]


def test_an_install_whose_metadata_predates_the_entry_points_is_told_to_reinstall(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kwargs: iter(()))
    with pytest.raises(PluginError, match=r"declares no dnnmod.models entry points.*reinstall"):
        list(Registry(GROUPS["models"], "model", callable_object))


def test_in_process_registration_refuses_a_taken_name():
    rules = Registry(GROUPS["combination_rules"], "combination rule", callable_object)
    with pytest.raises(PluginError, match=r"combination rule 'argmax' is registered twice: by "
                                          r"entry point 'argmax'"):
        rules.register("argmax", min)
    rules.register("first", min)
    assert rules.source("first") == "in-process" and "first" in list(rules)
    del rules["first"], rules["voting"]
    assert "first" not in rules and "voting" not in rules and "argmax" in rules


def test_list_names_every_kind_of_registered_thing(capsys):
    from dnnmod.cli import main

    for kind, name in [("approaches", "random_gradsplitter"), ("objectives", "mwt"),
                       ("models", "resnet20"), ("datasets", "fashion_mnist"),
                       ("combination_rules", "voting")]:
        assert main(["list", kind]) == 0
        # a name another test registered in-process is listed with "(in-process)" after it
        listed = {line.split(" (")[0] for line in capsys.readouterr().out.splitlines()}
        assert name in listed

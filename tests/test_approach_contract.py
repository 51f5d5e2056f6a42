"""The approach contract (dnnmod.approaches.contract): every registered approach meets it,
through the same checks ``dnnmod check-approach`` runs on a third party's, and the checks fail,
naming the requirement, where an approach breaks it."""

from __future__ import annotations

import pytest
import torch

from dnnmod.approaches import APPROACHES, get_approach
from dnnmod.approaches.base import Approach, Decomposition
from dnnmod.approaches.contract import Bench, check_approach, load_approach_class
from dnnmod.cli import main
from dnnmod.errors import ConfigError
from dnnmod.modules.heads import OwnLogitHead

REQUIREMENTS = 8


@pytest.fixture(scope="module")
def bench(small_digits, tmp_path_factory):
    return Bench(small_digits, tmp_path_factory.mktemp("bench"))


@pytest.mark.parametrize("name", sorted(APPROACHES))
def test_every_registered_approach_meets_the_contract(name, bench):
    outcomes = check_approach(get_approach(name), bench)
    assert [outcome.line() for outcome in outcomes if outcome.passed is False] == []
    assert len(outcomes) == REQUIREMENTS


class Unchecked(Approach):
    """Breaks the contract: takes any key and value, and draws its masks from the global
    generator, so a rerun differs."""

    name = "unchecked"
    defaults = {"keep": 0.5}

    def resolve(self, overrides=None):
        return {**self.defaults, **(overrides or {})}

    def decompose(self, context):
        masks = {group.name: torch.rand(len(context.classes), group.size)
                 < context.hyperparameters["keep"] for group in context.structure.conv_groups}
        for mask in masks.values():
            mask[:, 0] = True  # no empty module
        return Decomposition(masks, OwnLogitHead(context.classes, context.data.num_classes))


class Forgetful(Unchecked):
    """Records no seed in its provenance."""

    name = "forgetful"

    def modularize(self, *args, **kwargs):
        modules = super().modularize(*args, **kwargs)
        del modules.provenance["seed"]
        return modules


def test_the_checks_name_each_broken_requirement(bench):
    outcomes = check_approach(Unchecked(), bench)
    failed = {outcome.requirement: outcome.detail for outcome in outcomes
              if outcome.passed is False}
    assert failed == {
        "an unknown key is a ConfigError naming it": "no error",
        "a value of the wrong type is a ConfigError naming it": "no error",
        "interrupted after its first checkpoint and run again, it gives the same modules":
            "never checkpoints through dnnmod.resumable: two runs compared; the module sets "
            "differ"}

    forgetful = {outcome.requirement: outcome for outcome in check_approach(Forgetful(), bench)}
    provenance = forgetful["modularize returns a module set with the required provenance"]
    assert provenance.passed is False and "provenance lacks ['seed']" in provenance.detail
    assert forgetful["its module set survives save -> load unchanged"].detail == (
        "not run: modularize failed")


def test_check_approach_exits_1_on_a_broken_approach(tmp_path, capsys):
    status = main(["check-approach", "test_approach_contract:Unchecked",
                   "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAILED  an unknown key is a ConfigError naming it: no error" in out
    assert out.splitlines()[-1] == (
        f"unchecked (test_approach_contract.Unchecked): {REQUIREMENTS - 3} of {REQUIREMENTS} "
        "requirements met")


@pytest.mark.parametrize("target, message", [
    ("no_such_package.approach:Mine", "importing no_such_package.approach failed: "
                                      "ModuleNotFoundError"),
    ("dnnmod.approaches.contract:Bench", "has no subclass of dnnmod.approaches.base.Approach "
                                         "named 'Bench'"),
    ("dnnmod.approaches.base:Approach", "sets no `name`"),
    ("dnnmod.approaches.contract", "expected PACKAGE.MODULE:CLASS"),
])
def test_a_target_that_is_no_approach_is_one_clear_error(target, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_approach_class(target)

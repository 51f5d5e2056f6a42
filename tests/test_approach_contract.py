"""The approach contract (dnnmod.approaches.contract): every registered approach meets it,
through the same checks ``dnnmod check-approach`` runs on a third party's, and the checks fail,
naming the requirement, where an approach breaks it."""

from __future__ import annotations

import time

import pytest
import torch

from dnnmod.approaches import APPROACHES, get_approach
from dnnmod.approaches.base import Approach
from dnnmod.approaches.contract import Bench, check_approach, load_approach_class
from dnnmod.cli import main
from dnnmod.errors import ConfigError
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.modules.structure import trace_structure

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

    def modularize(self, model, base_meta, data, hyperparameters, *, seed, device="cpu",
                   checkpoint=None, progress=None, references=None):
        structure = trace_structure(model, (1, *data.train.images.shape[1:]))
        classes = list(range(data.num_classes))
        masks = {group.name: torch.rand(len(classes), group.size) < hyperparameters["keep"]
                 for group in structure.conv_groups}
        for mask in masks.values():
            mask[:, 0] = True  # no empty module
        return ModuleSet(approach=self.name, classes=classes, masks=masks,
                         head=OwnLogitHead(classes, data.num_classes), combination="argmax",
                         base=base_identity(base_meta), structure=structure,
                         provenance=self.provenance(hyperparameters, seed))

    def provenance(self, hyperparameters, seed):
        return {"approach": self.name, "hyperparameters": hyperparameters, "seed": seed,
                "wall_seconds": time.monotonic()}


class Forgetful(Unchecked):
    """Records no seed in its provenance."""

    name = "forgetful"

    def provenance(self, hyperparameters, seed):
        return {key: value for key, value in super().provenance(hyperparameters, seed).items()
                if key != "seed"}


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

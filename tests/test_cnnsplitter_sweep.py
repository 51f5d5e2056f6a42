"""CNNSplitter's layer sensitivity sweep (its authors' analyser, a workflow step) and the keep
ratios a search with ``keep_ratios: sweep`` derives from it."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from workflow_helpers import TINY, make_project, snakemake, write_config

from dnnmod.approaches import run_approach
from dnnmod.approaches.cnnsplitter import (
    SWEEP_RATIOS,
    CNNSplitter,
    keep_ratios_from_sweep,
    layer_sensitivity_sweep,
    search_inputs,
    sweep_for,
)
from dnnmod.artifacts import read_json
from dnnmod.errors import ConfigError
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure

SEARCH = {"population": 4, "generations": 1, "parents": 2, "elites": 1, "survivors": [4, 6],
          "fitness_samples": 60}
META = {"arch": "simcnn", "dataset": "digits", "num_classes": 10, "width": 0.0625,
        "weights_sha256": "0" * 64}


@pytest.fixture(scope="module")
def model(small_simcnn):
    return copy.deepcopy(small_simcnn)


@pytest.fixture(scope="module")
def record(model, small_digits):
    return layer_sensitivity_sweep(model, META, small_digits, CNNSplitter().resolve(SEARCH),
                                   seed=0)


def test_the_sweep_prunes_each_layer_alone_at_every_ratio(model, small_digits, record):
    hp = CNNSplitter().resolve(SEARCH)
    structure = trace_structure(model, (1, *small_digits.train.images.shape[1:]))
    search = search_inputs(model, structure, small_digits, hp, seed=0)
    sweep = record["sweep"]
    assert sweep["ratios"] == list(SWEEP_RATIOS) == [k / 10 for k in range(1, 11)]
    assert list(sweep["accuracy"]) == [g.name for g in search.structure.conv_groups]
    assert sweep["base_accuracy"] == search.base_accuracy
    # one layer, one ratio, by hand: the masked model (not the pass the sweep runs), each
    # class's module keeping int(size x r) of that layer by its own importance, composed by
    # the argmax of the modules' own-class logits
    x, labels = search.images.float_batch(torch.arange(len(search.images)))
    for layer in (0, len(search.structure.conv_groups) - 1):
        group = search.structure.conv_groups[layer]
        for position, ratio in ((0, 0.1), (6, 0.7), (9, 1.0)):
            kept = max(1, int(group.size * ratio))
            mask = torch.zeros(10, group.size, dtype=torch.bool).scatter_(
                1, search.order[group.name][:, :kept], True)
            logits = masked_logits(model, search.structure, {group.name: mask}, x)
            own = logits[torch.arange(10), :, torch.arange(10)].T  # (images, modules)
            expected = 100.0 * float((own.argmax(1) == labels).double().mean())
            # r = 1.0 keeps the layer whole: the base accuracy, a float32 mean as the search's
            assert sweep["accuracy"][group.name][position] == pytest.approx(expected, abs=1e-5)
        assert sweep["accuracy"][group.name][-1] == search.base_accuracy  # kept whole
    assert record["made_from"] == {"weights_sha256": META["weights_sha256"], "seed": 0,
                                   "fitness_samples": 60, "confidence": 0.9, "images": 60}
    groups = list(sweep["accuracy"])
    sensitive, sensitive_ratios, other_ratios = keep_ratios_from_sweep(sweep, groups, hp)
    assert record["derived"]["sensitive_layers"] == [
        g for g, s in zip(groups, sensitive, strict=True) if s]
    assert (record["derived"]["sensitive_keep_ratios"], record["derived"]["other_keep_ratios"]) \
        == (sensitive_ratios, other_ratios)


def _curve(tolerates: float, base: float = 90.0) -> list[float]:
    """Accuracy per swept ratio of a layer within 5 pp of ``base`` from ``tolerates`` on."""
    return [base - (0.5 if r >= tolerates - 1e-9 else 10.0 + 30.0 * (tolerates - r))
            for r in SWEEP_RATIOS]


def test_keep_ratios_follow_the_stated_rule_on_a_synthetic_sweep():
    hp = CNNSplitter().resolve({})  # margin 5 pp, sensitive beyond r = 0.5
    # SimCNN/CIFAR-10-like: the first seven layers need 0.6, the others hold from 0.4
    groups = [f"conv{i}" for i in range(13)]
    sweep = {"base_accuracy": 90.0, "ratios": list(SWEEP_RATIOS),
             "accuracy": {g: _curve(0.6 if i < 7 else 0.4) for i, g in enumerate(groups)}}
    sensitive, sensitive_ratios, other_ratios = keep_ratios_from_sweep(sweep, groups, hp)
    assert sensitive == [True] * 7 + [False] * 6
    assert sensitive_ratios == [0.6, 0.7, 0.8]  # the authors': 0.6, 0.7, 0.8
    assert other_ratios == [0.4, 0.5, 0.6]  # the authors': 0.4 .. 0.7
    # SVHN-like: others hold down to 0.1; the other list is at most four ratios long
    sweep["accuracy"] = {g: _curve(0.4 if i < 7 else 0.1) for i, g in enumerate(groups)}
    sweep["accuracy"]["conv0"] = _curve(0.7)
    sensitive, sensitive_ratios, other_ratios = keep_ratios_from_sweep(sweep, groups, hp)
    assert sensitive == [True] + [False] * 12
    assert sensitive_ratios == [0.7, 0.8, 0.9]
    assert other_ratios == [0.4, 0.5, 0.6, 0.7]  # from the largest other layer's 0.4
    # a dip below the margin at a larger ratio counts: the layer tolerates only above it
    sweep["accuracy"] = {g: _curve(0.2) for g in groups}
    sweep["accuracy"]["conv3"][7] = 80.0  # r = 0.8
    sensitive, sensitive_ratios, other_ratios = keep_ratios_from_sweep(sweep, groups, hp)
    assert sensitive == [False] * 3 + [True] + [False] * 9
    assert sensitive_ratios == [0.9, 1.0]
    assert other_ratios == [0.2, 0.3, 0.4, 0.5]
    # no sensitive layer: the (unused) sensitive list starts above sensitivity_ratio
    sweep["accuracy"] = {g: _curve(0.3) for g in groups}
    assert keep_ratios_from_sweep(sweep, groups, hp) == ([False] * 13, [0.6, 0.7, 0.8],
                                                         [0.3, 0.4, 0.5, 0.6])


def test_a_search_with_keep_ratios_sweep_starts_from_the_derived_ratios(model, small_digits,
                                                                        record):
    hp = {**SEARCH, "keep_ratios": "sweep"}
    with pytest.raises(ConfigError, match=r"layer_sensitivity: keep_ratios 'sweep' needs"):
        run_approach("cnnsplitter", model, META, small_digits, hp, seed=0)
    sweep = sweep_for(record, META, CNNSplitter().resolve(hp), seed=0)
    modules = run_approach("cnnsplitter", model, META, small_digits,
                           {**hp, "layer_sensitivity": sweep}, seed=0)
    derived = record["derived"]
    assert modules.provenance["keep_ratios"] == {"sensitive": derived["sensitive_keep_ratios"],
                                                 "other": derived["other_keep_ratios"]}
    assert modules.provenance["sensitive_layers"] == derived["sensitive_layers"]
    assert modules.provenance["layer_sensitivity"] == sweep["accuracy"]
    # generation 0's solutions keep what the derived lists allow, layer by layer
    listed = run_approach("cnnsplitter", model, META, small_digits, SEARCH, seed=0)
    assert listed.provenance["keep_ratios"] == {"sensitive": [0.6, 0.7, 0.8],
                                                "other": [0.4, 0.5, 0.6, 0.7]}


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, r"seed 0, 1"),
    ({"fitness_samples": 50}, r"fitness_samples 60, 50"),
    ({"weights_sha256": "1" * 64}, r"weights_sha256"),
])
def test_a_sweep_of_another_model_or_other_images_is_refused(record, change, message):
    meta = {**META, "weights_sha256": change.get("weights_sha256", META["weights_sha256"])}
    hp = CNNSplitter().resolve({**SEARCH, "keep_ratios": "sweep",
                                "fitness_samples": change.get("fitness_samples", 60)})
    with pytest.raises(ConfigError, match=message):
        sweep_for(record, meta, hp, seed=change.get("seed", 0))


@pytest.mark.parametrize("overrides, message", [
    ({"keep_ratios": "table"}, r"keep_ratios: must be one of \['listed', 'sweep'\]"),
    ({"layer_sensitivity": {"ratios": [0.5], "accuracy": {}, "base_accuracy": 1.0}},
     r"layer_sensitivity: must be null unless keep_ratios is 'sweep'"),
    ({"keep_ratios": "sweep", "layer_sensitivity": {"ratios": [0.5]}},
     r"layer_sensitivity: expected \{base_accuracy, ratios"),
])
def test_bad_keep_ratio_settings_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CNNSplitter().resolve(overrides)


def _study(keep_ratios: str) -> dict:
    config = copy.deepcopy(TINY)
    config["approaches"] = {"cnnsplitter": {**SEARCH, "fitness_samples": 40}}
    config["modularize"] = [{"approach": "cnnsplitter", "dataset": "digits",
                             "models": ["simcnn"],
                             "hyperparameters": {"keep_ratios": keep_ratios}}]
    return config


def test_the_search_depends_on_the_sweep_step_only_when_it_reads_it(tmp_path):
    project = make_project(tmp_path / "project")
    sweep_path = "results/tiny/modules/digits/simcnn/cnnsplitter/seed0/layer_sensitivity.json"
    for keep_ratios in ("sweep", "listed"):
        configfile = write_config(project, _study(keep_ratios), f"{keep_ratios}.yaml")
        run = snakemake(project, "-n", "-p", "--configfile", configfile)
        assert run.returncode == 0, run.stdout[-3000:]
        search = re.search(r"dnnmod modularize --approach cnnsplitter .*", run.stdout)[0]
        if keep_ratios == "sweep":
            assert re.search(r"rule cnnsplitter_layer_sensitivity:\n(.*\n)*?\s+output: "
                             + re.escape(sweep_path), run.stdout)
            assert re.search(r"dnnmod cnnsplitter-sweep --model \S+/models/digits/simcnn/st/"
                             r"seed0/model.safetensors .*--seed 0 ", run.stdout)
            assert f"--layer-sensitivity {sweep_path} " in search
            sweep_job = run.stdout[run.stdout.index("rule cnnsplitter_layer_sensitivity:"):]
            assert re.search(r"resources: .*gpu=1", sweep_job.split("\n\n")[0])
        else:
            assert "cnnsplitter_layer_sensitivity" not in run.stdout
            assert "--layer-sensitivity" not in search


def test_the_workflow_runs_the_sweep_and_the_search_reads_it(tmp_path):
    project = make_project(tmp_path / "project")
    configfile = write_config(project, _study("sweep"))
    target = "results/tiny/modules/digits/simcnn/cnnsplitter/seed0/modules.safetensors"
    run = snakemake(project, target, "--cores", "1", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    record = read_json(project / target.replace("modules.safetensors",
                                                "layer_sensitivity.json"))
    provenance = ModuleSet.load(project / target).provenance
    assert provenance["keep_ratios"] == {"sensitive": record["derived"]["sensitive_keep_ratios"],
                                         "other": record["derived"]["other_keep_ratios"]}
    assert provenance["hyperparameters"]["layer_sensitivity"] == record["sweep"]
    assert record["made_from"]["images"] == 40

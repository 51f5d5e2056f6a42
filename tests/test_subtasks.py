"""E5 sub-task reuse: sub-task choice, union-network costs without building them, per-sub-task
accuracies from scores computed once against an explicit recomputation per sub-task, the
command line, the table and figure, and a tiny workflow run."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import replace

import pandas as pd
import pytest
import torch
from workflow_helpers import TINY, copy_project, make_project, snakemake, write_config

from dnnmod.approaches import get_approach, run_approach
from dnnmod.cli import main
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.models import build_model
from dnnmod.modules.combination import combination_rule
from dnnmod.modules.extract import count_flops, count_parameters
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.masking import ensure_nonempty
from dnnmod.modules.metrics import module_costs
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.modules.structure import trace_structure
from dnnmod.modules.union import union_masks, union_network
from dnnmod.report.subtasks import read_subtasks
from dnnmod.reuse import subtasks
from dnnmod.reuse.subtasks import (
    COLUMNS,
    KeptChannels,
    UnionCosts,
    check_st_model,
    choose_subsets,
    evaluate_subtasks,
    resolve_settings,
    spread_sample,
)
from dnnmod.training.model_io import load_model
from dnnmod.training.objectives import get_objective
from dnnmod.training.train import Recipe, train


@combination_rule("e5_test_first_output")
def _first_output(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """A rule over (batch, M, k) scores: the highest first output wins."""
    assert scores.dim() == 3
    return classes[scores[..., 0].argmax(dim=1)]


def random_modules(model, seed: int, rate: float = 0.5, positions: bool = False,
                   approach: str = "test", base=None) -> ModuleSet:
    """Random modules of ``model`` for its 10 classes; with ``positions`` the conv groups
    with a traced spatial shape get per-position masks."""
    structure = trace_structure(model)
    generator = torch.Generator().manual_seed(seed)

    def shape(group):
        return group.shape if positions and group.kind == "conv" and len(group.shape) == 3 \
            else (group.size,)

    masks = ensure_nonempty(
        {g.name: torch.rand(10, *shape(g), generator=generator) < rate for g in structure.groups},
        {g.name: torch.rand(10, *shape(g), generator=generator) for g in structure.groups})
    return ModuleSet(approach=approach, classes=list(range(10)), masks=masks,
                     head=OwnLogitHead(list(range(10)), 10), combination="argmax",
                     base=base or {}, structure=structure,
                     provenance={"approach": approach, "hyperparameters": {}, "seed": 0,
                                 "wall_seconds": 0.0})


def trained_simcnn(data, seed: int):
    torch.manual_seed(seed)
    return train(build_model("simcnn", 10, width=0.0625), data,
                 Recipe(epochs=1, batch_size=64, lr=0.05), seed=seed,
                 objective=get_objective("st")).model.eval()


@pytest.fixture(scope="module")
def unit(small_digits):
    """A tiny trained simcnn, its random module set, a second (ST) model, and E5 on them with
    every sub-task and two union networks."""
    model, st_model = trained_simcnn(small_digits, 0), trained_simcnn(small_digits, 1)
    # Named mwt: union networks are reused by MwT's protocol, so they are also fine-tuned (an
    # ST model has no mask generators to remove).
    modules = random_modules(model, seed=2, approach="mwt")
    frame, summary = evaluate_subtasks(model, modules, small_digits,
                                       {"union_subsets": 2, "fine_tune_epochs": 1},
                                       st_model=st_model, seed=0)
    return model, st_model, modules, frame, summary


# ------------------------------------------------------------------------- sub-task choice


def test_every_subset_of_ten_classes_is_a_sub_task():
    chosen, exhaustive = choose_subsets(10, 1013, 10, seed=0)
    assert exhaustive and len(chosen) == len(set(chosen)) == 1013
    for size in range(2, 11):
        assert sum(len(t) == size for t in chosen) == math.comb(10, size)
    assert chosen[0] == (0, 1) and chosen[-1] == tuple(range(10))


def test_beyond_the_cap_subsets_are_a_seeded_sample_per_size():
    chosen, exhaustive = choose_subsets(10, 1012, 5, seed=0)
    assert not exhaustive and len(set(chosen)) == len(chosen)
    assert [sum(len(t) == k for t in chosen) for k in range(2, 11)] == [5] * 8 + [1]
    assert chosen == choose_subsets(10, 1012, 5, seed=0)[0]
    assert chosen != choose_subsets(10, 1012, 5, seed=1)[0]
    hundred, _ = choose_subsets(100, 1013, 3, seed=1)
    assert len(hundred) == 3 * 98 + 1 and len(set(hundred)) == len(hundred)
    assert all(list(t) == sorted(set(t)) and t[0] >= 0 and t[-1] < 100 for t in hundred)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        choose_subsets(1, 1013, 3, seed=0)


def test_union_sample_covers_every_size_first():
    chosen, _ = choose_subsets(10, 1013, 10, seed=0)
    picked = spread_sample(chosen, 12, seed=0)
    assert len(set(picked)) == 12 and picked == spread_sample(chosen, 12, seed=0)
    assert {len(chosen[i]) for i in picked} == set(range(2, 11))
    assert spread_sample(chosen, 0, seed=0) == []


# ------------------------------------------------------------------ union-network costs


@pytest.mark.parametrize("arch, width, positions", [
    ("simcnn", 0.0625, True),    # hidden Linear groups, per-position masks
    ("resnet20", 0.25, False),   # residual couplings, no BatchNorm
    ("mobilenet", 0.125, False),  # depthwise convs
])
def test_union_costs_equal_the_built_union_networks(arch, width, positions):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=width).eval()
    modules = random_modules(model, seed=3, rate=0.3, positions=positions)
    costs, kept = UnionCosts(model, modules.structure), KeptChannels(modules)
    for classes in ([4, 1], [0, 2, 5, 7, 9], list(range(10))):
        network = union_network(model, modules, classes)
        params, flops = costs.counts(kept.union(classes), len(classes))
        assert params == count_parameters(network)
        assert flops == pytest.approx(count_flops(network, modules.structure.input_shape),
                                      rel=1e-9)
    assert costs.fractions(kept.union(range(10)), 10)[0] <= 1.0
    masks = union_masks(modules, [4, 1])
    assert kept.union([4, 1]) == {name: int(mask.flatten(1).any(dim=1).sum()) if mask.dim() > 1
                                  else int(mask.sum()) for name, mask in masks.items()}


@pytest.mark.parametrize("deployed", [False, True])
def test_union_costs_of_an_mwt_model_equal_its_built_union_networks(small_digits, tmp_path,
                                                                    deployed):
    from conftest import train_modular

    from dnnmod.approaches.mwt import without_mask_generators

    _, weights = train_modular("mwt", small_digits, tmp_path)
    model, meta = load_model(weights)  # mask generators wrap the convs
    modules = run_approach("mwt", model, meta, small_digits, {}, seed=0)
    # deployed: as MwT's authors deploy it, without the mask generators, in the network and in
    # the base model (then of the ST model's size)
    reuse = get_approach("mwt").reuse_network if deployed else None
    costs, kept = UnionCosts(model, modules.structure, reuse), KeptChannels(modules)
    if deployed:
        base = without_mask_generators(copy.deepcopy(model))
        assert costs.base_params == count_parameters(base) < count_parameters(model)
    for classes in ([1, 2], [0, 3, 5, 8]):
        network = union_network(model, modules, classes)
        network = reuse(network) if deployed else network
        params, flops = costs.counts(kept.union(classes), len(classes))
        assert params == count_parameters(network)
        assert flops == pytest.approx(count_flops(network, modules.structure.input_shape),
                                      rel=1e-9)


# ------------------------------------------------------------------ per-sub-task accuracy


def _accuracy(predicted, labels) -> float:
    return 100.0 * (predicted == labels).float().mean().item()


def test_rows_equal_an_explicit_recomputation_per_sub_task(unit, small_digits):
    model, st_model, modules, frame, summary = unit
    assert len(frame) == summary["subsets"] == 1013 and summary["exhaustive"]
    assert list(frame.columns) == COLUMNS[COLUMNS.index("subset"):-1]
    costs = module_costs(model, modules)
    for row in frame.sample(6, random_state=0).itertuples():
        classes = [int(c) for c in row.subset.split("-")]
        assert row.size == len(classes)
        test = small_digits.test.subset(classes, relabel=False)
        x, labels = test.float_batch()
        chosen = modules.subset(classes)  # a masked pass of T's modules alone
        assert row.test_images == len(labels)
        assert row.composed_accuracy == pytest.approx(
            _accuracy(chosen.predict(chosen.scores(model, x)), labels))
        index = torch.tensor(classes)
        with torch.no_grad():
            assert row.base_accuracy == pytest.approx(
                _accuracy(index[model(x)[:, index].argmax(1)], labels))
            assert row.st_accuracy == pytest.approx(
                _accuracy(index[st_model(x)[:, index].argmax(1)], labels))
        assert row.separate_params_fraction == pytest.approx(
            sum(costs[c]["size_fraction"] for c in classes))


def test_union_networks_are_built_on_the_sampled_sub_tasks(unit, small_digits):
    model, _, modules, frame, summary = unit
    sampled = frame.dropna(subset=["union_accuracy"])
    assert summary["union_subsets"] == len(sampled) == 2
    assert sorted(sampled["size"]) == [2, 3]  # spread over sizes, smallest first
    assert sampled.finetuned_accuracy.notna().all() and sampled.union_seconds.gt(0).all()
    for row in sampled.itertuples():
        classes = [int(c) for c in row.subset.split("-")]
        network = union_network(model, modules, classes)
        test = small_digits.test.subset(classes)
        x, labels = test.float_batch()
        with torch.no_grad():
            assert row.union_accuracy == pytest.approx(_accuracy(network(x).argmax(1), labels))
        assert row.params_fraction == pytest.approx(
            count_parameters(network) / count_parameters(model))


def test_k_outputs_per_module_go_through_the_combination_rule(unit, small_digits,
                                                              monkeypatch):
    model, _, modules, frame, _ = unit
    paired = replace(modules, combination="e5_test_first_output")
    scores = subtasks.module_scores

    def two_per_module(*args):
        first = scores(*args)
        return torch.stack([first, -first], dim=2)

    monkeypatch.setattr(subtasks, "module_scores", two_per_module)
    settings = {"max_subsets": 40, "samples_per_size": 4}
    by_pairs, _ = evaluate_subtasks(model, paired, small_digits, settings)
    monkeypatch.undo()
    by_scores, _ = evaluate_subtasks(model, modules, small_digits, settings)
    assert len(by_pairs) == 4 * 8 + 1 and by_pairs.st_accuracy.isna().all()
    pd.testing.assert_series_equal(by_pairs.composed_accuracy, by_scores.composed_accuracy)


# ------------------------------------------------------------------------------- bad input


def test_bad_settings_and_models_are_named():
    with pytest.raises(ConfigError, match=r"reuse\.subtasks: unknown keys \['max_subset'\]"):
        resolve_settings({"max_subset": 3})
    with pytest.raises(ConfigError, match=r"reuse\.subtasks\.union_subsets: -1 is out of range"):
        resolve_settings({"union_subsets": -1})
    meta = {"arch": "simcnn", "width": 0.5, "options": {}, "dataset": "digits",
            "num_classes": 10, "seed": 0, "training": "mwt"}
    with pytest.raises(ConfigError, match=r"st\.json: a model of training kind 'mwt'"):
        check_st_model(meta, meta, "st.json")
    with pytest.raises(ConfigError, match="differing: width 0.25 vs 0.5"):
        check_st_model({**meta, "training": "st", "width": 0.25}, meta, "st.json")


def test_a_table_that_is_not_an_e5_table_is_refused(tmp_path):
    (tmp_path / "other.csv").write_text("approach,model\nx,y\n")
    with pytest.raises(ArtifactError, match=r"other\.csv: not an E5 sub-task table, lacks"):
        read_subtasks([tmp_path / "other.csv"])
    with pytest.raises(ArtifactError, match=r"gone\.csv: file not found"):
        read_subtasks([tmp_path / "gone.csv"])


# ------------------------------------------------------------- command line, table, figure


def test_command_line_unit_table_and_figure(small_digits, data_root, tmp_path):
    from conftest import train_modular

    _, weights = train_modular("st", small_digits, tmp_path)
    model, meta = load_model(weights)
    tables = []
    for approach, seed in (("gradsplitter", 4), ("mwt", 5)):
        path = tmp_path / approach / "modules.safetensors"
        path.parent.mkdir()
        random_modules(model, seed, approach=approach,
                       base=base_identity(meta)).save(path)
        out = tmp_path / approach / "subtasks.csv"
        settings = {"max_subsets": 50, "samples_per_size": 2,
                    "union_subsets": 1 if approach == "mwt" else 0, "fine_tune_epochs": 1}
        assert main(["reuse", "subtasks", "--modules", str(path), "--model", str(weights),
                     "--st-model", str(weights), "--settings", json.dumps(settings),
                     "--data-root", str(data_root), "--out", str(out), "--device", "cpu"]) == 0
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["subsets"] == 2 * 8 + 1 and not record["exhaustive"]
        assert record["approach"] == approach and record["device"] == "cpu"
        tables.append(str(out))
    table = tmp_path / "e5.csv"
    assert main(["reuse", "subtasks-table", "--subtasks", *tables, "--out", str(table),
                 "--metrics", str(tmp_path / "e5.json")]) == 0
    result = pd.read_csv(table)
    assert len(result) == 2 * 9 and set(result.approach) == {"gradsplitter", "mwt"}
    assert (result.subsets == [2] * 8 + [1] + [2] * 8 + [1]).all()
    assert result.accuracy_diff_pp.tolist() == pytest.approx(
        (result.composed_accuracy - result.base_accuracy).tolist(), abs=2e-4)  # 4 decimals
    assert result.union_subsets.sum() == 1 and result.union_accuracy.notna().sum() == 1
    assert (tmp_path / "e5_summary.csv").is_file() and (tmp_path / "e5.md").is_file()
    metrics = json.loads((tmp_path / "e5.json").read_text())
    assert set(metrics) == {"digits/simcnn/gradsplitter/seed0", "digits/simcnn/mwt/seed0"}
    assert metrics["digits/simcnn/gradsplitter/seed0"]["union_accuracy"] is None
    figure = tmp_path / "e5.png"
    assert main(["reuse", "subtasks-figure", "--subtasks", *tables, "--out", str(figure)]) == 0
    assert figure.stat().st_size and figure.with_suffix(".pdf").stat().st_size


# ----------------------------------------------------------------------------- workflow


@pytest.mark.slow
def test_tiny_workflow_makes_the_e5_table_and_figure(tiny_study, tmp_path):
    project = copy_project(tiny_study, tmp_path / "project")  # digits and its model: done
    config = {**TINY, "reuse": {"subtasks": {
        "max_subsets": 30, "samples_per_size": 2, "union_approaches": ["gradsplitter"],
        "union_subsets": 1, "fine_tune_epochs": 1}}}
    configfile = write_config(project, config)
    targets = ["results/tiny/tables/e5_subtask_reuse.csv",
               "results/tiny/figures/e5_subtask_reuse.png"]
    run = snakemake(project, *targets, "--cores", "2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    table = pd.read_csv(project / targets[0])
    assert set(table.approach) == {"gradsplitter", "random_gradsplitter"} and len(table) == 2 * 9
    assert table[table.approach == "random_gradsplitter"].union_subsets.sum() == 0
    assert table[table.approach == "gradsplitter"].union_subsets.sum() == 1
    assert (project / "results/tiny/figures/e5_subtask_reuse.pdf").stat().st_size
    assert (project / "results/tiny/metrics/e5_subtask_reuse.json").is_file()
    unit = project / "results/tiny/reuse/subtasks/digits/simcnn/gradsplitter/seed0"
    assert len(pd.read_csv(unit / "subtasks.csv")) == 2 * 8 + 1
    assert (project / "results/tiny/logs/subtasks/digits/simcnn/gradsplitter").is_dir()
    dry = snakemake(project, *targets, "-n", "--configfile", configfile)
    assert "Nothing to be done" in dry.stdout


def test_e5_reuses_only_the_module_sets_of_the_filtered_datasets(tmp_path):
    project = make_project(tmp_path / "project")
    config = {**TINY, "datasets": {"digits": {}, "shapes": {}},
              "base_models": [*TINY["base_models"],
                              {"dataset": "shapes", "models": ["simcnn"], "recipe": "tiny"}],
              "modularize": [*TINY["modularize"],
                             {"approach": "gradsplitter", "dataset": "shapes",
                              "models": ["simcnn"]}],
              "reuse": {"subtasks": {"datasets": ["digits"]}}}
    run = snakemake(project, "-n", "--configfile", write_config(project, config))
    assert run.returncode == 0, run.stdout[-3000:]
    units = re.findall(r"results/tiny/reuse/subtasks/(\w+)/simcnn/(\w+)/seed0/subtasks\.csv",
                       run.stdout)
    assert set(units) == {("digits", "gradsplitter"), ("digits", "random_gradsplitter")}


@pytest.mark.parametrize("key, names, error", [
    ("models", ["simcnn", "lenet99"], "reuse.subtasks.models: unknown models ['lenet99']"),
    ("datasets", ["digits", "nope"], "reuse.subtasks.datasets: unknown datasets ['nope']"),
])
def test_e5_filters_must_name_configured_models_and_datasets(tmp_path, key, names, error):
    project = make_project(tmp_path / "project")
    config = {**TINY, "reuse": {"subtasks": {key: names}}}
    run = snakemake(project, "-n", "--configfile", write_config(project, config))
    assert run.returncode != 0
    assert error in run.stdout

"""E6 replacement: swapping one class's module between two module sets of one dataset."""

from __future__ import annotations

import json

import pytest
import torch

from dnnmod.approaches import run_approach
from dnnmod.cli import main
from dnnmod.errors import ConfigError
from dnnmod.models import build_model
from dnnmod.modules.combination import combine_scores
from dnnmod.modules.compose import ComposedModel, ComposedPart
from dnnmod.report.replacement import replacement_table
from dnnmod.reuse.replacement import replace_modules, replacement_scores
from dnnmod.training.model_io import load_model, save_model
from dnnmod.training.objectives import get_objective
from dnnmod.training.train import Recipe, train

WIDTHS = {"resnet20": 0.25, "simcnn": 0.0625}


@pytest.fixture(scope="session")
def trained_model(small_digits, tmp_path_factory):
    """``get(arch, epochs)``: the path of a tiny model trained that long on small digits,
    with the metadata the CLI writes; built on first use. The resnet20 keeps its BatchNorm:
    without it a tiny one learns nothing in a few hundred steps (the paper's BatchNorm-free
    models are trained by the demo), and masks must then act after the norm, the harder case."""
    paths = {}

    def get(arch: str, epochs: int):
        if (arch, epochs) not in paths:
            torch.manual_seed(0)
            model = build_model(arch, 10, WIDTHS[arch])
            objective = get_objective("st")
            result = train(model, small_digits, Recipe(epochs=epochs, batch_size=32, lr=0.05),
                           seed=0, objective=objective)
            path = tmp_path_factory.mktemp(f"{arch}_{epochs}") / "model.safetensors"
            save_model(path, result.model, {
                "arch": arch, "model": f"{arch}_{epochs}", "dataset": "digits",
                "num_classes": 10, "width": WIDTHS[arch], "options": {},
                "training": "st", "objective": objective.hyperparameters, "seed": 0,
                "normalization": {"mean": small_digits.train.mean.tolist(),
                                  "std": small_digits.train.std.tolist()},
                "input_shape": list(small_digits.test.images.shape[1:]),
                "metrics": {"test_accuracy": 0.0}, "wall_seconds": 0.0})
            paths[arch, epochs] = path
        return paths[arch, epochs]

    return get


@pytest.fixture(scope="module")
def pair(trained_model, small_digits, tmp_path_factory):
    """(model, meta, modules, modules path) of a weaker (1 epoch) and a stronger (4 epochs)
    resnet20."""
    folder = tmp_path_factory.mktemp("pair")
    sides = []
    for epochs in (1, 4):
        model, meta = load_model(trained_model("resnet20", epochs))
        modules = run_approach("pan_rajan", model, meta, small_digits, {}, seed=0)
        path = folder / f"modules_{epochs}.safetensors"
        modules.save(path)
        sides.append((model, meta, modules, path))
    return sides


def test_each_swap_is_the_composition_of_its_parts(pair, small_digits):
    (weak, _, weak_modules, _), (strong, _, strong_modules, _) = pair
    # three classes keep the extractions few; the swap logic does not depend on N
    weak_modules, strong_modules = weak_modules.subset([2, 4, 7]), strong_modules.subset([2, 4, 7])
    test = small_digits.test.take(range(40))
    scores = replacement_scores((weak, weak_modules), (strong, strong_modules), test)
    assert scores.shape == (40, 6, 2)
    parts = [ComposedPart(weak, weak_modules, 2), ComposedPart(strong, strong_modules, 4),
             ComposedPart(weak, weak_modules, 7)]
    direct = ComposedModel.from_parts(parts, "voting")
    x, _ = test.unit_batch()
    columns = [0, 4, 2]  # weaker's 2, stronger's 4, weaker's 7
    assert torch.allclose(direct(x), scores[:, columns], atol=1e-5)
    assert torch.equal(direct.predict(x), combine_scores("voting", scores[:, columns], [0, 1, 2]))


def test_mismatched_module_sets_are_refused(pair, trained_model, small_digits):
    (weak, _, weak_modules, _), _ = pair
    model, meta = load_model(trained_model("simcnn", 1))
    other = run_approach("moda", model, meta, small_digits, {}, seed=0)
    with pytest.raises(ConfigError, match="combine by 'voting' and 'argmax'"):
        replace_modules((weak, weak_modules), (model, other), small_digits.test)
    subset = weak_modules.subset([0, 1, 2])
    with pytest.raises(ConfigError, match="same classes"):
        replace_modules((weak, weak_modules), (weak, subset), small_digits.test)


def test_cli_record_table_and_figure(pair, trained_model, data_root, tmp_path):
    """One real E6 unit through the command line: every swap and the baselines measured,
    then the table (published beside) and the figure."""
    (_, _, _, weak_path), (_, _, _, strong_path) = pair
    record = tmp_path / "records" / "seed0.json"
    assert main(["reuse", "replace", "--weaker-model", str(trained_model("resnet20", 1)),
                 "--weaker-modules", str(weak_path),
                 "--stronger-model", str(trained_model("resnet20", 4)),
                 "--stronger-modules", str(strong_path), "--data-root", str(data_root),
                 "--device", "cpu", "--out", str(record)]) == 0
    content = json.loads(record.read_text())
    assert content["weaker"]["model"] == "resnet20_1" and content["approach"] == "pan_rajan"
    assert [row["swapped_class"] for row in content["rows"]] == list(range(10))
    assert content["stronger_model_top1"] > content["weaker_model_top1"]
    assert all(0 <= row["top1"] <= row["top5"] <= 100 for row in content["rows"])
    table = replacement_table([content])
    assert set(table.published_mean_top1_change_pp) == {1.1}
    assert (table.top1_change_pp == table.top1 - table.weaker_composed_top1).all()
    csv = tmp_path / "tables" / "e6_replacement.csv"
    assert main(["reuse", "replace-table", "--records", str(record), "--out", str(csv),
                 "--summary", str(tmp_path / "e6.json")]) == 0
    assert csv.is_file() and csv.with_suffix(".md").is_file()
    assert "digits/pan_rajan/resnet20_1_by_resnet20_4/seed0" in (tmp_path / "e6.json").read_text()
    figure = tmp_path / "figures" / "e6_replacement.png"
    assert main(["reuse", "replace-figure", "--records", str(record), "--out",
                 str(figure)]) == 0
    assert figure.stat().st_size > 0 and figure.with_suffix(".pdf").is_file()


def test_workflow_wires_table_1_and_e6_and_checks_the_pairs(tmp_path):
    from workflow_helpers import TINY, make_project, snakemake, write_config

    project = make_project(tmp_path / "project")
    study = {**TINY,
             "models": {**TINY["models"], "simcnn_weak": TINY["models"]["simcnn"]},
             "base_models": [*TINY["base_models"], {"dataset": "digits",
                                                    "models": ["simcnn_weak"],
                                                    "recipe": "tiny"}],
             "modularize": [{"approach": "pan_rajan", "dataset": "digits",
                             "models": ["simcnn", "simcnn_weak"]}],
             "reuse": {"replacement": {"pairs": [{"dataset": "digits", "weaker": "simcnn_weak",
                                                  "stronger": "simcnn"}]}}}
    run = snakemake(project, "-n", "--configfile", write_config(project, study))
    assert run.returncode == 0, run.stdout[-3000:]
    for target in ("tables/pan_rajan_decomposition.csv", "tables/e6_replacement.csv",
                   "figures/e6_replacement.png",
                   "reuse/replacement/digits/pan_rajan/simcnn_weak/simcnn/seed0.json"):
        assert f"results/tiny/{target}" in run.stdout
    study["modularize"][0]["models"] = ["simcnn"]
    run = snakemake(project, "-n", "--configfile", write_config(project, study))
    assert run.returncode != 0
    assert "reuse.replacement.pairs[0].weaker: no modularize entry makes pan_rajan modules of " \
           "simcnn_weak on digits" in run.stdout

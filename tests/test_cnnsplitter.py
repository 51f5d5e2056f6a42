"""CNNSplitter: genes, initialisation, composition fitness, batched evaluation, resume."""

from __future__ import annotations

import copy
import math

import deap.creator
import numpy as np
import pytest
import torch
from conftest import Interrupted

import dnnmod.resumable
from dnnmod.approaches import run_approach
from dnnmod.approaches.cnnsplitter import (
    CNNSplitter,
    gene_layout,
    genes_for,
    initial_genes,
    jaccard_difference,
    population_logits,
    rank_weights,
    score_compositions,
)
from dnnmod.errors import ConfigError
from dnnmod.models import build_model
from dnnmod.modules.extract import extract_module
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.inference import kept_channel_pass, run
from dnnmod.modules.structure import trace_structure

TINY = {"population": 4, "generations": 2, "parents": 2, "elites": 1, "survivors": [4, 6],
        "fitness_samples": 40}
META = {"arch": "simcnn", "dataset": "digits", "num_classes": 10, "width": 0.0625}


@pytest.fixture(scope="module")
def model(small_simcnn):
    return copy.deepcopy(small_simcnn)


@pytest.fixture(scope="module")
def uninterrupted(model, small_digits):
    return run_approach("cnnsplitter", model, META, small_digits, TINY, seed=0)


def _structure(net, data):
    return trace_structure(net, (1, *data.train.images.shape[1:]))


def _identity_order(structure, classes):
    return {g.name: torch.arange(g.size).expand(classes, -1).contiguous()
            for g in structure.conv_groups}


def test_genes_cut_ranked_kernels_into_contiguous_groups():
    hp = CNNSplitter().resolve({})
    assert [genes_for(n, hp) for n in (4, 10, 64, 255, 256, 512)] == [4, 10, 10, 10, 100, 100]
    net = build_model("vgg16", 10, width=0.5)  # sizes 32 .. 256: both gene counts
    structure = trace_structure(net, (1, 3, 32, 32))
    generator = torch.Generator().manual_seed(0)
    order = {g.name: torch.stack([torch.randperm(g.size, generator=generator)
                                  for _ in range(2)]) for g in structure.conv_groups}
    layout = gene_layout(structure, order, hp)
    assert layout.genes_per_group == tuple(genes_for(g.size, hp) for g in structure.conv_groups)
    assert 100 in layout.genes_per_group and 10 in layout.genes_per_group
    for group, where in zip(structure.conv_groups, layout.layer_slices(), strict=True):
        for c in range(2):
            genes_by_rank = layout.kernel_gene[group.name][c][order[group.name][c]]
            # ranks in order map to non-decreasing genes of this layer, sizes differing by <= 1
            assert (genes_by_rank.diff() >= 0).all()
            sizes = torch.bincount(genes_by_rank - where.start)
            assert len(sizes) == where.stop - where.start and sizes.max() - sizes.min() <= 1


def test_coupled_layers_share_one_gene_layer():
    net = build_model("resnet20", 10, width=0.25)
    structure = trace_structure(net, (1, 3, 32, 32))
    coupled = [g for g in structure.conv_groups if len(g.convs) > 1]
    assert coupled, "resnet20's residual stages couple convs"
    hp = CNNSplitter().resolve({})
    layout = gene_layout(structure, _identity_order(structure, 3), hp)
    assert layout.groups == tuple(g.name for g in structure.conv_groups)
    genes = torch.zeros(1, layout.length, dtype=torch.uint8)
    first = layout.groups.index(coupled[0].name)
    genes[0, layout.layer_slices()[first].start] = 1
    decoded = layout.decode(genes, 0)
    assert decoded[coupled[0].name].sum() == math.ceil(coupled[0].size / 10)


def test_heuristic_initialisation_prefers_important_groups():
    weights = rank_weights(10)
    assert np.isclose(weights.sum(), 1.0)
    assert np.allclose(weights[:-1] / weights[1:], math.exp(0.1))
    net = build_model("simcnn", 10, width=0.25)
    structure = trace_structure(net, (1, 3, 32, 32))
    hp = CNNSplitter().resolve({"sensitive_keep_ratios": [0.8], "other_keep_ratios": [0.4]})
    layout = gene_layout(structure, _identity_order(structure, 1), hp)
    sensitive = [layer % 2 == 0 for layer in range(len(layout.groups))]
    genes = initial_genes(layout, sensitive, 2000, hp, np.random.default_rng(0))
    for layer, (where, count) in enumerate(zip(layout.layer_slices(), layout.genes_per_group,
                                               strict=True)):
        active = genes[:, where].sum(1)
        assert (active == math.floor(count * (0.8 if sensitive[layer] else 0.4))).all()
    frequency = genes[:, layout.layer_slices()[1]].double().mean(0)
    assert frequency[0] > frequency[-1] + 0.05
    assert (frequency.diff() < 0.03).all()  # roughly decreasing with rank
    uniform = initial_genes(layout, sensitive, 2000, {**hp, "initialisation": "random"},
                            np.random.default_rng(0))
    assert abs(uniform.double().mean().item() - 0.5) < 0.02


def test_jaccard_difference():
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.allclose(jaccard_difference(a, b), torch.tensor([[2 / 3, 0.0]],
                                                                  dtype=torch.float64))


PRUNING = {"accuracy_weight": 1.2, "alpha": 0.9, "accuracy_thresholds": [0.95],
           "final_accuracy_threshold": 0.8}


def test_hierarchical_pruning_keeps_the_most_accurate_compositions():
    classes, population = 4, 3
    labels = torch.arange(classes).repeat_interleave(2)
    logits = []
    for c in range(classes):
        perfect = (labels == c).float()  # 1 on its own images, 0 elsewhere: always right
        logits.append(torch.stack([perfect, torch.full_like(perfect, 1.5),
                                   torch.full_like(perfect, -1.0)]))
    kernels = [torch.ones(population, 4, dtype=torch.bool)] * classes
    scores = score_compositions(logits, labels, kernels, survivors=[81, 81], **PRUNING)
    assert scores.solutions.shape == (81, 4)  # nothing pruned: 9 x 9 full compositions
    assert scores.solutions[0].tolist() == [0, 0, 0, 0] and scores.accuracy[0] == 1.0
    assert torch.equal(scores.fitness_of, torch.sort(scores.fitness_of, descending=True).values)
    assert (scores.fitness[:, 0] == torch.tensor([4.0, 1.2], dtype=torch.float64)).all()
    assert (scores.fitness[:, 1:, 1] < 1.2).all()
    assert torch.equal(scores.difference, torch.zeros(81, dtype=torch.float64))

    pruned = score_compositions(logits, labels, kernels, survivors=[1, 1], **PRUNING)
    assert pruned.solutions.tolist() == [[0, 0, 0, 0]]
    # solutions in no surviving composition rank below every member of one: fitness 0, as in
    # the reference
    assert (pruned.fitness[:, 0, 0] == 4).all() and (pruned.fitness[:, 1:] == 0).all()


def test_accuracy_decides_survival_and_fitness_orders_the_survivors():
    """A pair level where kernel-set difference would favour a less accurate composition: the
    most accurate survive, and the previous best composition survives every level."""
    labels = torch.arange(2).repeat_interleave(4)
    right = [(labels == c).float() for c in range(2)]
    # class 0: solution 0 always right, solution 1 right on half of class 0's images
    half = right[0].clone()
    half[:2] = -1.0
    logits = [torch.stack([right[0], half]), torch.stack([right[1], right[1]])]
    kernels = [torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool),
               torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)]
    weights = {"accuracy_weight": 0.9, "alpha": 0.0, "accuracy_thresholds": [0.95],
               "final_accuracy_threshold": 0.95}  # alpha 0: difference weighs as accuracy
    scores = score_compositions(logits, labels, kernels, survivors=[1, 4], **weights)
    # the fittest composition overall ([1, 1]: 0.75 accurate, difference 1) is pruned
    assert scores.solutions.tolist() == [[0, 1], [0, 0]]
    assert scores.accuracy.tolist() == [1.0, 1.0]
    carried = score_compositions(logits, labels, kernels, survivors=[1, 1], carried=[1, 0],
                                 **weights)
    assert [1, 0] in carried.solutions.tolist()


def test_composition_difference_is_the_mean_pairwise_jaccard_difference():
    labels = torch.arange(3)
    logits = [(labels == c).float()[None] for c in range(3)]  # one solution per class
    kernels = [torch.tensor([[1, 1, 0, 0]]), torch.tensor([[0, 1, 1, 0]]),
               torch.tensor([[0, 0, 0, 1]])]  # differences 2/3, 1, 1
    scores = score_compositions(logits, labels, [k.bool() for k in kernels],
                                accuracy_weight=0.9, alpha=0.9, accuracy_thresholds=[0.95],
                                final_accuracy_threshold=0.8, survivors=[5, 5])
    assert math.isclose(scores.difference.item(), 8 / 9)
    assert math.isclose(scores.fitness[0, 0, 1].item(), 0.9 + 0.1 * 8 / 9)


@pytest.mark.parametrize("execution", ["batched", "kept"])
def test_population_logits_equal_extracted_modules(model, small_digits, execution):
    structure = _structure(model, small_digits)
    hp = CNNSplitter().resolve({})
    generator = torch.Generator().manual_seed(1)
    order = {g.name: torch.stack([torch.randperm(g.size, generator=generator)
                                  for _ in range(10)]) for g in structure.conv_groups}
    layout = gene_layout(structure, order, hp)
    populations = torch.randint(0, 2, (10, 3, layout.length), generator=generator,
                                dtype=torch.uint8)
    populations[:, :, [where.start for where in layout.layer_slices()]] = 1
    images = small_digits.val.take(range(24))
    kept_pass = kept_channel_pass(model, structure) if execution == "kept" else None
    assert execution == "batched" or kept_pass is not None
    logits, evaluated = population_logits(model, structure, images, layout, populations,
                                          [{} for _ in range(10)], kept_pass)
    assert evaluated == 30 and logits.shape == (10, 3, 24)
    for c in (0, 7):
        for p in range(3):
            keep = {g: m[0] for g, m in layout.decode(populations[c, p:p + 1], c).items()}
            module = extract_module(model, structure, keep)
            expected = run(module, images)[:, c]
            assert torch.allclose(logits[c, p], expected, atol=1e-5)


def test_resumes_after_a_kill_with_the_same_result(model, small_digits, uninterrupted,
                                                   tmp_path, interrupt_after_epoch):
    checkpoint = tmp_path / "resume.pt"
    undo = interrupt_after_epoch(dnnmod.resumable, 1)
    with pytest.raises(Interrupted):
        run_approach("cnnsplitter", model, META, small_digits, TINY, seed=0,
                     checkpoint=checkpoint)
    undo.undo()
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["step"] == 1 and stored["state"]["populations"].shape[:2] == (10, 4)
    resumed = run_approach("cnnsplitter", model, META, small_digits, TINY, seed=0,
                           checkpoint=checkpoint)
    assert all(torch.equal(resumed.masks[g], uninterrupted.masks[g])
               for g in uninterrupted.masks)
    assert resumed.provenance["logbook"] == uninterrupted.provenance["logbook"]
    assert len(resumed.provenance["logbook"]) == TINY["generations"] + 1


def test_runs_are_seeded_and_leave_deap_creator_alone(model, small_digits, uninterrupted):
    before = set(vars(deap.creator))
    random_ablation = {**TINY, "grouping": "random", "initialisation": "random",
                       "mutation_rate": 0.2}
    first = uninterrupted
    other = run_approach("cnnsplitter", model, META, small_digits, random_ablation, seed=0)
    again = run_approach("cnnsplitter", model, META, small_digits, TINY, seed=0)
    assert set(vars(deap.creator)) == before
    assert all(torch.equal(first.masks[g], again.masks[g]) for g in first.masks)
    assert any(not torch.equal(first.masks[g], other.masks[g]) for g in first.masks)
    assert other.provenance["layer_sensitivity"] == {}
    record = first.provenance["logbook"][-1]
    assert {"generation", "fitness_mean", "fitness_max", "val_accuracy", "krr"} <= set(record)


def test_generation_is_selected_on_validation_images_the_search_did_not_score(
        model, small_digits, uninterrupted):
    fitness_images, held_out = small_digits.val.sample_and_rest(TINY["fitness_samples"], 0)
    order = torch.randperm(160, generator=torch.Generator().manual_seed(0))
    assert len(small_digits.val) == 160  # fitness images and held-out ones partition it
    assert torch.equal(fitness_images.images,
                       small_digits.val.take(order[:40].sort().values).images)
    assert torch.equal(held_out.images, small_digits.val.take(order[40:].sort().values).images)
    provenance = uninterrupted.provenance
    assert provenance["fitness_samples"] == 40 and provenance["selection_samples"] == 120
    records = provenance["logbook"]
    selected = provenance["selected_generation"]
    alpha = CNNSplitter().resolve(TINY)["alpha"]
    expected = [alpha * r["selection_accuracy"] / 100 + (1 - alpha) * r["difference"]
                for r in records]
    assert [r["selection"] for r in records] == pytest.approx(expected)
    assert selected == max(range(len(records)), key=lambda g: records[g]["selection"])
    # The selected composition's accuracy on the held-out images, from extracted modules.
    structure = uninterrupted.structure
    classes = uninterrupted.classes
    own_logits = torch.stack([
        run(extract_module(model, structure, {g: m[c] for g, m in uninterrupted.masks.items()}),
            held_out)[:, c] for c in classes], dim=1)
    accuracy = 100 * (own_logits.argmax(1) == held_out.labels).float().mean().item()
    assert records[selected]["selection_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    scores = run(model, held_out, structure=structure, masks=uninterrupted.masks,
                 head=OwnLogitHead(classes, len(classes)))
    assert torch.equal(scores.argmax(1), own_logits.argmax(1))


def test_whole_validation_split_scores_and_selects_alike(model, small_digits):
    result = run_approach("cnnsplitter", model, META, small_digits,
                          {**TINY, "generations": 1, "fitness_samples": None}, seed=0)
    records = result.provenance["logbook"]
    assert result.provenance["selection_samples"] == result.provenance["fitness_samples"] == 160
    assert all(r["selection_accuracy"] == r["val_accuracy"] for r in records)


@pytest.mark.parametrize(("override", "key"), [
    ({"parents": 1}, "parents"), ({"elites": 6}, "elites"), ({"survivors": [5, 2]}, "survivors"),
    ({"grouping": "kmeans"}, "grouping"), ({"other_keep_ratios": [1.5]}, "other_keep_ratios"),
    ({"fitness_samples": 0}, "fitness_samples"),
    ({"selection_samples": True}, "selection_samples"),
    ({"selection_samples": 100}, "selection_samples"),
    ({"accuracy_thresholds": []}, "accuracy_thresholds"),
    ({"final_accuracy_threshold": 80}, "final_accuracy_threshold"),
])
def test_bad_hyperparameters_name_their_key(override, key):
    # A value of the wrong type fails the type check ("expected int"), others their range.
    with pytest.raises(ConfigError, match=rf"approaches\.cnnsplitter\.{key}: (must be|expected)"):
        CNNSplitter().resolve({"population": 6, "parents": 4, "elites": 2, **override})


def test_the_generation_is_selected_among_the_searched_ones(model, small_digits):
    # The authors' code never selects generation 0 (the initial population) once a generation
    # was searched; with none searched, generation 0 is the result.
    searched = run_approach("cnnsplitter", model, META, small_digits,
                            {**TINY, "generations": 2}, seed=0)
    assert len(searched.provenance["logbook"]) == 3
    assert searched.provenance["selected_generation"] in (1, 2)
    unsearched = run_approach("cnnsplitter", model, META, small_digits,
                              {**TINY, "generations": 0}, seed=0)
    assert unsearched.provenance["selected_generation"] == 0

"""CNNSplitter's search loop as its authors' recorder runs it: the accuracy weight is α in
generation 0, and the classes are composed in a new shuffled order every generation."""

from __future__ import annotations

import itertools

import pytest
import torch

from dnnmod.approaches import cnnsplitter, run_approach
from dnnmod.approaches.cnnsplitter import score_compositions, score_in_class_order
from dnnmod.models import build_model
from dnnmod.training.train import Recipe, train

SETTINGS = {"accuracy_weight": 1.0, "alpha": 0.9, "accuracy_thresholds": [0.5],
            "final_accuracy_threshold": 0.5, "survivors": [3, 6]}
SEARCH = {"population": 4, "generations": 3, "parents": 2, "elites": 1, "survivors": [4, 6],
          "fitness_samples": 40}
META = {"arch": "simcnn", "dataset": "digits", "num_classes": 10, "width": 0.0625}
SCORING = cnnsplitter.score_in_class_order  # the search calls it through the module


def scores_inputs(classes=5, population=4, images=60):
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(population, images, generator=generator) for _ in range(classes)]
    labels = torch.arange(images) % classes
    kernel_sets = [torch.rand(population, 12, generator=generator) < 0.6
                   for _ in range(classes)]
    return logits, labels, kernel_sets


def composed_accuracy(logits, labels, members) -> float:
    """Accuracy of one solution per class composed by argmax (a tie is a miss)."""
    stacked = torch.stack([logits[c][members[c]] for c in range(len(logits))])
    true = stacked.gather(0, labels[None])[0]
    stacked[labels, torch.arange(len(labels))] = -torch.inf
    return (true > stacked.amax(0)).double().mean().item()


@pytest.mark.parametrize("class_order", [[0, 1, 2, 3, 4], [3, 0, 4, 2, 1], [4, 3, 2, 1, 0]])
def test_scores_of_a_shuffled_order_come_back_by_class(class_order):
    logits, labels, kernel_sets = scores_inputs()
    scores = score_in_class_order(class_order, logits, labels, kernel_sets,
                                  carried=[1, 2, 3, 0, 1], **SETTINGS)
    assert scores.fitness.shape == (5, 4, 2) and scores.solutions.shape[1] == 5
    for members, accuracy in zip(scores.solutions, scores.accuracy, strict=True):
        assert composed_accuracy(logits, labels, members) == pytest.approx(float(accuracy))
    # the carried composition (one solution per class, by class) survives every level
    assert any(members.tolist() == [1, 2, 3, 0, 1] for members in scores.solutions)
    # a solution's fitness is that of the best surviving composition it is in
    for c, p in itertools.product(range(5), range(4)):
        containing = scores.fitness_of[scores.solutions[:, c] == p]
        if len(containing):
            assert scores.fitness[c, p, 1] == pytest.approx(float(containing.max()))
    if class_order == sorted(class_order):
        direct = score_compositions(logits, labels, kernel_sets, carried=[1, 2, 3, 0, 1],
                                    **SETTINGS)
        assert torch.equal(direct.solutions, scores.solutions)
        assert torch.equal(direct.fitness, scores.fitness)


@pytest.fixture(scope="module")
def model(small_digits):
    torch.manual_seed(0)
    net = build_model("simcnn", small_digits.num_classes, width=0.0625)
    return train(net, small_digits, Recipe(epochs=1, batch_size=64, lr=0.05), seed=0).model


def recorded_search(model, data, monkeypatch) -> tuple[list, list, dict]:
    calls = []

    def recording(class_order, *args, **kwargs):
        calls.append((list(class_order), kwargs["accuracy_weight"]))
        return SCORING(class_order, *args, **kwargs)

    monkeypatch.setattr(cnnsplitter, "score_in_class_order", recording)
    modules = run_approach("cnnsplitter", model, META, data, SEARCH, seed=0)
    return [order for order, _ in calls], [weight for _, weight in calls], modules.provenance


def test_generation_zero_weighs_accuracy_by_alpha_then_by_the_gap_to_gamma(
        model, small_digits, monkeypatch):
    _, weights, provenance = recorded_search(model, small_digits, monkeypatch)
    alpha, gamma = 0.9, 0.9  # the reference's (the approach's defaults)
    accuracies = [record["val_accuracy"] / 100 for record in provenance["logbook"]]
    assert len(weights) == SEARCH["generations"] + 1
    assert weights[0] == alpha
    for generation in range(1, len(weights)):
        assert weights[generation] == pytest.approx(
            alpha + max(0.0, gamma - accuracies[generation - 1]))


def test_classes_are_shuffled_every_generation_and_seeded(model, small_digits, monkeypatch):
    orders, _, _ = recorded_search(model, small_digits, monkeypatch)
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert len({tuple(order) for order in orders}) == len(orders)  # a new order each time
    again, _, _ = recorded_search(model, small_digits, monkeypatch)
    assert again == orders

"""dnnmod's own precision/recall/F1 and top-k accuracy give scikit-learn's floats to the bit.

They replace scikit-learn's functions so that the jobs computing them (module evaluation, E3,
E4, Pan & Rajan's decomposition) do not import scikit-learn; the results they record must not
change by a bit.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

from dnnmod.errors import ConfigError
from dnnmod.modules.metrics import binary_prf, top_k_accuracy


def _cases():
    generator = np.random.default_rng(0)
    for size in (1, 2, 7, 100, 1013):
        for rate in (0.0, 0.03, 0.5, 1.0):
            truth = generator.random(size) < rate
            claimed = generator.random(size) < generator.random()
            yield truth, claimed
            yield truth, truth.copy()
            yield truth, ~truth
    yield np.zeros(5, dtype=bool), np.zeros(5, dtype=bool)  # every quotient undefined


@pytest.mark.parametrize("as_tensor", [False, True])
def test_binary_prf_is_scikit_learns(as_tensor):
    for truth, claimed in _cases():
        expected = precision_recall_fscore_support(
            truth, claimed, average="binary", zero_division=0
        )[:3]
        args = (
            (torch.from_numpy(truth), torch.from_numpy(claimed)) if as_tensor else (truth, claimed)
        )
        got = binary_prf(*args)
        assert [float(x).hex() for x in got] == [float(x).hex() for x in expected]


def test_top_k_accuracy_is_scikit_learns():
    generator = np.random.default_rng(1)
    for classes, samples in ((3, 50), (10, 1000), (12, 7)):
        labels = torch.from_numpy(generator.integers(0, classes, samples))
        # coarse scores: many ties, which scikit-learn breaks by class order
        for scores in (
            torch.from_numpy(generator.random((samples, classes))),
            torch.from_numpy(generator.integers(0, 3, (samples, classes))).float(),
        ):
            for k in range(1, classes):
                class_ids = list(range(100, 100 + classes))
                expected = 100.0 * top_k_accuracy_score(
                    labels.numpy(), scores.double().numpy(), k=k, labels=list(range(classes))
                )
                got = top_k_accuracy(scores, class_ids, labels + 100, k)
                assert got.hex() == expected.hex(), (classes, k)
    # Pan & Rajan's votes (samples, M, 2) rank by their first column
    votes = torch.from_numpy(generator.random((40, 6, 2)))
    labels = torch.from_numpy(generator.integers(0, 6, 40))
    assert top_k_accuracy(votes, list(range(6)), labels, 2) == top_k_accuracy(
        votes[..., 0], list(range(6)), labels, 2
    )


def test_top_k_accuracy_refuses_non_finite_scores():
    scores = torch.zeros(4, 6)
    scores[1, 2] = float("nan")
    with pytest.raises(ConfigError, match="not all finite"):
        top_k_accuracy(scores, list(range(6)), torch.tensor([0, 1, 2, 3]), 2)


def test_metric_jobs_import_no_scikit_learn():
    """What module evaluation, E3's and E4's jobs import to compute their metrics."""
    probe = """
import sys
import torch
import dnnmod.approaches, dnnmod.data, dnnmod.modules.moduleset, dnnmod.training.model_io
import dnnmod.reuse.newtask, dnnmod.reuse.patching
from dnnmod.modules.metrics import binary_prf, top_k_accuracy
from dnnmod.reuse.patch_scores import target_metrics
binary_prf(torch.tensor([True, False]), torch.tensor([True, True]))
top_k_accuracy(torch.rand(3, 6), list(range(6)), torch.tensor([0, 1, 2]), 2)
target_metrics(torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0]), 1)
print(sorted({name.split('.')[0] for name in sys.modules} & {'sklearn', 'scipy'}))
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"

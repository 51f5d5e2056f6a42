"""A modular training step's forward pass, loss and backward pass compile as one graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnnmod.training.objectives import get_objective
from dnnmod.training.train import Recipe, Trainer


def tiny_cnn() -> nn.Module:
    """Three conv-BatchNorm-ReLU layers: MwT gates two, MODA reads three ReLUs. The zoo's
    smallest model has 13 convs, which inductor takes minutes to compile on 2 cores."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize("kind", ["mwt", "moda"])
def test_forward_loss_and_backward_compile_as_one_graph(kind):
    """``torch.compile(trainer.backward, fullgraph=True)``: one graph (fullgraph fails on any
    break), forward and backward traced by AOTAutograd (MODA's pair terms, an autograd.Function,
    included), giving the eager step's loss, parts and gradients. The optimizer's update is not
    in it: Optimizer.step breaks a compiled graph on purpose.

    Backend ``aot_eager``: the same capture as inductor's (dynamo's graph, AOTAutograd's
    forward and backward graphs: what CUDA graphs need) without inductor's lowering of them to
    generated C++, which a lowering it lacks would not fail (it falls back to the aten op) and
    which took 350 s a kind on the 2 shared cores (aot_eager: 15 s of CPU for both kinds).
    benchmarks/training_step_dispatch.py --compile compiles the same step with inductor."""
    recipe = Recipe(epochs=1, batch_size=8, lr=0.05)
    trainers = []
    for _ in range(2):
        torch.manual_seed(0)
        trainers.append(Trainer.create(tiny_cnn(), recipe, get_objective(kind), "cpu"))
    eager, compiled = trainers
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=generator)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])
    results = []
    for trainer, backward in ((eager, eager.backward),
                              (compiled, torch.compile(compiled.backward, fullgraph=True,
                                                       backend="aot_eager"))):
        with (trainer.objective.capture(trainer.model) as captured,
              torch._dynamo.config.patch(trace_autograd_ops=True)):
            trainer.step(x, y, captured)  # an eager step first: optimizer state, constants
            results.append(backward(x, y, captured))
    (eager_loss, eager_parts, eager_logits), (loss, parts, logits) = results
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(logits, eager_logits)
    assert parts.keys() == eager_parts.keys()
    for name in parts:
        torch.testing.assert_close(parts[name], eager_parts[name])
    for (name, parameter), reference in zip(compiled.model.named_parameters(),
                                            eager.model.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, reference.grad, msg=name)

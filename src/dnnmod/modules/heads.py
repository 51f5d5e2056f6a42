"""Output mappings of modules: how a module turns the base model's logits into its score.

Every approach's modules run the (masked) base model; what differs is the last step. A head
maps the logits of M modules, shape (M, batch, N), to one score per module, shape (batch, M),
and can hand out a standalone copy for a single extracted module. Heads are registered by
``kind`` so a module set on disk names its head and loading rebuilds it from tensors only.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from dnnmod.errors import ArtifactError
from dnnmod.hyperparameters import Range, resolve


class Head(nn.Module):
    """Base class: subclasses set ``kind`` and implement forward, subset and for_module."""

    kind: str = ""
    #: bounds of the constructor's options (:mod:`dnnmod.hyperparameters`)
    option_ranges: ClassVar[Mapping[str, Range]] = {}
    #: score above which a module claims its class (binary metrics); None: the composed vote.
    threshold: float | None = None

    def __init__(self, classes: Sequence[int], num_outputs: int) -> None:
        super().__init__()
        self.classes = list(classes)
        self.num_outputs = num_outputs

    def options(self) -> dict:
        """Constructor options that, with the tensors, rebuild this head."""
        return {}

    def subset(self, index: Sequence[int]) -> Head:
        raise NotImplementedError

    def for_module(self, position: int) -> nn.Module:
        """A standalone head for module ``position``: (batch, N) logits → (batch,) scores."""
        raise NotImplementedError


class OwnLogitHead(Head):
    """The module's score is its own class's logit (CNNSplitter; no parameters)."""

    kind = "own_logit"

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(self.classes, device=logits.device)
        return logits[torch.arange(len(index), device=logits.device), :, index].T

    def subset(self, index: Sequence[int]) -> OwnLogitHead:
        return OwnLogitHead([self.classes[i] for i in index], self.num_outputs)

    def for_module(self, position: int) -> nn.Module:
        return _SelectLogit(self.classes[position])


class _SelectLogit(nn.Module):
    def __init__(self, column: int) -> None:
        super().__init__()
        self.column = column

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.column]


class LogitMLPHead(Head):
    """GradSplitter's head, one per module: ReLU → Linear(N→h) → ReLU → Linear(h→1) → sigmoid.

    The M heads are stored stacked and evaluated with batched matrix products.
    """

    kind = "logit_mlp"
    threshold = 0.5
    option_ranges = {"hidden": Range(1)}

    def __init__(self, classes: Sequence[int], num_outputs: int, hidden: int = 10) -> None:
        super().__init__(classes, num_outputs)
        modules = len(self.classes)
        # nn.Linear's default initialisation: uniform in ±1/sqrt(fan_in), weights and biases.
        bound_in, bound_hidden = num_outputs ** -0.5, hidden ** -0.5
        self.w1 = nn.Parameter(torch.empty(modules, num_outputs, hidden).uniform_(-bound_in,
                                                                                  bound_in))
        self.b1 = nn.Parameter(torch.empty(modules, hidden).uniform_(-bound_in, bound_in))
        self.w2 = nn.Parameter(torch.empty(modules, hidden).uniform_(-bound_hidden,
                                                                      bound_hidden))
        self.b2 = nn.Parameter(torch.empty(modules).uniform_(-bound_hidden, bound_hidden))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.bmm(torch.relu(logits), self.w1) + self.b1[:, None])
        out = torch.einsum("mbh,mh->mb", hidden, self.w2) + self.b2[:, None]
        return torch.sigmoid(out).T

    def options(self) -> dict:
        return {"hidden": self.w1.shape[-1]}

    def subset(self, index: Sequence[int]) -> LogitMLPHead:
        head = LogitMLPHead([self.classes[i] for i in index], self.num_outputs,
                            self.w1.shape[-1])
        head.load_state_dict({name: tensor[list(index)] for name, tensor in
                              self.state_dict().items()})
        return head

    def for_module(self, position: int) -> nn.Module:
        head = nn.Sequential(nn.ReLU(), nn.Linear(self.num_outputs, self.w1.shape[-1]),
                             nn.ReLU(), nn.Linear(self.w1.shape[-1], 1), nn.Sigmoid(),
                             nn.Flatten(0))
        with torch.no_grad():
            head[1].weight.copy_(self.w1[position].T)
            head[1].bias.copy_(self.b1[position])
            head[3].weight.copy_(self.w2[position][None])
            head[3].bias.copy_(self.b2[position][None])
        return head.eval()


class ConcernVotesHead(Head):
    """Pan & Rajan's output layer of two nodes per module, scores (batch, M, 2).

    V_c is the module's own class's logit; V_uc has as weights and bias the means of the
    other classes' weights and biases, so (the output layer being linear) it equals the mean
    of the other classes' logits. No parameters; the combination rule is ``voting``.
    """

    kind = "concern_votes"

    def __init__(self, classes: Sequence[int], num_outputs: int) -> None:
        super().__init__(classes, num_outputs)
        if num_outputs < 2:
            raise ArtifactError(f"a concern_votes head needs at least 2 base-model classes "
                                f"(the unconcerned node averages the others); got {num_outputs}")

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(self.classes, device=logits.device)
        concerned = logits[torch.arange(len(index), device=logits.device), :, index]
        unconcerned = (logits.sum(dim=2) - concerned) / (self.num_outputs - 1)
        return torch.stack([concerned, unconcerned], dim=2).transpose(0, 1)

    def subset(self, index: Sequence[int]) -> ConcernVotesHead:
        return ConcernVotesHead([self.classes[i] for i in index], self.num_outputs)

    def for_module(self, position: int) -> nn.Module:
        return _ConcernVotes(self.classes[position], self.num_outputs)


class _ConcernVotes(nn.Module):
    """(batch, N) logits → (batch, 2): V_c and V_uc of one module."""

    def __init__(self, column: int, num_outputs: int) -> None:
        super().__init__()
        self.column, self.num_outputs = column, num_outputs

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        concerned = logits[:, self.column]
        unconcerned = (logits.sum(dim=1) - concerned) / (self.num_outputs - 1)
        return torch.stack([concerned, unconcerned], dim=1)


HEADS: dict[str, type[Head]] = {head.kind: head for head in (OwnLogitHead, LogitMLPHead,
                                                              ConcernVotesHead)}


def build_head(kind: str, classes: Sequence[int], num_outputs: int,
               tensors: dict[str, torch.Tensor] | None = None, **options) -> Head:
    """A head of ``kind``; with ``tensors`` (a state dict) its trained parameters."""
    if kind not in HEADS:
        raise ArtifactError(f"unknown module head kind {kind!r}; known: {sorted(HEADS)}")
    # the options' defaults, from the constructor, give their types (ConfigError naming one)
    defaults = {name: parameter.default for name, parameter in
                inspect.signature(HEADS[kind]).parameters.items()
                if name not in ("classes", "num_outputs")}
    options = resolve(f"{kind} head options", defaults, options, HEADS[kind].option_ranges)
    head = HEADS[kind](classes, num_outputs, **options)
    if tensors is not None:
        expected = {name: tuple(t.shape) for name, t in head.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != found:
            raise ArtifactError(f"{kind} head tensors {found} do not fit the module set "
                                f"(expected {expected})")
        head.load_state_dict(tensors)
    return head


def fit_linear_layer(layer: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
                     optimizer: torch.optim.Optimizer, *, epochs: int, batch_size: int,
                     seed: int, schedule: torch.optim.lr_scheduler.LRScheduler | None = None
                     ) -> list[dict[str, float]]:
    """Train ``layer`` in place, with cross-entropy, on fixed ``features`` (one row per image,
    computed once by the caller) and their ``labels``: ``epochs`` passes in batches of
    ``batch_size``, each epoch in its own seeded order (:func:`dnnmod.resumable.epoch_generator`),
    ``schedule`` stepped once an epoch; the last epoch's weights are kept. Each epoch's mean
    loss and training accuracy (%)."""
    from dnnmod.resumable import epoch_generator

    features, labels = features.detach(), labels.to(features.device)
    history = []
    with torch.enable_grad():
        layer.train()
        for epoch in range(epochs):
            order = torch.randperm(len(labels), generator=epoch_generator(seed, epoch))
            order = order.to(features.device)
            loss_sum, correct = 0.0, 0
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                outputs = layer(features[index])
                loss = nn.functional.cross_entropy(outputs, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(index)
                correct += int((outputs.argmax(1) == labels[index]).sum())
            if schedule is not None:
                schedule.step()
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / len(labels),
                            "train_accuracy": 100.0 * correct / len(labels)})
    layer.eval()
    return history

"""MwT, modularizing while training (Qi et al., ICSE 2024): modules of a modular-trained model.

Training (kind ``mwt``, :class:`MwTTraining`): every conv layer except the first gets a mask
generator, GAP(conv input) → Linear(C_in→h, no bias) → ReLU → Linear(h→K, bias 1.0) →
ReLU(tanh(z)), with h = K if K < 128 else K/2 and Kaiming-initialised weights; the layer then
computes ReLU(BN(conv(x)) ⊙ mask), one mask value per kernel and sample, in [0, 1). The loss is
cross-entropy + α·(1 − cohesion) + β·coupling, where, per masked layer, cohesion is the mean
cosine similarity of the masks of same-class sample pairs (i < j) in the batch and coupling
that of different-class pairs, both averaged over the masked layers. A batch without a
same-class (different-class) pair contributes no cohesion (coupling) term. Training is the
shared loop with the same recipe as standard training.

Decomposition (approach ``mwt``): a kernel belongs to class c's module when its mask is
non-zero on at least a fraction τ of c's (un-augmented) training images; a layer that would
keep nothing for a class lowers τ by ``fallback_step`` for that layer until it keeps something.
The module is the modular model (generators included) restricted to those kernels, scored by
its own class's logit; the first conv, which has no generator, is kept whole in every module.
Cohesion and coupling of the trained model (mean Jaccard index of the binarised per-sample
masks, concatenated over layers, of same-class and of different-class sample pairs) are recorded
in the provenance. As the paper measures them: the accuracy loss is the ST model's test accuracy
minus the modular model's own (E2's headline; composing the per-class modules by their own
logits is an extra column), the KRR counts the gated conv layers only
(:meth:`MwT.paper_kernel_retention`; the shared KRR, which counts the first conv as kept, stands
beside it), and a sub-task T reuses one union network (the OR of T's masks) with the mask
generators removed, a ReLU + Linear(N→|T|) head on its logits and every parameter fine-tuned
(:mod:`dnnmod.reuse.subtasks`).

Deviations from the paper and its code:
- The mask generators wrap the conv layers: the conv (and the BatchNorm2d registered right
  after it in the same parent, with as many features as the conv has kernels) move into a
  :class:`GatedConv` in the conv's place, the BatchNorm's place holds an ``nn.Identity``. So
  parameter and group names of a modular model read ``<conv>.conv``/``<conv>.bn``; this is what
  makes the generators part of the model file, of tracing, pruning and module extraction. The
  "first" conv is the first ``nn.Conv2d`` registered. A conv without such a BatchNorm is gated
  on its own output.
- Kernels of coupled convs (residual additions) share one channel group here; a kernel of such
  a group is kept when it is active at any of the group's layers (union), the residual
  handling MwT's code applies.
- The metrics' sample: at most ``metric_samples`` training images per class (the first ones),
  not the whole training set; module KRR and size come from the shared metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dnnmod.approaches.base import Approach, Decomposition, RunContext
from dnnmod.errors import ConfigError
from dnnmod.hyperparameters import Range
from dnnmod.modules.activations import activation_statistics, capture_activations
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.inference import batches, eval_mode
from dnnmod.modules.metrics import layer_kernel_retention
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.training.objectives import (
    Objective,
    pair_objective,
    side_by_side,
    spatial_mean,
)


class GeneratorLinear(nn.Linear):
    """A Linear layer of a mask generator: its units are no units of the model (they form no
    channel group of their own), but pruning still trims its inputs and outputs."""

    forms_group = False


class MaskGenerator(nn.Module):
    """Per-sample kernel masks of one conv layer from the global average of its input."""

    def __init__(self, in_channels: int, kernels: int) -> None:
        super().__init__()
        hidden = kernels if kernels < 128 else kernels // 2
        self.hidden = GeneratorLinear(in_channels, hidden, bias=False)
        self.out = GeneratorLinear(hidden, kernels)
        # An nn.ReLU module, so the mask is an activation site the decomposition reads.
        self.gate = nn.ReLU()
        nn.init.kaiming_normal_(self.hidden.weight, nonlinearity="relu")
        nn.init.kaiming_normal_(self.out.weight, nonlinearity="relu")
        # Bias 1: every kernel starts open (tanh(1) ≈ 0.76), training learns to close them.
        nn.init.constant_(self.out.bias, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.out(nn.functional.relu(self.hidden(spatial_mean(x))))
        return self.gate(torch.tanh(z))


class GatedConv(nn.Module):
    """A conv layer, its optional BatchNorm and the mask generator scaling their output."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn if bn is not None else nn.Identity()
        self.mask_generator = MaskGenerator(conv.in_channels, conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Conv first: the channel group takes the name of its first producer, the conv.
        y = self.bn(self.conv(x))
        return y * self.mask_generator(x)[:, :, None, None].to(y.dtype)


def gated_convs(model: nn.Module) -> dict[str, GatedConv]:
    """The gated conv layers of a modular model, by name, in registration order."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, GatedConv)}


def without_mask_generators(network: nn.Module) -> nn.Module:
    """``network`` with each gated conv replaced, in place, by its conv and BatchNorm alone:
    every kept kernel passes unscaled (mask 1), as in MwT's reuse (``keep_generator=False``)."""
    for name, gated in gated_convs(network).items():
        parent_name, _, attribute = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, attribute, nn.Sequential(gated.conv, gated.bn))
    return network


def gate_sites(model: nn.Module, structure) -> dict[str, str]:
    """Mask activation site (each generator's gate) → channel group of its conv."""
    return {f"{name}.mask_generator.gate": structure.group_of(f"{name}.conv").name
            for name in gated_convs(model)}


class MwTTraining(Objective):
    """Cross-entropy + α·(1 − cohesion) + β·coupling of the generated masks."""

    name = "mwt"
    defaults = {
        "alpha": 0.5,  # weight of the cohesion term
        "beta": 1.5,   # weight of the coupling term
    }

    def prepare(self, model: nn.Module) -> nn.Module:
        convs = [(name, module) for name, module in model.named_modules()
                 if isinstance(module, nn.Conv2d)]
        if len(convs) < 2:
            raise ConfigError(f"objectives.mwt: {type(model).__name__} has {len(convs)} conv "
                              f"layer(s); MwT gates every conv but the first")
        for name, conv in convs[1:]:
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            siblings = list(parent.named_children())
            position = [child for child, _ in siblings].index(attribute)
            following = siblings[position + 1] if position + 1 < len(siblings) else None
            bn = None
            if following is not None and isinstance(following[1], nn.BatchNorm2d) \
                    and following[1].num_features == conv.out_channels:
                bn = following[1]
                setattr(parent, following[0], nn.Identity())
            setattr(parent, attribute, GatedConv(conv, bn))
        return model

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        sites = [f"{name}.mask_generator.gate" for name in gated_convs(model)]
        with capture_activations(model, sites) as captured:
            yield captured

    def loss(self, logits, labels, captured):
        cross_entropy = nn.functional.cross_entropy(logits, labels)
        flat, layout = side_by_side(list(captured.values()))
        loss, terms = pair_objective(cross_entropy, flat, layout, labels,
                                     self.hyperparameters["alpha"], self.hyperparameters["beta"])
        cohesion, coupling = terms.means
        return loss, {"cross_entropy": cross_entropy.detach(), "cohesion": cohesion,
                      "coupling": coupling}


def threshold_with_fallback(frequency: torch.Tensor, threshold: float, step: float
                            ) -> torch.Tensor:
    """Bool (K, C): channel c kept for class k when ``frequency[k, c] >= τ``, τ lowered by
    ``step`` for a row until the row keeps something (every channel at the latest at τ <= 0)."""
    kept = torch.zeros_like(frequency, dtype=torch.bool)
    for row, values in enumerate(frequency):
        level = threshold
        while not (values >= level - 1e-9).any():
            level -= step
        kept[row] = values >= level - 1e-9
    return kept


def jaccard_cohesion_coupling(binary: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean Jaccard index of the rows of ``binary`` (samples × kernels, bool) over same-class
    and over different-class sample pairs i < j (NaN where there is no such pair)."""
    as_float = binary.double()
    intersection = as_float @ as_float.T
    sizes = as_float.sum(1)
    union = sizes[:, None] + sizes[None, :] - intersection
    jaccard = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    first, second = torch.triu_indices(len(labels), len(labels), 1)
    same = labels[first] == labels[second]
    pairs = jaccard[first, second]
    return (pairs[same].mean().item() if same.any() else math.nan,
            pairs[~same].mean().item() if (~same).any() else math.nan)


def sample_masks(model: nn.Module, images) -> torch.Tensor:
    """Binarised masks of every gated layer on every image: bool (images, total kernels)."""
    sites = [f"{name}.mask_generator.gate" for name in gated_convs(model)]
    device = next(model.parameters()).device
    rows = []
    with eval_mode(model), torch.no_grad(), capture_activations(model, sites) as captured:
        for x, _ in batches(images, 256):
            model(x.to(device))
            rows.append(torch.cat([captured[site] > 0 for site in sites], dim=1).cpu())
    return torch.cat(rows)


class MwT(Approach):
    name = "mwt"
    training = "mwt"
    contract_hyperparameters = {"metric_samples": 8}
    composes_by_union = True
    # The paper's "accuracy loss" (1.13 pp) is the ST model's test accuracy minus the modular
    # model's own (modularizer.py checks the modular model; no per-class composition).
    accuracy_protocol = "modular_model"
    # modularizer.py: mean of the concatenated masks of the masked layers, so kernel-weighted
    # over the gated convs only. dnnmod keeps one mask per channel group, so a gated conv of a
    # coupled group (residual addition) counts its group's kept kernels.
    krr_definition = ("kept kernels of the gated (masked) conv layers over their kernels, "
                      "counted per layer; the ungated first conv left out (MwT)")
    # modularizer.py: the union module without generators, a ReLU + Linear head, fine-tuned.
    fine_tunes_union = True
    defaults = {
        "threshold": 0.9,       # τ: least fraction of a class's images a kept kernel is active on
        "fallback_step": 0.05,  # τ is lowered by this for a layer that would keep nothing
        "metric_samples": 100,  # training images per class for the cohesion/coupling metrics
    }

    constraints = {"threshold": Range(0, 1, low_open=True),
                   "fallback_step": Range(0, 1, low_open=True), "metric_samples": Range(2)}

    def paper_kernel_retention(self, model: nn.Module, modules: ModuleSet) -> list[float]:
        return layer_kernel_retention(modules, [f"{name}.conv" for name in gated_convs(model)])

    def reuse_network(self, network: nn.Module) -> nn.Module:
        return without_mask_generators(network)

    def decompose(self, context: RunContext) -> Decomposition:
        model, base_meta, data = context.model, context.base_meta, context.data
        hyperparameters = context.hyperparameters
        structure, classes = context.structure, context.classes
        if not gated_convs(model):
            raise ConfigError(f"mwt decomposes models trained with training kind 'mwt'; this "
                              f"{base_meta.get('arch')} (training {base_meta.get('training')!r})"
                              " has no mask generators")
        statistics = activation_statistics(model, structure, data.train, classes=classes,
                                           sites=gate_sites(model, structure))
        masks = {group: threshold_with_fallback(frequency, hyperparameters["threshold"],
                                                hyperparameters["fallback_step"])
                 for group, frequency in statistics.group_view("frequency", "union").items()}

        per_class = hyperparameters["metric_samples"]
        labels = data.train.labels.cpu()
        chosen = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in classes])
        sample = data.train.take(chosen.to(data.train.labels.device))
        cohesion, coupling = jaccard_cohesion_coupling(sample_masks(model, sample),
                                                       sample.labels.cpu())
        return Decomposition(masks, OwnLogitHead(classes, data.num_classes),
                             provenance={"cohesion": cohesion, "coupling": coupling})

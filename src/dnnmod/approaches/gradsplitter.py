"""GradSplitter (Qi et al., TOSEM 2023): modules found by gradient descent on kernel masks.

Each module has one real-valued score per kernel, initialised to 1; the forward pass uses the
binary mask 1[score > 0] and the backward pass lets the gradient through, clipped to [-1, 1].
As in the authors' splitters, each mask multiplies the output of the ReLU after its conv +
BatchNorm, once per ReLU (before pooling; in a residual group each branch's ReLU, before the
addition), not the conv's and the norm's outputs where extraction's masked model zeroes a
channel: with binary masks both compute the same module (checked at the start), but only at
the ReLU's output does a dropped kernel's score get the gradient Σ g·relu(z), so a kernel
dropped in one step can come back in a later one. The base model is frozen (eval mode).
Module m reads the masked model's N logits through its own head (ReLU → Linear(N→10) → ReLU
→ Linear(10→1) → sigmoid) whose output is its score; the loss is the cross-entropy over the N
module scores used as logits plus α times the mean of all binary masks. Schedule: head-only
epochs (Adam 0.01), then rounds of [mask+head epochs with α, head-only epochs], each phase
with a fresh Adam.

Execution: a mask+head step runs all N modules in one batched masked pass, every kernel
computed, since a dropped kernel's score needs its activation. Where no gradient is needed
(head-only phases, validation) on a CPU each module runs as its kept-channel sub-network with
BatchNorms folded (:class:`KeptChannelPass`, about r² of the multiplications for a module
keeping a fraction r of its kernels; it checks itself against the masked model first), one
module at a time. Head-only phases compute the masked logits once per phase (the masks are
fixed there), not once per epoch.

Selection (the authors chose by hand from logs; here automatic): the epoch whose composed
validation accuracy is less than ``max_loss_pp`` below the base model's with the fewest kept
kernels, else the epoch with the best composed validation accuracy.

Schedules across dataset sizes (a deviation, optional): Adam moves each score by about its
learning rate per step whatever the gradient's scale, so what decides whether a kernel can be
dropped within a mask phase is the distance a score can travel in it, mask lr × steps. The
reference's 0.001 over 5 epochs of about 700 CIFAR steps allows about 3.5; on a dataset 40×
smaller the same epochs allow 0.09 and no kernel is ever dropped. ``mask_travel`` keeps that
distance instead of the learning rate: mask_lr = mask_travel / (optimizer steps per mask
phase), recorded in the provenance as ``effective_mask_lr``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dnnmod.approaches.base import Approach, Decomposition, RunContext
from dnnmod.artifacts import config_hash
from dnnmod.hyperparameters import Range
from dnnmod.modules.activations import activation_sites
from dnnmod.modules.heads import LogitMLPHead
from dnnmod.modules.inference import accuracy, kept_channel_pass, run
from dnnmod.modules.masking import check_sites_cover, ensure_nonempty, masked_logits
from dnnmod.modules.metrics import PER_LAYER_KRR, composed_accuracy, layer_kernel_retention
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.resumable import ResumableLoop, epoch_generator

DEFAULTS: dict[str, Any] = {
    "alpha": 0.1,             # weight of the mask-mean penalty in modularization epochs
    "head_hidden": 10,        # hidden units of each module's head
    "batch_size": 64,
    "init_head_epochs": 5,    # head-only epochs before the first round
    "init_head_lr": 0.01,
    "rounds": 20,             # rounds of [mask_epochs | head_epochs]
    "mask_epochs": 5,
    "head_epochs": 2,
    "lr": 0.001,              # Adam learning rate of heads after the initial phase
    "mask_lr": 0.001,         # Adam learning rate of the kernel scores
    "mask_travel": None,      # if set, mask_lr = mask_travel / optimizer steps per mask phase
    "max_loss_pp": 1.0,       # selection: largest accepted validation accuracy loss (pp)
    "max_train_samples": None,  # a seeded subset of the training split (None: all of it)
}

log = logging.getLogger(__name__)


class _BinaryMask(torch.autograd.Function):
    """1[score > 0] forward; the gradient passes straight through, clipped to [-1, 1]."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(-1.0, 1.0)


@dataclass(frozen=True)
class Phase:
    kind: str  # "head": heads only, masks fixed; "mask": kernel scores and heads
    epochs: int
    lr: float  # of the heads
    alpha: float
    mask_lr: float = 0.0  # of the kernel scores, in "mask" phases


def schedule(hyperparameters: dict[str, Any]) -> list[Phase]:
    hp = hyperparameters
    phases = [Phase("head", hp["init_head_epochs"], hp["init_head_lr"], 0.0)]
    for _ in range(hp["rounds"]):
        phases += [Phase("mask", hp["mask_epochs"], hp["lr"], hp["alpha"], hp["mask_lr"]),
                   Phase("head", hp["head_epochs"], hp["lr"], 0.0)]
    return [phase for phase in phases if phase.epochs > 0]


def _module_set(model_meta, structure, masks, head, provenance=None) -> ModuleSet:
    return ModuleSet(approach=GradSplitter.name, classes=list(head.classes), masks=masks, head=head,
                     combination="argmax", base=base_identity(model_meta),
                     structure=structure, provenance=provenance or {})


class GradSplitter(Approach):
    name = "gradsplitter"
    defaults = DEFAULTS
    # The paper's KRR counts every conv layer's own mask (grad_splitter.py sums the masks of all
    # conv layers): the shared definition for models without coupled convs (SimCNN), coupled
    # convs (ResCNN's residual additions) counted once per layer.
    krr_definition = PER_LAYER_KRR
    types = {"mask_travel": float, "max_train_samples": int}
    contract_hyperparameters = {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1,
                                "head_epochs": 1, "mask_lr": 0.1, "batch_size": 32,
                                "max_train_samples": 96}
    constraints = {
        **{key: Range(0) for key in ("alpha", "init_head_epochs", "rounds", "mask_epochs",
                                     "head_epochs", "max_loss_pp")},
        **{key: Range(0, low_open=True) for key in ("init_head_lr", "lr", "mask_lr",
                                                    "mask_travel")},
        **{key: Range(1) for key in ("head_hidden", "batch_size", "max_train_samples")},
    }

    def paper_kernel_retention(self, model: nn.Module, modules: ModuleSet) -> list[float]:
        return layer_kernel_retention(modules)

    def decompose(self, context: RunContext) -> Decomposition:
        model, base_meta, data = context.model, context.base_meta, context.data
        hyperparameters, structure, classes = (context.hyperparameters, context.structure,
                                               context.classes)
        seed, device = context.seed, context.device
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        sites = activation_sites(model, structure)
        check_sites_cover(model, structure, sites,
                          [group.name for group in structure.conv_groups])
        torch.manual_seed(seed)
        scores = {group.name: torch.ones(len(classes), group.size, device=device,
                                         requires_grad=True) for group in structure.conv_groups}
        head = LogitMLPHead(classes, data.num_classes, hyperparameters["head_hidden"]).to(device)
        train_set = data.train.sample(hyperparameters["max_train_samples"], seed)
        hyperparameters = {**hyperparameters,
                           "mask_lr": effective_mask_lr(hyperparameters, len(train_set))}
        phases = schedule(hyperparameters)
        plan = [(index, phase) for index, phase in enumerate(phases)
                for _ in range(phase.epochs)]
        base_val_accuracy = accuracy(model, data.val)
        kept_pass = kept_channel_pass(model, structure)
        fingerprint = config_hash({"approach": self.name, "hyperparameters": hyperparameters,
                                   "seed": seed, "base": base_meta.get("weights_sha256")})
        loop = ResumableLoop(context.checkpoint, fingerprint, len(plan), desc=self.name,
                             progress=context.progress)

        history, candidates = [], []
        optimizer, optimizer_phase = None, None
        if loop.state is not None:
            with torch.no_grad():
                for name, tensor in loop.state["scores"].items():
                    scores[name].copy_(tensor)
            head.load_state_dict(loop.state["head"])
            history, candidates = loop.state["history"], loop.state["candidates"]
            resumed = loop.first_step
            if resumed < len(plan) and plan[resumed][0] == loop.state["phase"]:
                optimizer_phase = loop.state["phase"]
                optimizer = _optimizer(plan[resumed][1], scores, head)
                optimizer.load_state_dict(loop.state["optimizer"])

        cached_phase, train_logits, val_logits = None, None, None
        for epoch in loop.steps():
            phase_index, phase = plan[epoch]
            if optimizer_phase != phase_index:  # a fresh Adam at every phase switch
                optimizer, optimizer_phase = _optimizer(phase, scores, head), phase_index
            generator = epoch_generator(seed, epoch)
            order = torch.randperm(len(train_set), generator=generator).to(
                train_set.labels.device)
            head.train()
            loss_sum = 0.0
            if phase.kind == "head" and cached_phase != phase_index:
                # Masks are fixed in a head-only phase and GradSplitter uses no augmentation,
                # so the masked logits of every image are the same in each of its epochs.
                fixed = {name: (s > 0).float().detach() for name, s in scores.items()}
                train_logits = run(model, train_set, structure=structure, masks=fixed,
                                   kept_pass=kept_pass)
                cached_phase, val_logits = phase_index, None
            for begin in range(0, len(order), hyperparameters["batch_size"]):
                index = order[begin:begin + hyperparameters["batch_size"]]
                if phase.kind == "mask":
                    x, y = train_set.float_batch(index)
                    loss = mask_loss(model, structure, sites, scores, head, x, y,
                                     phase.alpha)
                else:
                    loss = nn.functional.cross_entropy(head(train_logits[:, index]),
                                                       train_set.labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(index)

            head.eval()
            binary = ensure_nonempty({n: s.detach() for n, s in scores.items()},
                                     {n: s.detach() for n, s in scores.items()})
            if phase.kind == "mask" or val_logits is None:
                val_logits = run(model, data.val, structure=structure, masks=binary,
                                 kept_pass=kept_pass)
            candidate = _module_set(base_meta, structure, binary, head)
            with torch.no_grad():
                val_accuracy = composed_accuracy(candidate, head(val_logits), data.val.labels)
            kernels = int(sum(mask.sum() for mask in binary.values()))
            record = {"epoch": epoch + 1, "phase": phase.kind, "loss": loss_sum / len(order),
                      "val_accuracy": val_accuracy, "kernels": kernels,
                      "krr": kernels / (structure.total_kernels * len(classes))}
            history.append(record)
            candidates.append({"masks": {n: m.cpu() for n, m in binary.items()},
                               "head": {n: t.detach().cpu().clone()
                                        for n, t in head.state_dict().items()}})
            loop.save(epoch, {
                "phase": phase_index, "scores": {n: s.detach().cpu() for n, s in scores.items()},
                "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                "history": history, "candidates": candidates,
            }, postfix={"val": f"{val_accuracy:.1f}%", "krr": f"{record['krr']:.2f}"})
            log.info("epoch %d/%d (%s) loss %.4f val %.2f%% KRR %.3f", epoch + 1, len(plan),
                     phase.kind, record["loss"], val_accuracy, record["krr"])

        chosen = select_epoch(history, base_val_accuracy, hyperparameters["max_loss_pp"])
        head.load_state_dict(candidates[chosen]["head"])
        masks = {n: m.to(device) for n, m in candidates[chosen]["masks"].items()}
        provenance = {
            "hyperparameters": hyperparameters, "selected_epoch": history[chosen]["epoch"],
            "base_val_accuracy": base_val_accuracy,
            "effective_mask_lr": hyperparameters["mask_lr"],
            "history": history, "train_samples": len(train_set),
            "wall_seconds": loop.wall_seconds,
        }
        return Decomposition(masks, head.cpu(), provenance=provenance)


def mask_loss(model: nn.Module, structure, sites: dict[str, str] | None,
              scores: dict[str, torch.Tensor], head: nn.Module, x: torch.Tensor,
              y: torch.Tensor, alpha: float) -> torch.Tensor:
    """The loss of one mask+head step: cross-entropy of the N module scores plus α times
    the mean of all binary masks, differentiable in the kernel scores and the heads. The
    masks multiply the outputs of the ReLUs ``sites`` (from ``activation_sites``) names;
    None puts them at the producers and norms instead (extraction's placement, which
    benchmarks/reference_parity.py compares as the one before dc5d45c).

    The penalty takes its own binary masks, as the authors' code does, so the
    straight-through clip applies to the cross-entropy's gradient and the penalty's apart.
    Each coupled (residual) group counts once in the mean; the authors' ResCNN splitter
    counts the shared masks twice (a declared deviation, docs/results/parity.md)."""
    masks = {name: _BinaryMask.apply(s) for name, s in scores.items()}
    logits = masked_logits(model, structure, masks, x, sites)
    loss = nn.functional.cross_entropy(head(logits), y)
    if alpha:
        penalty = torch.cat([_BinaryMask.apply(s).flatten() for s in scores.values()])
        loss = loss + alpha * penalty.mean()
    return loss


def effective_mask_lr(hyperparameters: dict[str, Any], train_samples: int) -> float:
    """The kernel scores' learning rate: ``mask_lr``, or ``mask_travel`` spread over the
    optimizer steps of one mask phase."""
    if hyperparameters["mask_travel"] is None:
        return hyperparameters["mask_lr"]
    steps = hyperparameters["mask_epochs"] * math.ceil(train_samples
                                                       / hyperparameters["batch_size"])
    return hyperparameters["mask_travel"] / max(steps, 1)


def select_epoch(history: list[dict[str, Any]], base_val_accuracy: float,
                 max_loss_pp: float) -> int:
    """Index of the epoch with the fewest kernels within ``max_loss_pp`` of the base model's
    validation accuracy; else of the best validation accuracy."""
    accepted = [i for i, r in enumerate(history)
                if base_val_accuracy - r["val_accuracy"] < max_loss_pp]
    if accepted:
        return min(accepted, key=lambda i: (history[i]["kernels"], -history[i]["val_accuracy"]))
    return max(range(len(history)), key=lambda i: history[i]["val_accuracy"])


def _optimizer(phase: Phase, scores: dict[str, torch.Tensor], head: nn.Module):
    groups = [{"params": list(head.parameters()), "lr": phase.lr}]
    if phase.kind == "mask":
        groups.append({"params": list(scores.values()), "lr": phase.mask_lr})
    return torch.optim.Adam(groups)

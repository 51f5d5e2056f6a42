"""Reference parity: an approach's authors' implementation and dnnmod's, step by step.

Both implementations start from the same weights (mapped tensor by tensor), the same initial
trainable state and the same batches, in float64 on the CPU, and each takes its own optimizer
steps; every step prints the two losses, how far the gradients of the trainable state differ
(max |Δ| and max |Δ| over the largest authors' gradient), and how many binary masks differ
after the step. The authors' code is imported at run time from ``--authors`` (a checkout of
their repository; nothing of it is vendored here). Where their code needs CUDA or casts to
float32, the benchmark patches around it at run time and says so; their files are not edited.
The run exits 1 when a step's loss or gradients differ by more than ``--tolerance`` (relative)
or a mask differs, so it can gate a change.

gradsplitter (qibinhang/GradSplitter, ``src/splitters/<model>_splitter.py``, the loss of
``src/grad_splitter.py``): the splitter's kernel scores and module heads against
:func:`dnnmod.approaches.gradsplitter.mask_loss` with dnnmod's model, heads and optimizer, one
mask+head phase step (Adam, lr 0.001 for heads and scores, α as given) per batch. Weights: the
authors' model as it initialises itself, its BatchNorms given random statistics and affine
parameters (so that a norm's shift shows). Scores: uniform in ±``--init-spread`` (so that
kernels drop and come back within a few steps of lr 0.001; ``--init-spread 0`` gives the
authors' all-ones start). Per step also, on the cross-entropy's part of the score gradients
(the penalty's taken off): the median ratio of dnnmod's to the authors' over kernels both
keep, the kept kernels whose gradients have opposite signs, the dropped kernels that get a
cross-entropy gradient on each side, and the kernels each side revives.
``--placement outputs`` runs dnnmod's masks where its masked model zeroes channels (the conv's
and the norm's outputs, GradSplitter's placement before dnnmod dc5d45c) instead of at the
ReLUs, to show what that changes.

mwt (qibinhang/MwT, ``src/models/vgg_masked.py``, ``loss_func_cos`` of
``src/modular_trainer.py``) and moda (icse2025-dnn-modularization/MODA,
``models/vgg/vgg_model.py``, ``calculate_module_losses`` of ``models/modular_utils.py``): one
modular training step of VGG16-BN (512-512 classifier, dropout off on both sides) in train
mode, their loss against dnnmod's training kind (``get_objective("mwt" | "moda")``: MwT's
generators added by its ``prepare``, every tensor of theirs mapped, generators included), SGD
0.05 with Nesterov momentum 0.9 as their trainers; per step the loss and its parts, the
gradients of all parameters, the weights after the step, and for MwT the per-sample masks
(> 0) of the step's forward pass that differ. dnnmod's terms reduce float64 inputs in
float64 (``training/objectives.py``'s ``reduction_dtype``), so their default tolerance is
1e-9, as GradSplitter's.

    python benchmarks/reference_parity.py gradsplitter --authors ../refs/GradSplitter
    python benchmarks/reference_parity.py gradsplitter --authors ../refs/GradSplitter \\
        --model rescnn --alpha 0
    python benchmarks/reference_parity.py gradsplitter --authors ../refs/GradSplitter \\
        --placement outputs
cnnsplitter (qibinhang/CNNSplitter, ``src/utils/module_tools.py``'s ``cal_fitness`` and
``src/module_recorder.py``'s ``cal_diff_with_multiprocess`` and ``cal_fitness``): the fitness of
one population, generation 0. CNNSplitter's SimCNN (no BatchNorm, 512-512 classifier; their
``models/simcnn.py`` built with ``--width``'s channels) is trained by dnnmod for ``--epochs`` on
the bundled digits and mapped tensor by tensor onto the authors' model; dnnmod's kernel
importance orders the kernels for both; dnnmod's initialiser (:func:`initial_genes`, their
SimCNN/CIFAR-10 keep ratios and sensitive layers 0-6) draws ``--population`` solutions per
class. Their explorer extracts each solution's module and runs it on ``--images`` validation
images; dnnmod runs the masked model (float64; the search's kept-channel pass is float32 and
is compared apart). Compared: each solution's own-class logits and kept kernels, the 1 −
Jaccard table, the surviving 10-class compositions (fitness, accuracy, diff, in fitness order)
and every solution's fitness (theirs 0 outside a surviving composition; dnnmod's DEAP fitness
then ranks by the deepest level reached, a stated deviation, so only scored solutions are
compared). Patched at run time: their recorder's globals (set by its ``__main__``), float64 as
the default dtype (their extraction builds a fresh module), and their ``np.argsort`` made
stable: numpy's default quicksort orders equal accuracies arbitrarily, dnnmod's sort keeps
them in composition order, and a tie at a survivor cut would otherwise pick different
compositions. The class order is their ``random.seed(10)`` shuffle, handed to dnnmod's scorer.

    python benchmarks/reference_parity.py mwt --authors ../refs/MwT
    python benchmarks/reference_parity.py moda --authors ../refs/MODA
    python benchmarks/reference_parity.py cnnsplitter --authors ../refs/CNNSplitter
"""

from __future__ import annotations

import argparse
import importlib
import math
import random
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnnmod.approaches import gradsplitter
from dnnmod.models import build_model
from dnnmod.modules.activations import activation_sites
from dnnmod.modules.heads import LogitMLPHead
from dnnmod.modules.structure import trace_structure
from dnnmod.training.objectives import get_objective

CLASSES = 10


def authors_source(checkout: Path, marker: str) -> Path:
    """The directory of ``checkout`` to put on ``sys.path`` (the one holding ``marker``)."""
    for root in (checkout / "src", checkout):
        if (root / marker).is_file():
            return root
    raise SystemExit(f"{checkout}: not a checkout of the authors' repository (no {marker} in "
                     f"it or in its src/)")


def difference(theirs: torch.Tensor, ours: torch.Tensor) -> tuple[float, float]:
    """max |ours − theirs| and that over max |theirs|."""
    largest = theirs.abs().max().item()
    gap = (ours - theirs).abs().max().item()
    return gap, gap / largest if largest else (0.0 if gap == 0 else float("inf"))


def authors_sgd(network: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of MODA's model_trainer and MwT's modular_trainer at their READMEs'
    learning rate: SGD 0.05, momentum 0.9, Nesterov, no weight decay."""
    return torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9, nesterov=True)


@dataclass(frozen=True)
class StepGaps:
    """One modular-training step, the authors' against dnnmod's: the relative gaps of the loss
    and of each loss part, and (absolute, relative) of the gradients and updated weights."""

    loss: float
    parts: list[float]
    grad: tuple[float, float]
    weights: tuple[float, float]

    @classmethod
    def of(cls, their_loss, our_loss, their_parts, our_parts, their_grad, our_grad,
           theirs: nn.Module, ours: nn.Module) -> StepGaps:
        return cls(
            loss=abs(our_loss.item() - their_loss.item()) / abs(their_loss.item()),
            parts=[abs(float(o) - float(t.detach())) / max(abs(float(t.detach())), 1e-300)
                   for o, t in zip(our_parts, their_parts, strict=True)],
            grad=difference(their_grad, our_grad),
            weights=difference(torch.cat([p.detach().flatten() for p in theirs.parameters()]),
                               torch.cat([p.detach().flatten() for p in ours.parameters()])))

    @property
    def decisive(self) -> float:
        """The largest gap that decides parity. The parts are printed; the loss, gradients and
        weights decide (a part such as 1 − cohesion near 0 magnifies float32 rounding of the
        similarity)."""
        return max(self.loss, self.grad[1], self.weights[1])

    @staticmethod
    def header(parts: str, parts_width: int) -> str:
        return (f"{'step':>4} {'loss theirs':>12} {'loss gap':>9} {parts:>{parts_width}} "
                f"{'grad gap':>16} {'weight gap':>10}")

    def row(self, step: int, their_loss: float, parts_width: int) -> str:
        return (f"{step:4d} {their_loss:12.6f} {self.loss:9.1e} "
                f"{' '.join(f'{gap:8.1e}' for gap in self.parts):>{parts_width}} "
                f"{self.grad[0]:7.1e}/{self.grad[1]:7.1e} {self.weights[1]:10.1e}")


def randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Random BatchNorm statistics and affine parameters: a fresh norm's shift is zero, and
    a difference in where masks sit would not show through it."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.normal_(0.0, 0.5, generator=generator)
                layer.running_var.uniform_(0.5, 2.0, generator=generator)
                layer.weight.normal_(1.0, 0.3, generator=generator)
                layer.bias.normal_(0.0, 0.5, generator=generator)


def map_weights(theirs: nn.Module, ours: nn.Module) -> int:
    """Copy the authors' model's tensors into dnnmod's, in registration (forward) order, each
    pair checked by shape; returns the number of tensors."""
    source, target = theirs.state_dict(), ours.state_dict()
    if len(source) != len(target):
        raise SystemExit(f"the authors' model has {len(source)} tensors, dnnmod's "
                         f"{len(target)}: not the same architecture")
    mapped = {}
    for (their_name, tensor), (name, own) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != own.shape:
            raise SystemExit(f"tensor {their_name} {tuple(tensor.shape)} does not map onto "
                             f"{name} {tuple(own.shape)}")
        mapped[name] = tensor.clone()
    ours.load_state_dict(mapped)
    return len(mapped)


def gradsplitter_parity(args) -> bool:
    source = authors_source(args.authors, f"splitters/{args.model}_splitter.py")
    sys.path.insert(0, str(source))
    torch.set_default_dtype(torch.float64)
    authors_models = importlib.import_module("utils.model_loader")
    splitter_module = importlib.import_module(f"splitters.{args.model}_splitter")
    authors_loss = importlib.import_module("grad_splitter").loss_func
    # Patched at run time: their modules pick CUDA when it is there (these runs stay on the
    # CPU), and their MySign casts the mask to float32 (this run is float64). Their backward,
    # hardtanh of the incoming gradient, stays theirs.
    splitter_module.device = torch.device("cpu")

    class Sign(splitter_module.MySign):
        @staticmethod
        def forward(ctx, scores):
            return (scores > 0).to(scores.dtype)

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    theirs = authors_models.load_model(args.model, CLASSES)
    randomise_norms(theirs, generator)
    theirs.eval()
    splitter = splitter_module.GradSplitter(theirs, "ones")
    splitter.sign = Sign.apply
    splitter.train()
    splitter.model.eval()  # as their train_splitter does: BatchNorm on running statistics

    model = build_model(args.model, CLASSES, width=1.0).eval()
    tensors = map_weights(theirs, model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    probe = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        forward_gap = difference(theirs(probe), model(probe))[1]
    structure = trace_structure(model)
    sites = activation_sites(model, structure) if args.placement == "relu" else None

    # dnnmod's conv groups ↔ the splitter's score vectors, by the index of the group's first
    # conv (a residual group's shared vector is the one of its first layer, as theirs).
    convs = [name for name, layer in model.named_modules() if isinstance(layer, nn.Conv2d)]
    layer_of = {group.name: convs.index(group.convs[0]) for group in structure.conv_groups}
    their_scores = {group.name: [getattr(splitter, f"module_{m}_conv_{layer_of[group.name]}")
                                 for m in range(CLASSES)] for group in structure.conv_groups}
    with torch.no_grad():
        for group in structure.conv_groups:
            for score in their_scores[group.name]:
                if score.shape != (group.size,):
                    raise SystemExit(f"group {group.name}: {group.size} kernels, the authors' "
                                     f"scores {tuple(score.shape)}")
                if args.init_spread > 0:
                    score.uniform_(-args.init_spread, args.init_spread, generator=generator)
    scores = {name: torch.stack([s.detach() for s in vectors]).clone().requires_grad_(True)
              for name, vectors in their_scores.items()}
    heads = [getattr(splitter, f"module_{m}_head") for m in range(CLASSES)]
    head = LogitMLPHead(list(range(CLASSES)), CLASSES, heads[0][0].out_features)
    with torch.no_grad():
        head.w1.copy_(torch.stack([h[0].weight.T for h in heads]))
        head.b1.copy_(torch.stack([h[0].bias for h in heads]))
        head.w2.copy_(torch.stack([h[2].weight[0] for h in heads]))
        head.b2.copy_(torch.stack([h[2].bias[0] for h in heads]))

    lr = 0.001  # their lr_modularity, for heads and scores alike; dnnmod's lr and mask_lr
    their_optimizer = torch.optim.Adam([p for p in splitter.parameters() if p.requires_grad],
                                       lr=lr)
    our_optimizer = gradsplitter._optimizer(
        gradsplitter.Phase("mask", 1, lr, args.alpha, lr), scores, head)

    kernels = sum(s.numel() for s in scores.values())
    print(f"gradsplitter {args.model}: {tensors} tensors mapped, forward gap "
          f"{forward_gap:.1e} (relative); {CLASSES} modules x {kernels // CLASSES} kernels; "
          f"scores {'uniform in ±' + str(args.init_spread) if args.init_spread else 'ones'}; "
          f"alpha {args.alpha}; batch {args.batch}; dnnmod masks at the "
          f"{'ReLU outputs' if sites is not None else 'conv and norm outputs'}")
    print(f"{'step':>4} {'loss theirs':>12} {'loss gap':>9} {'score grad gap':>15} "
          f"{'head grad gap':>14} {'kept ratio':>10} {'sign flips':>10} "
          f"{'dropped, CE grad t/o':>19} {'revived theirs/ours':>19} {'masks differ':>12}")
    worst = 0.0
    masks_differ = 0
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, CLASSES, (args.batch,), generator=generator)
        before = ({n: torch.stack([s.detach() > 0 for s in v]) for n, v in their_scores.items()},
                  {n: s.detach() > 0 for n, s in scores.items()})

        their_optimizer.zero_grad()
        predicted, penalty = authors_loss(splitter(x), y, splitter)
        their_loss = predicted + args.alpha * penalty
        their_vectors = [s for n in scores for s in their_scores[n]]
        their_penalty_grad = torch.cat([
            g.flatten() for g in torch.autograd.grad(args.alpha * penalty, their_vectors,
                                                     retain_graph=True, allow_unused=True)])
        their_loss.backward()
        their_grad = torch.cat([torch.stack([s.grad for s in their_scores[n]]).flatten()
                                for n in scores])
        their_head_grad = torch.cat([p.grad.flatten() for h in heads
                                     for p in (h[0].weight, h[0].bias, h[2].weight, h[2].bias)])
        their_optimizer.step()

        our_optimizer.zero_grad()
        our_loss = gradsplitter.mask_loss(model, structure, sites, scores, head, x, y,
                                          args.alpha)
        our_loss.backward()
        our_grad = torch.cat([scores[n].grad.flatten() for n in scores])
        our_head_grad = torch.cat([torch.cat([head.w1.grad[m].T.flatten(), head.b1.grad[m],
                                              head.w2.grad[m], head.b2.grad[m:m + 1]])
                                   for m in range(CLASSES)])
        our_optimizer.step()

        kept_theirs = torch.cat([before[0][n].flatten() for n in scores])
        kept_ours = torch.cat([before[1][n].flatten() for n in scores])
        # The cross-entropy's part of the score gradients, apart from the penalty's (ours:
        # α / mask entries on every score; theirs: taken apart above).
        their_ce = their_grad - their_penalty_grad
        our_ce = our_grad - args.alpha / kernels
        both = (kept_theirs & kept_ours & (their_ce.abs() > 1e-12 * their_ce.abs().max())
                & (our_ce.abs() > 1e-12 * our_ce.abs().max()))
        ratio = (our_ce[both] / their_ce[both]).abs().median().item() if both.any() else 0
        flips = int((torch.sign(our_ce[both]) != torch.sign(their_ce[both])).sum())
        moving = ((~kept_theirs & (their_ce.abs() > 1e-12 * their_ce.abs().max())).sum(),
                  (~kept_ours & (our_ce.abs() > 1e-12 * our_ce.abs().max())).sum())
        after_theirs = torch.cat([torch.stack([s.detach() > 0 for s in their_scores[n]]).flatten()
                                  for n in scores])
        after_ours = torch.cat([(scores[n].detach() > 0).flatten() for n in scores])
        revived = (int((after_theirs & ~kept_theirs).sum()), int((after_ours & ~kept_ours).sum()))
        masks_differ = int((after_theirs != after_ours).sum())
        loss_gap = abs(our_loss.item() - their_loss.item()) / abs(their_loss.item())
        score_gap = difference(their_grad, our_grad)
        head_gap = difference(their_head_grad, our_head_grad)
        worst = max(worst, loss_gap, score_gap[1], head_gap[1])
        print(f"{step:4d} {their_loss.item():12.6f} {loss_gap:9.1e} "
              f"{score_gap[0]:7.1e}/{score_gap[1]:7.1e} {head_gap[0]:6.1e}/{head_gap[1]:7.1e} "
              f"{ratio:10.3f} {flips:10d} {int(moving[0]):9d}/{int(moving[1]):<9d} "
              f"{revived[0]:9d}/{revived[1]:<9d} {masks_differ:12d}")
    agree = worst <= args.tolerance and masks_differ == 0
    print(f"{'parity' if agree else 'DIFFERENT'}: largest relative gap {worst:.1e} "
          f"(tolerance {args.tolerance:.0e}), {masks_differ} binary masks differ after step "
          f"{args.steps}")
    return agree


def moda_parity(args) -> bool:
    source = authors_source(args.authors, "models/modular_utils.py")
    sys.path.insert(0, str(source))
    # Patched at run time: their models package imports prettytable at import time (for
    # printing parameter tables, unused here).
    stand_in("prettytable", PrettyTable=None)
    torch.set_default_dtype(torch.float64)
    vgg = importlib.import_module("models.vgg.vgg_model")
    authors_terms = importlib.import_module("models.modular_utils").calculate_module_losses

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    # Their VGG16-BN built by their own functions, with their 512-512 classifier ("B"; their
    # cifar10_vgg16_bn takes "A", 4096-4096, the E1 deviation dnnmod's vgg16 states).
    theirs = vgg.VGG(vgg.make_conv_layers(vgg.conv_cfgs["D"], batch_norm=True),
                     vgg.make_classifier_layers(vgg.classifier_cfgs["B"], 512, CLASSES))
    randomise_norms(theirs, generator)
    theirs.enable_hook_to_track_layer_activation_values()
    model = build_model("vgg16", CLASSES, width=1.0, dropout=0.0)
    tensors = map_weights(theirs, model)
    theirs.train()
    model.train()  # both: BatchNorm on batch statistics, as in training
    weights = {"alpha": args.affinity, "beta": args.dispersion, "gamma": args.compactness}
    objective = get_objective("moda", weights)
    their_optimizer, our_optimizer = authors_sgd(theirs), authors_sgd(model)
    print(f"moda vgg16 (512-512 classifier): {tensors} tensors mapped; weights affinity "
          f"{args.affinity}, dispersion {args.dispersion}, compactness {args.compactness}; "
          f"batch {args.batch}; SGD 0.05, momentum 0.9, Nesterov")
    print(StepGaps.header("part gaps (ce/aff/dis/comp)", 36))
    worst = 0.0
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, CLASSES, (args.batch,), generator=generator)

        their_optimizer.zero_grad()
        logits = theirs(x)
        their_parts = [nn.functional.cross_entropy(logits, y),
                       *authors_terms(theirs.get_modular_activations_of_current_batch(), y)]
        their_loss = their_parts[0] + (args.affinity * their_parts[1]
                                       + args.dispersion * their_parts[2]
                                       + args.compactness * their_parts[3])
        their_loss.backward()
        their_grad = torch.cat([p.grad.flatten() for p in theirs.parameters()])
        their_optimizer.step()

        our_optimizer.zero_grad()
        with objective.capture(model) as captured:
            logits = model(x)
        our_loss, parts = objective.loss(logits, y, captured)
        our_loss.backward()
        our_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        our_optimizer.step()
        # dnnmod logs the affinity (a similarity); their loss term is 1 − affinity.
        our_parts = [parts["cross_entropy"], 1 - parts["affinity"], parts["dispersion"],
                     parts["compactness"]]

        gaps = StepGaps.of(their_loss, our_loss, their_parts, our_parts, their_grad, our_grad,
                           theirs, model)
        worst = max(worst, gaps.decisive)
        print(gaps.row(step, their_loss.item(), 36))
    agree = worst <= args.tolerance
    print(f"{'parity' if agree else 'DIFFERENT'}: largest relative gap {worst:.1e} "
          f"(tolerance {args.tolerance:.0e}); a training step has no masks to compare")
    return agree


def stand_in(name: str, **attributes) -> None:
    """An empty module ``name`` with ``attributes``, where the authors' code imports one that
    is not installed and the compared code path does not use it."""
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def mwt_parity(args) -> bool:
    source = authors_source(args.authors, "modular_trainer.py")
    sys.path.insert(0, str(source))
    # Patched at run time: their trainer imports TensorBoard at import time (for logging,
    # unused here), and its loss reads a DEVICE global their __main__ sets.
    stand_in("torch.utils.tensorboard", SummaryWriter=None)
    torch.set_default_dtype(torch.float64)
    trainer = importlib.import_module("modular_trainer")
    trainer.DEVICE = torch.device("cpu")
    vgg = importlib.import_module("models.vgg_masked")

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    theirs = vgg.VGG(vgg.make_layers(vgg.cfgs["D"], batch_norm=True), num_classes=CLASSES)
    randomise_norms(theirs, generator)
    # Patched at run time: dropout off on both sides (dnnmod's vgg16 built with dropout 0),
    # so that both draw no random numbers; it is the model's, not MwT's step's.
    for layer in theirs.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    objective = get_objective("mwt", {"alpha": args.alpha, "beta": args.beta})
    model = objective.prepare(build_model("vgg16", CLASSES, width=1.0, dropout=0.0))
    tensors = map_weights(theirs, model)
    theirs.train()
    model.train()
    their_optimizer, our_optimizer = authors_sgd(theirs), authors_sgd(model)
    print(f"mwt vgg16 (every conv but the first gated): {tensors} tensors mapped (generators "
          f"included); alpha {args.alpha}, beta {args.beta}; batch {args.batch}; SGD 0.05, "
          f"momentum 0.9, Nesterov")
    print(f"{StepGaps.header('part gaps (ce/coh/coup)', 27)} {'masks >0 differ':>15}")
    worst, masks_differ = 0.0, 0
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, CLASSES, (args.batch,), generator=generator)

        their_optimizer.zero_grad()
        logits = theirs(x)
        their_masks = theirs.get_masks()
        cohesion, coupling, _, _ = trainer.loss_func_cos(their_masks, y)
        their_parts = [nn.functional.cross_entropy(logits, y), cohesion, coupling]
        their_loss = their_parts[0] + args.alpha * cohesion + args.beta * coupling
        their_loss.backward()
        their_grad = torch.cat([p.grad.flatten() for p in theirs.parameters()])
        their_optimizer.step()

        our_optimizer.zero_grad()
        with objective.capture(model) as captured:
            logits = model(x)
        our_masks = list(captured.values())
        our_loss, parts = objective.loss(logits, y, captured)
        our_loss.backward()
        our_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        our_optimizer.step()
        # dnnmod logs the cohesion (a similarity); their loss term is 1 − cohesion.
        our_parts = [parts["cross_entropy"], 1 - parts["cohesion"], parts["coupling"]]

        masks_differ = sum(int(((t > 0) != (o > 0)).sum())
                           for t, o in zip(their_masks, our_masks, strict=True))
        gaps = StepGaps.of(their_loss, our_loss, their_parts, our_parts, their_grad, our_grad,
                           theirs, model)
        worst = max(worst, gaps.decisive)
        print(f"{gaps.row(step, their_loss.item(), 27)} {masks_differ:15d}")
    agree = worst <= args.tolerance and masks_differ == 0
    print(f"{'parity' if agree else 'DIFFERENT'}: largest relative gap {worst:.1e} "
          f"(tolerance {args.tolerance:.0e}), {masks_differ} per-sample masks (> 0) differ at "
          f"step {args.steps}")
    return agree


class _StableArgsort(types.ModuleType):
    """numpy, with ``argsort`` stable (equal values keep their order)."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def argsort(values, *args, **kwargs):
        return np.argsort(values, kind="stable")


def cnnsplitter_parity(args) -> bool:
    from dnnmod.approaches.cnnsplitter import (
        CNNSplitter,
        gene_layout,
        initial_genes,
        jaccard_difference,
        kernel_importance,
        population_logits,
        score_in_class_order,
    )
    from dnnmod.data import load_dataset, make_splits, prepare
    from dnnmod.modules.inference import kept_channel_pass
    from dnnmod.modules.masking import masked_logits
    from dnnmod.training.train import Recipe, train

    source = authors_source(args.authors, "module_recorder.py")
    sys.path.insert(0, str(source))
    module_tools = importlib.import_module("utils.module_tools")
    recorder = importlib.import_module("module_recorder")  # random.seed(10) at its import
    their_simcnn = importlib.import_module("models.simcnn")

    with tempfile.TemporaryDirectory() as root:
        prepare("digits", Path(root))
        make_splits(Path(root), "digits", seed=args.seed)
        data = load_dataset(Path(root), "digits", seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model("simcnn", CLASSES, width=args.width, batch_norm=False,
                        hidden_features=round(512 / args.width))  # 512 units, as theirs
    convs = [layer for layer in model.modules() if isinstance(layer, nn.Conv2d)]
    theirs = their_simcnn.SimCNN(num_classes=CLASSES, conv_configs=[
        (conv.in_channels, conv.out_channels) for conv in convs])
    tensors = map_weights(theirs, model)
    model = train(model, data, Recipe(epochs=args.epochs, batch_size=64, lr=0.05),
                  seed=args.seed).model.eval()
    map_weights(model, theirs)
    print(f"trained {args.epochs} epoch(s); scoring the population", flush=True)
    hp = CNNSplitter().resolve({})
    images = data.val.take(range(min(args.images, len(data.val))))
    structure = trace_structure(model, (1, *images.images.shape[1:]))
    importance, _ = kernel_importance(model, structure, images, CLASSES, hp["confidence"])
    order = {name: torch.sort(value, dim=1, descending=True, stable=True).indices
             for name, value in importance.items()}
    layout = gene_layout(structure, order, hp)
    groups = list(layout.groups)
    sizes = [group.size for group in structure.conv_groups]
    if any(size < hp["small_layer_groups"] for size in sizes):
        raise SystemExit(f"--width {args.width}: a layer of fewer than 10 kernels, which the "
                         f"authors cut into 10 groups, some empty (dnnmod: one per kernel)")
    # their SimCNN/CIFAR-10 configure: conv_0..conv_6 sensitive
    sensitive = [layer < 7 for layer in range(len(groups))]
    numbers = np.random.default_rng(args.seed)
    populations = torch.stack([initial_genes(layout, sensitive, args.population, hp, numbers)
                               for _ in range(CLASSES)])
    x, labels = images.float_batch(torch.arange(len(images)))
    x, labels = x.double(), labels.cpu()

    # dnnmod: own-class logits of the masked model in float64, and the search's float32 pass
    model64 = build_model("simcnn", CLASSES, width=args.width, batch_norm=False,
                          hidden_features=round(512 / args.width)).double().eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        ours = torch.stack([masked_logits(model64, structure, layout.decode(populations[c], c),
                                          x)[:, :, c] for c in range(CLASSES)])
    search, _ = population_logits(model, structure, images, layout, populations,
                                  [{} for _ in range(CLASSES)],
                                  kept_channel_pass(model, structure))
    kernel_sets = [layout.kernel_sets(populations[c], c) for c in range(CLASSES)]

    # theirs: each solution's module extracted and run, then the recorder's fitness
    configs = types.SimpleNamespace(
        model_name="simcnn", sorted_kernel_idx=None, num_sol_per_pop=args.population,
        sensitive_layer_idx=[i for i, s in enumerate(sensitive) if s],
        sensitive_layer_kernel=[n for n, s in zip(sizes, sensitive, strict=True) if s],
        sensitive_layer_group=[g for g, s in zip(layout.genes_per_group, sensitive,
                                                 strict=True) if s],
        non_sensitive_layer_idx=[i for i, s in enumerate(sensitive) if not s],
        non_sensitive_layer_kernel=[n for n, s in zip(sizes, sensitive, strict=True) if not s],
        non_sensitive_layer_group=[g for g, s in zip(layout.genes_per_group, sensitive,
                                                     strict=True) if not s])
    batches = [(x[i:i + 100], labels[i:i + 100]) for i in range(0, len(x), 100)]
    theirs.double().eval()
    torch.set_default_dtype(torch.float64)  # their extraction builds each module afresh
    explorer_outputs = []
    for c in range(CLASSES):
        configs.sorted_kernel_idx = [order[g][c].tolist() for g in groups]
        explorer_outputs.append([
            (*module_tools.cal_fitness(populations[c, s].numpy(), theirs, c, batches, configs),
             s) for s in range(args.population)])
    torch.set_default_dtype(torch.float32)
    print("their modules run; their recorder's fitness", flush=True)
    recorder.number_class, recorder.configs, recorder.NUM_CPU = CLASSES, configs, args.threads
    recorder.alpha = hp["alpha"]
    recorder.acc_thresholds = {2: hp["accuracy_thresholds"][0], 4: hp["accuracy_thresholds"][1],
                               8: hp["accuracy_thresholds"][2],
                               CLASSES: hp["final_accuracy_threshold"]}
    recorder.np = _StableArgsort("numpy")
    diff = recorder.cal_diff_with_multiprocess(explorer_outputs)
    random.seed(10)  # their recorder's state at generation 0: its class order is this shuffle
    state, class_order = random.getstate(), list(range(CLASSES))
    random.shuffle(class_order)
    random.setstate(state)
    fitness, top = recorder.cal_fitness(generation_idx=0, explorer_outputs=explorer_outputs,
                                        diff=diff, acc_ratio=hp["alpha"])
    scores = score_in_class_order(
        class_order, list(ours), labels, kernel_sets, accuracy_weight=hp["alpha"],
        alpha=hp["alpha"], accuracy_thresholds=hp["accuracy_thresholds"],
        final_accuracy_threshold=hp["final_accuracy_threshold"], survivors=hp["survivors"])

    their_logits = torch.tensor(np.stack([[o[0][:, 0] for o in per] for per in
                                          explorer_outputs]))
    logit_gap = difference(their_logits, ours)
    search_gap = difference(their_logits, search.double())
    names = [[{f"conv_{layer}_k_{k}" for layer, group in enumerate(groups)
               for k in layout.decode(populations[c][s:s + 1], c)[group][0].nonzero().flatten()
               .tolist()} for s in range(args.population)] for c in range(CLASSES)]
    kernels_differ = sum(set(explorer_outputs[c][s][2]) != names[c][s]
                         for c in range(CLASSES) for s in range(args.population))
    diff_gap = max(float((torch.tensor(diff[i, j]).double()
                          - jaccard_difference(kernel_sets[i], kernel_sets[j])).abs().max())
                   for i in range(CLASSES) for j in range(i + 1, CLASSES))
    theirs_top = torch.tensor(top[:, 1:4])
    ours_top = torch.stack([scores.fitness_of, scores.accuracy, scores.difference], 1).double()
    same_count = theirs_top.shape == ours_top.shape
    top_gap = (theirs_top - ours_top).abs().max(0).values.tolist() if same_count else None
    scored = scores.fitness[:, :, 0] == CLASSES
    solution_gap = float((torch.tensor(fitness, dtype=torch.float64)
                          - torch.where(scored, scores.fitness[:, :, 1], 0.0)).abs().max())
    print(f"cnnsplitter simcnn (CNNSplitter's, width {args.width}): {tensors} tensors mapped, "
          f"trained {args.epochs} epoch(s) on digits; {CLASSES} classes x {args.population} "
          f"solutions (dnnmod's initialiser), {len(images)} validation images; class order "
          f"{class_order}")
    print(f"own-class logits, max |gap|: {logit_gap[0]:.1e} (masked model, float64), "
          f"{search_gap[0]:.1e} (the search's float32 kept-channel pass)")
    print(f"kept kernel sets differing: {kernels_differ} of {CLASSES * args.population}; "
          f"1 - Jaccard table, max |gap|: {diff_gap:.1e} (theirs is float32)")
    if same_count:
        print(f"surviving 10-class compositions: {len(ours_top)} on both sides; max |gap| "
              f"fitness {top_gap[0]:.1e}, accuracy {top_gap[1]:.1e}, diff {top_gap[2]:.1e}")
    else:
        print(f"surviving 10-class compositions: {len(theirs_top)} theirs, {len(ours_top)} "
              f"dnnmod's")
    print(f"solution fitness: {int(scored.sum())} solutions in a surviving composition (theirs "
          f"non-zero: {int((fitness > 0).sum())}), max |gap| {solution_gap:.1e}")
    worst = max(logit_gap[1], diff_gap, solution_gap, *(top_gap or [math.inf]))
    agree = worst <= args.tolerance and kernels_differ == 0
    print(f"{'parity' if agree else 'DIFFERENT'}: largest gap {worst:.1e} (tolerance "
          f"{args.tolerance:.0e})")
    return agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    approaches = parser.add_subparsers(dest="approach", required=True)
    grad = approaches.add_parser("gradsplitter", help="GradSplitter's mask+head steps")
    grad.add_argument("--authors", type=Path, required=True,
                      help="checkout of qibinhang/GradSplitter")
    grad.add_argument("--model", choices=("simcnn", "rescnn"), default="simcnn")
    grad.add_argument("--steps", type=int, default=6)
    grad.add_argument("--batch", type=int, default=8)
    grad.add_argument("--alpha", type=float, default=0.1)
    grad.add_argument("--init-spread", type=float, default=0.004,
                      help="initial scores uniform in ± this (0: the authors' ones)")
    grad.add_argument("--placement", choices=("relu", "outputs"), default="relu",
                      help="where dnnmod's masks go: its ReLUs (as GradSplitter does now) or "
                           "its convs' and norms' outputs (as it did before dc5d45c)")
    moda = approaches.add_parser("moda", help="MODA's modular training step (its loss)")
    moda.add_argument("--authors", type=Path, required=True,
                      help="checkout of icse2025-dnn-modularization/MODA")
    moda.add_argument("--steps", type=int, default=4)
    moda.add_argument("--batch", type=int, default=16)
    moda.add_argument("--affinity", type=float, default=1.0)
    moda.add_argument("--dispersion", type=float, default=1.0)
    moda.add_argument("--compactness", type=float, default=0.3)
    mwt = approaches.add_parser("mwt", help="MwT's modular training step")
    mwt.add_argument("--authors", type=Path, required=True,
                     help="checkout of qibinhang/MwT (or its fork)")
    mwt.add_argument("--steps", type=int, default=4)
    mwt.add_argument("--batch", type=int, default=16)
    mwt.add_argument("--alpha", type=float, default=0.5)
    mwt.add_argument("--beta", type=float, default=1.5)
    splitter = approaches.add_parser("cnnsplitter", help="CNNSplitter's fitness of a population")
    splitter.add_argument("--authors", type=Path, required=True,
                          help="checkout of qibinhang/CNNSplitter")
    splitter.add_argument("--width", type=float, default=0.25,
                          help="channel multiplier of SimCNN (every layer keeps >= 10 kernels)")
    splitter.add_argument("--epochs", type=int, default=2)
    splitter.add_argument("--population", type=int, default=10)
    splitter.add_argument("--images", type=int, default=300)
    # Their CNNSplitter diff table is float32: float32 rounding, not 1e-9.
    for sub, tolerance in ((grad, 1e-9), (mwt, 1e-9), (moda, 1e-9), (splitter, 1e-6)):
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--threads", type=int, default=2)
        sub.add_argument("--tolerance", type=float, default=tolerance,
                         help="largest accepted relative gap of losses, parts and gradients")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.authors.is_dir():
        raise SystemExit(f"--authors {args.authors}: no such directory")
    agree = {"gradsplitter": gradsplitter_parity, "mwt": mwt_parity, "moda": moda_parity,
             "cnnsplitter": cnnsplitter_parity}[args.approach](args)
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()

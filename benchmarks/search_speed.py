"""Speed of GradSplitter's module search: dnnmod's search against the naive reference loop.

Both ways train the same frozen model, kernel scores, heads and images with the same
schedule pieces, interleaved step by step so that both see the same machine load:

naive (written out below, the reference implementation's way)
    mask+head step: for each module m in turn, the base model's forward pass with m's binary
    masks at the ReLU outputs (straight-through estimator), then all heads, the loss, one
    backward pass;
    head-only epoch: the same per-module masked forward (without gradients) in every epoch.
dnnmod (``dnnmod.approaches.gradsplitter``)
    mask+head step: ``mask_loss``, all modules in one batched masked pass (a dropped kernel's
    score needs its activation, which the kept-channel pass does not compute);
    head-only phase: the masked logits once per phase (``run``, each module as its
    kept-channel sub-network on a CPU: BatchNorms folded, channels-last convs), then epochs
    over them.

Kernel scores start at +1 for a random fraction r of each group's kernels (the keep rate;
at least one per group) and -1 for the rest: the search starts at r = 1 and drops kernels as
it goes. The reference schedule (5 head-only epochs, then 20 x [5 mask+head, 2 head-only])
is extrapolated from the measured epochs as if every mask epoch ran at keep rate r; the
per-epoch validation pass, the same on both sides, is left out. Before timing, the first two
steps of both ways are compared from the same state: losses and score gradients must agree
within float tolerance. Achieved GFLOP/s: the FLOPs of one step (``FlopCounterMode``, forward
and backward) over its median time, against this machine's float32 matmul peak.

On CUDA (``--device cuda``) the head-only phase's logits also come from the batched masked
pass (the kept-channel pass is CPU-only); every timing ends with a synchronisation.

    python benchmarks/search_speed.py                 # simcnn, vgg16, resnet20 at width 1.0
    python benchmarks/search_speed.py --models simcnn --images 128 --keep-rates 0.5
    python benchmarks/search_speed.py --device cuda --images 2560 --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dnnmod.approaches import resolve_hyperparameters
from dnnmod.approaches.gradsplitter import _BinaryMask, mask_loss
from dnnmod.data import ImageSet
from dnnmod.devices import synchronize
from dnnmod.models import build_model
from dnnmod.modules.activations import activation_sites
from dnnmod.modules.heads import LogitMLPHead
from dnnmod.modules.inference import kept_channel_pass, run
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.structure import trace_structure

#: relative L2 difference of the score gradients accepted between the two ways. A score's
#: gradient sums gradient x activation over batch x positions; in an untrained deep net these
#: sums cancel heavily, so any two float32 evaluation orders differ: against float64, the naive
#: way's own error reaches 3e-3 on full-width simcnn's first groups (the fast way's 2e-6 there;
#: on other draws the other way round). Both ways agree to 1e-9 in float64
#: (tests/test_search_speed.py).
GRADIENT_TOLERANCE = 1e-2


def matmul_peak_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul rate of ``device`` (GFLOP/s; on a CPU at the current thread count)."""
    if device.type == "cuda":
        size *= 4  # a 2048 product is over before an H100-class device is busy
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def naive_mask_loss(model, structure, sites, scores, head, x, y, alpha):
    """The reference's mask+head loss: one masked forward pass per module, in turn."""
    masks = {name: _BinaryMask.apply(s) for name, s in scores.items()}
    modules = next(iter(masks.values())).shape[0]
    logits = torch.stack([
        masked_logits(model, structure, {n: m[k:k + 1] for n, m in masks.items()}, x,
                      sites)[0]
        for k in range(modules)])
    loss = torch.nn.functional.cross_entropy(head(logits), y)
    penalty = torch.cat([_BinaryMask.apply(s).flatten() for s in scores.values()])
    return loss + alpha * penalty.mean()


def naive_head_logits(model, structure, scores, x):
    """The reference's head-only forward: every module's masked pass, without gradients."""
    with torch.no_grad():
        masks = {name: (s > 0).float() for name, s in scores.items()}
        return torch.stack([
            masked_logits(model, structure, {n: m[k:k + 1] for n, m in masks.items()}, x)[0]
            for k in range(next(iter(masks.values())).shape[0])])


class Search:
    """One side's trainable state: kernel scores, heads and their Adam."""

    def __init__(self, scores, head, mask_lr, lr):
        self.scores = {n: s.clone().requires_grad_(True) for n, s in scores.items()}
        self.head = copy.deepcopy(head)
        self.optimizer = torch.optim.Adam([{"params": list(self.head.parameters()), "lr": lr},
                                           {"params": list(self.scores.values()),
                                            "lr": mask_lr}])

    def load(self, other: Search) -> None:
        """Take ``other``'s scores, heads and optimizer state."""
        with torch.no_grad():
            for name, tensor in other.scores.items():
                self.scores[name].copy_(tensor)
        self.head.load_state_dict(other.head.state_dict())
        self.optimizer.load_state_dict(other.optimizer.state_dict())

    def step(self, loss_of, *inputs) -> tuple[float, float]:
        """One optimizer step on ``loss_of(self, *inputs)``; returns (loss, seconds). Reading
        the loss waits for the step's queued work, so the time is right on CUDA too."""
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_of(self, *inputs)
        loss.backward()
        self.optimizer.step()
        value = loss.item()
        return value, time.perf_counter() - started


def initial_state(structure, modules, keep_rate, generator):
    scores = {}
    for group in structure.conv_groups:
        kept = torch.rand(modules, group.size, generator=generator) < keep_rate
        kept[torch.arange(modules), torch.randint(group.size, (modules,),
                                                  generator=generator)] = True
        scores[group.name] = torch.where(kept, 1.0, -1.0)
    return scores


def check_agreement(naive, fast, naive_loss, fast_loss, batches) -> list[str]:
    """Losses and score gradients of both ways over the first steps, each from one state
    (``fast`` takes ``naive``'s state before each step: Adam turns float noise in near-zero
    gradients into whole steps, so two runs drift apart within a few steps however exact)."""
    lines = []
    for step, (x, y) in enumerate(batches, start=1):
        fast.load(naive)
        losses = [side.step(loss, x, y)[0]
                  for side, loss in ((naive, naive_loss), (fast, fast_loss))]
        naive_grad, fast_grad = (torch.cat([s.scores[n].grad.flatten() for n in s.scores])
                                 for s in (naive, fast))
        grad_error = ((naive_grad - fast_grad).norm() / naive_grad.norm()).item()
        loss_error = abs(losses[0] - losses[1]) / abs(losses[0])
        agree = loss_error < 1e-5 and grad_error < GRADIENT_TOLERANCE
        lines.append(f"step {step}: loss {losses[0]:.6f} vs {losses[1]:.6f} (rel. diff "
                     f"{loss_error:.1e}), score gradients rel. L2 diff {grad_error:.1e}: "
                     f"{'agree' if agree else 'DIFFER'}")
        if not agree:
            raise SystemExit("\n".join(lines) + "\nthe two ways disagree")
    return lines


def step_flops(side: Search, loss_of, *inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        side.step(loss_of, *inputs)
    return counter.get_total_flops()


def benchmark(arch, width, modules, images, keep_rate, batch_size, seed, peak, device):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(arch, modules, width).eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    structure = trace_structure(model)
    sites = activation_sites(model, structure)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, modules, (images,), generator=generator)
    train = ImageSet(pixels, labels, [str(i) for i in range(modules)],
                     torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device)
    hp = resolve_hyperparameters("gradsplitter", {"batch_size": batch_size})
    scores = {name: score.to(device) for name, score
              in initial_state(structure, modules, keep_rate, generator).items()}
    head = LogitMLPHead(list(range(modules)), modules, hp["head_hidden"]).to(device)
    started = time.perf_counter()
    kept_pass = kept_channel_pass(model, structure)
    setup_seconds = time.perf_counter() - started
    order = torch.randperm(images, generator=generator).to(device)
    steps = [train.float_batch(order[b:b + batch_size]) for b in range(0, images, batch_size)]
    alpha = hp["alpha"]

    def naive_loss(side, x, y):
        return naive_mask_loss(model, structure, sites, side.scores, side.head, x, y, alpha)

    def fast_loss(side, x, y):
        return mask_loss(model, structure, sites, side.scores, side.head, x, y, alpha)

    naive, fast = (Search(scores, head, hp["mask_lr"], hp["lr"]) for _ in range(2))
    agreement = check_agreement(naive, fast, naive_loss, fast_loss, steps[:2])
    flops = {"naive": step_flops(naive, naive_loss, *steps[0]),
             "dnnmod": step_flops(fast, fast_loss, *steps[0])}

    # Mask+head epoch: steps interleaved, the first of each pair alternating.
    mask_seconds = {"naive": [], "dnnmod": []}
    for index, (x, y) in enumerate(steps):
        pair = [("naive", naive, naive_loss), ("dnnmod", fast, fast_loss)]
        for name, side, loss in (pair if index % 2 == 0 else pair[::-1]):
            mask_seconds[name].append(side.step(loss, x, y)[1])

    # Head-only epoch. naive: the masked forward in every step; dnnmod: once per phase.
    fixed = {name: (s > 0).float() for name, s in fast.scores.items()}
    synchronize(device)
    started = time.perf_counter()
    cached = run(model, train, structure=structure, masks=fixed, kept_pass=kept_pass)
    synchronize(device)
    cache_seconds = time.perf_counter() - started
    def naive_head_loss(side, x, y):
        logits = naive_head_logits(model, structure, side.scores, x)
        return torch.nn.functional.cross_entropy(side.head(logits), y)

    def fast_head_loss(side, index, y):
        return torch.nn.functional.cross_entropy(side.head(cached[:, index]), y)

    head_seconds = {"naive": [], "dnnmod": []}
    for begin in range(0, images, batch_size):
        x, y = steps[begin // batch_size]
        head_seconds["naive"].append(naive.step(naive_head_loss, x, y)[1])
        head_seconds["dnnmod"].append(
            fast.step(fast_head_loss, order[begin:begin + batch_size], y)[1])

    mask_epoch = {name: sum(times) for name, times in mask_seconds.items()}
    head_epoch = {name: sum(times) for name, times in head_seconds.items()}
    head_epochs = hp["init_head_epochs"] + hp["rounds"] * hp["head_epochs"]
    mask_epochs = hp["rounds"] * hp["mask_epochs"]
    head_phases = 1 + hp["rounds"]
    schedule = {"naive": mask_epochs * mask_epoch["naive"] + head_epochs * head_epoch["naive"],
                "dnnmod": mask_epochs * mask_epoch["dnnmod"] + head_epochs * head_epoch["dnnmod"]
                + head_phases * cache_seconds}
    step_ratios = [a / b for a, b in zip(mask_seconds["naive"], mask_seconds["dnnmod"],
                                         strict=True)]
    median_step = {name: statistics.median(times) for name, times in mask_seconds.items()}

    print(f"\n{arch} width {width}, {modules} modules, keep rate {keep_rate}, {images} images, "
          f"batch {batch_size}; dnnmod's head-phase logits: "
          f"{'kept-channel pass' if kept_pass is not None else 'batched masked pass'} "
          f"(built in {setup_seconds:.1f} s)")
    for line in agreement:
        print("  " + line)
    print(f"  {'':26s} {'naive':>10s} {'dnnmod':>10s} {'ratio':>7s}")
    print(f"  {'mask epoch (images/s)':26s} {images / mask_epoch['naive']:10.1f} "
          f"{images / mask_epoch['dnnmod']:10.1f} "
          f"{mask_epoch['naive'] / mask_epoch['dnnmod']:6.2f}x"
          f"  (median per step {statistics.median(step_ratios):.2f}x)")
    print(f"  {'head epoch (images/s)':26s} {images / head_epoch['naive']:10.1f} "
          f"{images / (head_epoch['dnnmod'] + cache_seconds / 2):10.1f} "
          f"{head_epoch['naive'] / (head_epoch['dnnmod'] + cache_seconds / 2):6.2f}x"
          f"  (dnnmod: cache {cache_seconds:.2f} s per phase, shared by its 2 epochs)")
    print(f"  {'whole schedule (s)':26s} {schedule['naive']:10.0f} {schedule['dnnmod']:10.0f} "
          f"{schedule['naive'] / schedule['dnnmod']:6.2f}x  "
          f"({mask_epochs} mask + {head_epochs} head epochs, {head_phases} head phases)")
    for name in ("naive", "dnnmod"):
        rate = flops[name] / median_step[name] / 1e9
        print(f"  {name + ' GFLOP/s':26s} {rate:10.1f}  {flops[name] / 1e9:.1f} GFLOP per step,"
              f" {rate / peak:.0%} of the {peak:.0f} GFLOP/s matmul peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="simcnn,vgg16,resnet20",
                        help="comma-separated zoo architectures")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--modules", type=int, default=10, help="N, the number of classes")
    parser.add_argument("--images", type=int, default=640, help="training images per epoch")
    parser.add_argument("--keep-rates", default="1.0,0.5",
                        help="comma-separated fractions of kernels each module keeps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:index]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = matmul_peak_gflops(device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, float32 matmul peak {peak:.0f} GFLOP/s")
    for arch in args.models.split(","):
        for keep_rate in (float(rate) for rate in args.keep_rates.split(",")):
            benchmark(arch, args.width, args.modules, args.images, keep_rate, args.batch_size,
                      args.seed, peak, device)


if __name__ == "__main__":
    main()

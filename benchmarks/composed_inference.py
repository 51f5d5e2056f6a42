"""Inference throughput of composed modules: masked vs extracted, sequential vs batched.

A composed model runs N per-class modules on every input. Each module can run as the *masked*
base model (dropped channels zeroed, full-size compute) or as a physically *extracted* smaller
network, and the N modules can run one after the other or all at once. For a few zoo models
with N = 10 random modules keeping ~25 % of each group's kernels (seeded), this measures
images per second (batch of random 32x32 inputs, one warm-up pass, best of 3 timed passes,
interleaved across variants) of

    base                  the base model alone (one pass, for scale)
    masked sequential     N masked passes, masked_logits with M = 1 each
    masked batched        one masked pass over the N-times-repeated batch (M = N)
    extracted sequential  N extracted modules one after the other
    extracted fused       FusedModules: the N padded modules in one vmap-ed network

and the last two again for a sub-task T of 3 classes. An image counts once however many
modules process it. The ratios printed compare batched with sequential masked execution,
fused with sequential extracted modules, and every variant with the base model.

    python benchmarks/composed_inference.py                      # simcnn, vgg16, resnet20
    python benchmarks/composed_inference.py --arch resnet20 --width 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dnnmod.models import build_model
from dnnmod.modules.extract import (
    FusedModules,
    count_parameters,
    extract_module,
    pad_and_extract,
)
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.structure import ModelStructure, trace_structure

DEMO_MODELS = (("simcnn", 0.125), ("vgg16", 0.125), ("resnet20", 0.5))


def random_keeps(structure: ModelStructure, modules: int, rate: float,
                 seed: int) -> list[dict[str, torch.Tensor]]:
    """``modules`` kernel sets keeping round(rate x size) random kernels (>= 1) per group."""
    generator = torch.Generator().manual_seed(seed)
    keeps = []
    for _ in range(modules):
        keep = {}
        for group in structure.groups:
            kept = torch.zeros(group.size, dtype=torch.bool)
            count = max(1, round(rate * group.size))
            kept[torch.randperm(group.size, generator=generator)[:count]] = True
            keep[group.name] = kept
        keeps.append(keep)
    return keeps


def best_seconds(variants: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Best wall time of each variant over ``repeats`` rounds, after one warm-up call each.

    Each round times every variant once, so a burst of load from other processes on a shared
    machine slows one round of all variants rather than every measurement of one variant.
    """
    for run in variants.values():
        run()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def benchmark(arch: str, width: float, modules: int, subset: int, rate: float,
              batch_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model(arch, modules, width).eval()
    structure = trace_structure(model)
    keeps = random_keeps(structure, modules, rate, seed)
    masks = [{name: keep[name][None].float() for name in keep} for keep in keeps]
    all_masks = {group.name: torch.stack([keep[group.name] for keep in keeps]).float()
                 for group in structure.groups}
    extracted = [extract_module(model, structure, keep) for keep in keeps]
    fused = FusedModules(pad_and_extract(model, structure, keeps))
    fused_subset = FusedModules(pad_and_extract(model, structure, keeps[:subset]))
    x = torch.randn(batch_size, 3, 32, 32)

    variants: dict[str, Callable[[], object]] = {
        "base": lambda: model(x),
        f"masked sequential (N={modules})":
            lambda: [masked_logits(model, structure, mask, x) for mask in masks],
        f"masked batched (N={modules})": lambda: masked_logits(model, structure, all_masks, x),
        f"extracted sequential (N={modules})": lambda: [module(x) for module in extracted],
        f"extracted fused (N={modules})": lambda: fused(x),
        f"extracted sequential (T={subset})":
            lambda: [module(x) for module in extracted[:subset]],
        f"extracted fused (T={subset})": lambda: fused_subset(x),
    }
    with torch.no_grad():
        throughput = {name: batch_size / seconds
                      for name, seconds in best_seconds(variants).items()}

    mean_size = sum(count_parameters(m) for m in extracted) / len(extracted)
    print(f"\n{arch} width {width}: {len(structure.groups)} groups, "
          f"{structure.total_kernels} kernels, base {count_parameters(model)} parameters, "
          f"extracted modules {mean_size / count_parameters(model):.1%} of them on average")
    base = throughput["base"]
    print(f"{'variant':34s} {'images/s':>10s} {'vs base':>8s}")
    for name, value in throughput.items():
        print(f"{name:34s} {value:10.0f} {value / base:7.2f}x")
    names = list(throughput)
    print(f"batched / sequential masked:      {throughput[names[2]] / throughput[names[1]]:.2f}x")
    print(f"fused / sequential extracted (N): {throughput[names[4]] / throughput[names[3]]:.2f}x")
    print(f"fused / sequential extracted (T): {throughput[names[6]] / throughput[names[5]]:.2f}x")
    print(f"fused / batched masked (N):       {throughput[names[4]] / throughput[names[2]]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="one zoo architecture (default: the demo models)")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--modules", type=int, default=10, help="N, the number of classes")
    parser.add_argument("--subset", type=int, default=3, help="|T|, classes of the sub-task")
    parser.add_argument("--keep-rate", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, keep rate {args.keep_rate}")
    models = [(args.arch, args.width)] if args.arch else DEMO_MODELS
    for arch, width in models:
        benchmark(arch, width, args.modules, args.subset, args.keep_rate, args.batch_size,
                  args.seed)


if __name__ == "__main__":
    main()

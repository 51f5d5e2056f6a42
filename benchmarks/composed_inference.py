"""Composed inference: N modules as one composed model vs the extracted modules one by one.

A composed model runs N per-class modules on every input. The naive way runs the N physically
extracted modules (:func:`dnnmod.modules.extract.extract_module`) one after the other. The
composed model (:class:`dnnmod.modules.compose.FusedModuleSet`) normalises once and then runs
all modules in one fused (vmap-ed) pass, or the extracted modules one after the other reading
a first layer computed once for all, or each computing its own, whichever it measured fastest
on the first batch of a batch-size bucket. For a few zoo models with N = 10 random modules
keeping ~25 % of each group's kernels (seeded), at batch sizes 1, 32 and 256 (random 32x32
inputs, one warm-up pass, best of 3 timed passes, interleaved across variants), this measures
images per second of

    base          the base model alone (one pass, for scale)
    naive         the N extracted modules one after the other
    fused         the composed model forced to its fused pass
    sequential    the composed model forced to its sequential pass (shared first layer)
    separate      the composed model forced to its separate pass (BatchNorms folded)
    composed      the composed model as dispatched (its choice printed)

and prints each variant's speed-up over the naive way, naive time / variant time (an image
counts once however many modules process it), with the base model's time relative to the
naive way's for scale. The masked model (full-size compute with dropped channels zeroed) is
not compared: composed models never run it. On CUDA (``--device cuda``) the composed model
always runs its fused pass, and every timing ends with a synchronisation.

    python benchmarks/composed_inference.py                      # the models of the README
    python benchmarks/composed_inference.py --arch resnet20 --width 0.5 --batch-sizes 1 32
    python benchmarks/composed_inference.py --device cuda --batch-sizes 1 32 256 4096
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import pandas as pd
import torch

from dnnmod.devices import synchronize
from dnnmod.models import build_model
from dnnmod.modules.compose import FusedModuleSet, batch_bucket
from dnnmod.modules.extract import count_parameters, extract_module
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import ModelStructure, trace_structure

MODELS = (("simcnn", 0.125), ("vgg16", 0.125), ("vgg16", 1.0), ("resnet20", 1.0))


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


def best_seconds(variants: dict[str, Callable[[], object]], device: torch.device,
                 repeats: int = 3) -> dict[str, float]:
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
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def benchmark(arch: str, width: float, modules: int, rate: float, batch_sizes: list[int],
              seed: int, device: torch.device) -> list[dict]:
    torch.manual_seed(seed)
    model = build_model(arch, modules, width).eval().to(device)
    structure = trace_structure(model)
    keeps = random_keeps(structure, modules, rate, seed)
    module_set = ModuleSet(
        approach="benchmark", classes=list(range(modules)),
        masks={group.name: torch.stack([keep[group.name] for keep in keeps])
               for group in structure.groups},
        head=OwnLogitHead(list(range(modules)), modules), combination="argmax", base={},
        structure=structure)
    extracted = [extract_module(model, structure, keep) for keep in keeps]
    composed = {execution: FusedModuleSet(model, module_set, execution=execution)
                for execution in (None, "fused", "sequential", "separate")}
    head = module_set.head
    mean_size = sum(count_parameters(m) for m in extracted) / len(extracted)
    print(f"{arch} width {width}: {len(structure.groups)} groups, base "
          f"{count_parameters(model)} parameters, extracted modules "
          f"{mean_size / count_parameters(model):.1%} of them on average, first layer shared: "
          f"{composed[None].first_layer is not None}", flush=True)
    rows = []
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, *structure.input_shape[1:], device=device)
        variants: dict[str, Callable[[], object]] = {
            "base": lambda x=x: model(x),
            "naive": lambda x=x: head(torch.stack([module(x) for module in extracted])),
            "fused": lambda x=x: composed["fused"](x),
            "sequential": lambda x=x: composed["sequential"](x),
            "separate": lambda x=x: composed["separate"](x),
            "composed": lambda x=x: composed[None](x),
        }
        with torch.no_grad():
            seconds = best_seconds(variants, device)
            expected = variants["naive"]()
            deviation = float((composed[None](x) - expected).abs().max())
        naive = seconds["naive"]
        rows.append({
            "model": f"{arch} w{width:g}", "batch": batch_size,
            "naive ms": round(naive * 1e3, 1),
            "base": round(naive / seconds["base"], 2),
            "fused": round(naive / seconds["fused"], 2),
            "sequential": round(naive / seconds["sequential"], 2),
            "separate": round(naive / seconds["separate"], 2),
            "composed": round(naive / seconds["composed"], 2),
            "chosen": (composed[None].choice.chosen[batch_bucket(batch_size)]
                       if device.type == "cpu" else "fused"),
            "max |diff|": f"{deviation:.1e}",
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="one zoo architecture (default: the README's models)")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--modules", type=int, default=10, help="N, the number of classes")
    parser.add_argument("--keep-rate", type=float, default=0.25)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:index]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, keep rate {args.keep_rate}, "
          f"N = {args.modules}; speed-ups are naive time / time")
    models = [(args.arch, args.width)] if args.arch else MODELS
    rows = [row for arch, width in models
            for row in benchmark(arch, width, args.modules, args.keep_rate, args.batch_sizes,
                                 args.seed, device)]
    print()
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()

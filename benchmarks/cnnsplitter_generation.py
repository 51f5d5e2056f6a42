"""One CNNSplitter generation: dnnmod's population evaluation vs a pruned network copy per
candidate.

All ways score the same candidates (one random population per class) on the same images and
yield each candidate's own-class logits. dnnmod decodes the population into channel masks and
sends it through the one inference path (:func:`~dnnmod.approaches.cnnsplitter.
population_logits`), in two executions: ``batched``, all candidates in the batched masked pass
(dnnmod's choice on CUDA), and ``kept``, each candidate as its kept-channel sub-network (weights
sliced by index, BatchNorms folded; dnnmod's choice on a CPU). ``extracted`` builds every
candidate's pruned network with :func:`~dnnmod.modules.extract.extract_module` and runs the
images through it, as the reference implementation does. The composition scoring after it is
the same for all and is timed separately. Untrained weights: the speed of a pass does not
depend on their values.

    python benchmarks/cnnsplitter_generation.py [--population 10] [--threads 2]

``--counts`` counts instead of timing, for the paper's models at full width (GradSplitter's
simcnn, rescnn, incecnn with BatchNorm, CNNSplitter's own simcnn and rescnn without) and one
generation-0 population drawn by CNNSplitter's initialiser (``--population`` per class, kernels
ranked at random, either no layer or every layer sensitive): per generation over ``--images``
validation images, the counted FLOPs (FlopCounterMode) and dispatched aten ops (a
TorchDispatchMode) of the batched masked pass (before) and of the grouped kept-channel pass
(after), both chunked as on a GPU with the 8 GiB activation budget, beside the kept-channel
sub-networks' FLOPs (the grouped pass without padding, whose FLOPs equal theirs exactly:
tests/test_cnnsplitter_batched.py). Both passes run on the meta device (shapes only), one
image per chunk, and are scaled to ``--images``; the grouped pass's gathers count once per
chunk, its forward ops once per 256-image batch.

    python benchmarks/cnnsplitter_generation.py --counts [--population 100] [--images 5000]
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dnnmod.approaches.cnnsplitter import (
    DEFAULTS,
    PAPER_MODELS,
    CNNSplitter,
    gene_layout,
    initial_genes,
    population_logits,
    repair,
    score_compositions,
)
from dnnmod.data.dataset import ImageSet
from dnnmod.models import build_model
from dnnmod.modules.extract import extract_module
from dnnmod.modules.grouped_pass import GroupedKeptPass
from dnnmod.modules.inference import (
    CUDA_IMAGES_PER_MODULE,
    MEMORY_BUDGET,
    kept_channel_pass,
    plan_pass,
    run,
)
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.structure import trace_structure

CLASSES = 10


def _images(count: int) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8,
                                  generator=generator),
                    torch.arange(count) % CLASSES, [str(c) for c in range(CLASSES)],
                    torch.full((3,), 0.5), torch.full((3,), 0.25))


def compare(arch: str, width: float, population: int, image_count: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, width=width).eval()
    structure = trace_structure(model, (1, 3, 32, 32))
    generator = torch.Generator().manual_seed(0)
    order = {g.name: torch.stack([torch.randperm(g.size, generator=generator)
                                  for _ in range(CLASSES)]) for g in structure.conv_groups}
    layout = gene_layout(structure, order, CNNSplitter().resolve({}))
    populations = torch.stack([repair(torch.randint(0, 2, (population, layout.length),
                                                    generator=generator, dtype=torch.uint8),
                                      layout) for _ in range(CLASSES)])
    images = _images(image_count)

    started = time.perf_counter()
    batched, _ = population_logits(model, structure, images, layout, populations,
                                   [{} for _ in range(CLASSES)])
    batched_seconds = time.perf_counter() - started

    started = time.perf_counter()  # building the pass (its float64 self-check) counts
    kept, _ = population_logits(model, structure, images, layout, populations,
                                [{} for _ in range(CLASSES)],
                                kept_channel_pass(model, structure))
    kept_seconds = time.perf_counter() - started

    started = time.perf_counter()
    extracted = torch.empty_like(batched)
    for c in range(CLASSES):
        for p in range(population):
            keep = {g: m[0] for g, m in layout.decode(populations[c, p:p + 1], c).items()}
            extracted[c, p] = run(extract_module(model, structure, keep), images)[:, c]
    extracted_seconds = time.perf_counter() - started

    started = time.perf_counter()
    score_compositions(list(batched), images.labels,
                       [layout.kernel_sets(populations[c], c) for c in range(CLASSES)],
                       accuracy_weight=1.0, alpha=DEFAULTS["alpha"],
                       **{key: DEFAULTS[key] for key in ("accuracy_thresholds",
                                                         "final_accuracy_threshold", "survivors")})
    scoring_seconds = time.perf_counter() - started
    return {"batched_s": batched_seconds, "kept_s": kept_seconds,
            "extracted_s": extracted_seconds, "scoring_s": scoring_seconds,
            "max_abs_difference": max(float((batched - extracted).abs().max()),
                                      float((kept - extracted).abs().max())),
            "batched_speedup": extracted_seconds / batched_seconds,
            "kept_speedup": extracted_seconds / kept_seconds}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched in the block on tensors off the CPU (the meta device
    standing for a GPU) that are not views: each is a kernel launch there (or a copy to it).
    The host's planning (indices from the masks, on the CPU) is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [t for t in (*args, *(kwargs or {}).values(), result)
                   if isinstance(t, torch.Tensor)]
        tensors += [t for value in (*args, result) if isinstance(value, (list, tuple))
                    for t in value if isinstance(t, torch.Tensor)]
        self.ops += not func.is_view and any(t.device.type != "cpu" for t in tensors)
        return result


def _counted(call) -> tuple[int, int, object]:
    """FLOPs and dispatched ops of ``call()``, and its result."""
    with torch.no_grad(), FlopCounterMode(display=False) as flops, _OpCounter() as ops:
        result = call()
    return flops.get_total_flops(), ops.ops, result


def generation_counts(arch: str, options: dict, population: int, images: int,
                      sensitive: bool) -> dict[str, float]:
    """One generation's counted FLOPs and ops, before (masked) and after (grouped)."""
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, **options).eval()
    structure = trace_structure(model, (1, 3, 32, 32))
    if GroupedKeptPass.build(model, structure) is None:  # its float64 probe, on the CPU
        raise SystemExit(f"{arch}: the grouped kept-channel pass refuses it")
    generator = torch.Generator().manual_seed(0)
    order = {g.name: torch.stack([torch.randperm(g.size, generator=generator)
                                  for _ in range(CLASSES)]) for g in structure.conv_groups}
    hp = CNNSplitter().resolve({})
    layout = gene_layout(structure, order, hp)
    numbers = np.random.default_rng(0)
    flags = [sensitive] * len(layout.groups)
    genes = torch.cat([initial_genes(layout, flags, population, hp, numbers)
                       for _ in range(CLASSES)])
    decoded = [layout.decode(genes[c * population:(c + 1) * population], c)
               for c in range(CLASSES)]
    masks = {g: torch.cat([d[g] for d in decoded]) for g in layout.groups}
    modules = CLASSES * population
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(1, 3, 32, 32, device="meta")
    batches = math.ceil(images / CUDA_IMAGES_PER_MODULE)
    budget = MEMORY_BUDGET["cuda"]
    masked_chunk = plan_pass(model, (1, 3, 32, 32), modules, "cuda", budget).modules
    counts = {"modules": modules, "masked_flops": 0, "masked_ops": 0, "grouped_flops": 0,
              "grouped_ops": 0, "gather_ops": 0, "kept_flops": 0, "chunks": 0}
    for first in range(0, modules, masked_chunk):
        chunk = {g: m[first:first + masked_chunk] for g, m in masks.items()}
        flops, ops, _ = _counted(functools.partial(
            masked_logits, meta, structure, {g: m.to("meta") for g, m in chunk.items()}, x))
        counts["masked_flops"] += flops * images
        counts["masked_ops"] += ops * batches
    for padding, key in ((None, "grouped"), (0.0, "kept")):
        grouped = (GroupedKeptPass(meta, structure) if padding is None
                   else GroupedKeptPass(meta, structure, padding=padding))
        chunk_size = max(1, min(masked_chunk, budget // 4 // grouped.weight_bytes()))
        for first in range(0, modules, chunk_size):
            chunk = {g: m[first:first + chunk_size] for g, m in masks.items()}
            _, prepare_ops, forward = _counted(functools.partial(grouped.prepare, chunk))
            flops, ops, _ = _counted(functools.partial(forward, x))
            counts[f"{key}_flops"] += flops * images
            if key == "grouped":
                counts["grouped_ops"] += prepare_ops + ops * batches
                counts["gather_ops"] += prepare_ops
                counts["chunks"] += 1
    return counts


def print_counts(population: int, images: int) -> None:
    print(f"one generation: {population} candidates x {CLASSES} classes (generation 0, "
          f"CNNSplitter's initialiser), {images} images; counted on the meta device")
    print(f"{'model':14} {'sensitive':>9} {'kept TFLOP':>10} {'masked TFLOP':>12} "
          f"{'grouped TFLOP':>13} {'masked/kept':>11} {'grouped/kept':>12} "
          f"{'masked ops':>10} {'grouped ops':>11} {'(gathers)':>9} {'chunks':>6}")
    for arch, options in PAPER_MODELS:
        name = arch + ("" if options.get("batch_norm", True) else "-no-bn")
        for sensitive in (False, True):
            c = generation_counts(arch, options, population, images, sensitive)
            print(f"{name:14} {'all' if sensitive else 'none':>9} {c['kept_flops'] / 1e12:10.2f} "
                  f"{c['masked_flops'] / 1e12:12.2f} {c['grouped_flops'] / 1e12:13.2f} "
                  f"{c['masked_flops'] / c['kept_flops']:10.2f}x "
                  f"{c['grouped_flops'] / c['kept_flops']:11.3f}x {c['masked_ops']:10d} "
                  f"{c['grouped_ops']:11d} {c['gather_ops']:9d} {c['chunks']:6d}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=None,
                        help="candidates per class (default 10; 100 with --counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--counts", action="store_true",
                        help="count FLOPs and dispatched ops per generation instead of timing")
    parser.add_argument("--images", type=int, default=5000,
                        help="validation images a generation scores (--counts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.counts:
        print_counts(args.population or 100, args.images)
        return
    args.population = args.population or 10
    # full width: fewer images, so that the copy-per-candidate side finishes in minutes
    cases = [("simcnn", 0.125, 256), ("vgg16", 0.125, 256), ("simcnn", 1.0, 64),
             ("vgg16", 1.0, 32)]
    print(f"{args.population} candidates x {CLASSES} classes, {args.threads} threads")
    print("speedup: extracted time / that execution's time")
    print(f"{'model':8} {'width':>6} {'images':>6} {'batched s':>10} {'kept s':>8} "
          f"{'extracted s':>12} {'scoring s':>10} {'batched':>8} {'kept':>8} {'max |diff|':>11}")
    for arch, width, image_count in cases:
        result = compare(arch, width, args.population, image_count)
        print(f"{arch:8} {width:6} {image_count:6} {result['batched_s']:10.2f} "
              f"{result['kept_s']:8.2f} {result['extracted_s']:12.2f} "
              f"{result['scoring_s']:10.2f} {result['batched_speedup']:7.1f}x "
              f"{result['kept_speedup']:7.1f}x {result['max_abs_difference']:11.2e}")


if __name__ == "__main__":
    main()

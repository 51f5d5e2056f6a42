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
"""

from __future__ import annotations

import argparse
import time

import torch

from dnnmod.approaches.cnnsplitter import (
    DEFAULTS,
    CNNSplitter,
    gene_layout,
    population_logits,
    repair,
    score_compositions,
)
from dnnmod.data.dataset import ImageSet
from dnnmod.models import build_model
from dnnmod.modules.extract import extract_module
from dnnmod.modules.inference import kept_channel_pass, run
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=10, help="candidates per class")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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

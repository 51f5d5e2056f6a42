"""E5 sub-task reuse: scores computed once vs the composed model rebuilt and rerun per sub-task.

For a demo-width model with N = 10 random modules (seeded, ~50 % of each group's kernels) on
the digits test split (360 images), this times the 1,013 sub-tasks of size 2..10 three ways:

    scores once   dnnmod.reuse.subtasks.evaluate_subtasks: one batched masked pass of all
                  modules, base-model logits once, union sizes and FLOPs from kept-channel
                  counts; per sub-task only tensor indexing (everything included: the shared
                  passes, the cost probe, the separate modules' costs)
    rerun masked  per sub-task, a masked pass of T's modules over T's test images (no
                  extraction), union costs from counts as above
    rebuild       per sub-task, the composed model built (ComposedModel: T's modules
                  extracted and fused) and run on T's test images, and T's union network
                  built and counted (count_parameters, count_flops)

The two per-sub-task variants are timed on a seeded sample of sub-tasks spread over the sizes
and extrapolated to all 1,013 (their per-sub-task time grows with |T|; the sample has the
same number of sub-tasks of each size, so the extrapolation weights sizes by their share of
the 1,013). Ratios are against "scores once".

    python benchmarks/subtask_reuse.py                       # vgg16 and simcnn, width 0.125
    python benchmarks/subtask_reuse.py --arch resnet20 --width 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from dnnmod.data import load_dataset, make_splits, prepare
from dnnmod.models import build_model
from dnnmod.modules.compose import ComposedModel
from dnnmod.modules.extract import count_flops, count_parameters
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.masking import ensure_nonempty
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.modules.structure import trace_structure
from dnnmod.modules.union import union_network
from dnnmod.reuse.subtasks import (
    KeptChannels,
    UnionCosts,
    choose_subsets,
    evaluate_subtasks,
)

DEMO_MODELS = (("vgg16", 0.125), ("simcnn", 0.125))


def random_modules(model, seed: int) -> ModuleSet:
    structure = trace_structure(model)
    generator = torch.Generator().manual_seed(seed)
    masks = ensure_nonempty(
        {g.name: torch.rand(10, g.size, generator=generator) < 0.5 for g in structure.groups},
        {g.name: torch.rand(10, g.size, generator=generator) for g in structure.groups})
    return ModuleSet(approach="random", classes=list(range(10)), masks=masks,
                     head=OwnLogitHead(list(range(10)), 10), combination="argmax", base={},
                     structure=structure)


def per_subtask_seconds(run, subsets) -> dict[int, float]:
    """Mean seconds of ``run(T)`` per sub-task size over ``subsets``."""
    by_size: dict[int, list[float]] = {}
    for subset in subsets:
        started = time.perf_counter()
        run(list(subset))
        by_size.setdefault(len(subset), []).append(time.perf_counter() - started)
    return {size: statistics.mean(times) for size, times in by_size.items()}


def benchmark(arch: str, width: float, data, per_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model(arch, 10, width=width).eval()
    modules = random_modules(model, seed)
    test = data.test
    every, _ = choose_subsets(10, 1013, 10, seed)
    share = Counter(len(t) for t in every)
    sample, _ = choose_subsets(10, 0, per_size, seed)  # per_size sub-tasks of each size

    started = time.perf_counter()
    frame, summary = evaluate_subtasks(model, modules, data, {"union_subsets": 0},
                                       st_model=model)
    once = time.perf_counter() - started
    assert len(frame) == 1013

    costs, kept = UnionCosts(model, modules.structure), KeptChannels(modules)

    def rerun_masked(classes):
        chosen = modules.subset(classes)
        x, labels = test.subset(classes, relabel=False).float_batch()
        (chosen.predict(chosen.scores(model, x)) == labels).float().mean()
        with torch.no_grad():
            model(x)[:, classes].argmax(1)
        costs.fractions(kept.union(classes), len(classes))

    def rebuild(classes):
        x, labels = test.subset(classes, relabel=False).float_batch()
        (ComposedModel(model, modules, classes).predict(x) == labels).float().mean()
        with torch.no_grad():
            model(x)[:, classes].argmax(1)
        network = union_network(model, modules, classes)
        count_parameters(network), count_flops(network, modules.structure.input_shape)

    results = {"scores once": once}
    for name, run in (("rerun masked", rerun_masked), ("rebuild", rebuild)):
        seconds = per_subtask_seconds(run, sample)
        results[name] = sum(share[size] * seconds[size] for size in share)
    print(f"\n{arch} (width {width}), N = 10 modules, {len(test)} test images, 1,013 sub-tasks "
          f"(shared passes {summary['shared_seconds']:.1f} s, per-sub-task loop "
          f"{summary['subsets_seconds']:.2f} s)")
    print(f"{'variant':<14}{'seconds':>10}{'x scores once':>15}")
    for name, seconds in results.items():
        print(f"{name:<14}{seconds:>10.1f}{seconds / once:>15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="one architecture (default: vgg16 and simcnn)")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--per-size", type=int, default=3,
                        help="sampled sub-tasks per size for the per-sub-task variants")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        prepare("digits", Path(root))
        make_splits(Path(root), "digits", args.seed)
        data = load_dataset(Path(root), "digits", args.seed)
        models = [(args.arch, args.width)] if args.arch else DEMO_MODELS
        for arch, width in models:
            benchmark(arch, width, data, args.per_size, args.seed)


if __name__ == "__main__":
    main()

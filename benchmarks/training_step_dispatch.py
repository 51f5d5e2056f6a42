"""Ops dispatched by one training step of standard and modular training, and compiled steps.

On a GPU a small model's step is bound by kernel launches, and an op whose result the host must
read (``.item()``, boolean-mask indexing, ``nonzero``, any data-dependent output shape) stops
the host from queuing the next kernels until the device has caught up. Both are counted here on
the CPU, where the same aten ops are dispatched
(:func:`dnnmod.training.dispatch.count_training_step`: forward, loss, backward, optimizer
update and the loop's per-step sums, counted on a second step).

Part 1, for each model: the ops of a step of ``st``, ``mwt`` and ``moda``, and of ``st`` on the
MwT-gated model (the mask generators are MwT's model, not its objective): kernels (ops that
are no views; on a device each launches at least one kernel), views, all ops, the syncing
ops, and each kind's kernels over standard training's. Then each kind with channels-last
feature maps, the memory format training uses on CUDA (on the CPU it is
contiguous), so that a device's ops are counted too.

Part 2 (``--compile``): the step of ST, MwT, MODA and ST on MwT's gated model, on the first
model, eager against compiled: ``torch.compile(trainer.backward, fullgraph=True)`` (forward,
loss and backward as one graph, ``torch._dynamo.config.trace_autograd_ops``), then the
optimizer's update eager in both (the foreach update is a handful of multi-tensor ops;
``Optimizer.step`` breaks a compiled graph on purpose). Per kind, ``--repeats`` times: the
median milliseconds of ``--rounds`` steps after the warm-up, eager and compiled alternating;
printed: the medians over the repeats and eager over compiled. Also the compiled step's kernel
launches, what a CUDA graph of it would replay: the calls in the ``call`` function of
inductor's generated code (its fused kernels, and the aten ops it calls rather than lowers:
convolutions, matrix products), plus the kernels of the eager update and epoch sums.
Compiling takes about a minute a kind on a small CPU. Times on a shared machine move by tens
of percent; the counts do not.

    python benchmarks/training_step_dispatch.py
    python benchmarks/training_step_dispatch.py --models simcnn:0.125 --compile --rounds 20
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import Counter
from functools import partial

import torch
from torch._inductor.utils import run_and_get_code

from dnnmod.models import build_model
from dnnmod.training.dispatch import count_dispatched_ops, count_training_step
from dnnmod.training.objectives import get_objective
from dnnmod.training.train import EpochSums, Recipe, Trainer

KINDS = ("st", "mwt", "moda")


def trainer_for(arch: str, width: float, kind: str, recipe: Recipe,
                gated_standard: bool = False, channels_last: bool = False) -> Trainer:
    """A fresh seeded trainer; ``gated_standard``: standard training of the MwT-gated model;
    ``channels_last``: the model and batches in CUDA's memory format (:meth:`Trainer.create`
    gives it on CUDA only), so that the ops a device dispatches are counted on the CPU."""
    torch.manual_seed(0)
    model = build_model(arch, 10, width=width)
    if gated_standard:
        model = get_objective("mwt").prepare(model)
    trainer = Trainer.create(model, recipe, get_objective(kind), "cpu")
    if channels_last:
        trainer.model.to(memory_format=torch.channels_last)
        trainer.memory_format = torch.channels_last
    return trainer


def print_counts(arch: str, width: float, recipe: Recipe, x, y) -> dict[str, int]:
    """Prints part 1's table; returns each row's kernels."""
    rows = {kind: count_training_step(trainer_for(arch, width, kind, recipe), x, y)
            for kind in KINDS}
    rows["st on mwt's model"] = count_training_step(
        trainer_for(arch, width, "st", recipe, gated_standard=True), x, y)
    for kind in KINDS:
        rows[f"{kind}, channels-last"] = count_training_step(
            trainer_for(arch, width, kind, recipe, channels_last=True), x, y)
    print(f"\n{arch} w{width}, batch {len(y)}: ops dispatched by one training step")
    print("| kind | kernels | views | all ops | syncing ops | kernels / st |")
    print("|---|---|---|---|---|---|")
    for kind, count in rows.items():
        syncing = ", ".join(f"{n}x {op}" for op, n in Counter(count.syncing).items()) or "0"
        print(f"| {kind} | {count.kernels} | {count.views} | {count.total} | {syncing} | "
              f"{count.kernels / rows['st'].kernels:.2f} |")
    gated = rows["st on mwt's model"]
    print(f"mwt over st on mwt's model: {rows['mwt'].kernels / gated.kernels:.2f}x kernels")
    for kind in ("mwt", "moda"):
        print(f"{kind} over st, both channels-last (CUDA's layout): "
              f"{rows[f'{kind}, channels-last'].kernels / rows['st, channels-last'].kernels:.2f}x"
              " kernels")
    return {kind: count.kernels for kind, count in rows.items()}


def median_step_ms(step, x, y, rounds: int) -> float:
    sums = EpochSums()
    times = []
    for round_ in range(rounds + 2):  # two warm-up steps
        started = time.perf_counter()
        sums.add(*step(x, y), y)
        if round_ >= 2:
            times.append(time.perf_counter() - started)
    sums.means()  # the loop reads its sums once
    return 1000 * statistics.median(times)


# A kernel launch in the ``call`` function of inductor's generated wrapper: a generated (fused)
# kernel, or an aten op it did not lower (convolutions, matrix products); allocations, views
# (reinterpret_tensor) and shape asserts are none.
_LAUNCH = re.compile(r"^\s+(?:[\w, ]+ = )?(cpp_fused_\w+|extern_kernels\.\w+|"
                     r"torch\.ops\.aten\.\w+\.\w+|aten\.\w+\.\w+)\(", re.MULTILINE)


def generated_launches(sources: list[str]) -> Counter:
    """Kernel calls of inductor's generated code per kind: ``fused`` (its own kernels) or the
    aten op it calls."""
    calls = Counter()
    for source in sources:
        body = source[source.index("def call("):]
        for name in _LAUNCH.findall(body):
            calls["fused" if name.startswith("cpp_fused_") else name] += 1
    return calls


def eager_rest_of_step(optimizer, sums: EpochSums, result, y) -> None:
    """What a compiled step runs eagerly after the compiled graph."""
    optimizer.step()
    sums.add(*result, y)


def compiled_against_eager(arch: str, width: float, recipe: Recipe, x, y, rounds: int,
                           repeats: int, eager_kernels: dict[str, int]) -> None:
    """Part 2; ``eager_kernels``: part 1's kernels per row, on the same model."""
    print(f"\n{arch} w{width}, batch {len(y)}: eager against compiled step on the CPU "
          f"({torch.get_num_threads()} threads; medians of {repeats} repeats of {rounds} steps; "
          "times under load are noisy). Kernels: eager, the dispatched ops that are no views "
          "(part 1); compiled, the launches of inductor's generated code (its fused kernels and "
          "the aten ops it calls) plus the eager optimizer update and epoch sums")
    print("| kind | eager ms | compiled ms | eager / compiled | compile s | eager kernels | "
          "compiled kernels (fused + aten + eager) | compiled kernels / st's |")
    print("|---|---|---|---|---|---|---|---|")
    launches_of = {}
    for row, kind, gated in (("st", "st", False), ("mwt", "mwt", False),
                             ("moda", "moda", False), ("st on mwt's model", "st", True)):
        eager, compiled = (trainer_for(arch, width, kind, recipe, gated) for _ in range(2))
        backward = torch.compile(compiled.backward, fullgraph=True)

        def compiled_step(a, b, captured, backward=backward, optimizer=compiled.optimizer):
            result = backward(a, b, captured)
            optimizer.step()
            return result

        with (eager.objective.capture(eager.model) as eager_captured,
              compiled.objective.capture(compiled.model) as captured,
              torch._dynamo.config.patch(trace_autograd_ops=True)):
            compiled.step(x, y, captured)  # eager first: optimizer state, cached constants
            started = time.perf_counter()
            result, sources = run_and_get_code(compiled_step, x, y, captured)
            compile_seconds = time.perf_counter() - started
            graph = generated_launches(sources)
            sums = EpochSums()
            sums.add(*result, y)
            eager_rest, _ = count_dispatched_ops(
                partial(eager_rest_of_step, compiled.optimizer, sums, result, y))
            eager_ms, compiled_ms = [], []
            for _ in range(repeats):
                eager_ms.append(median_step_ms(partial(eager.step, captured=eager_captured),
                                               x, y, rounds))
                compiled_ms.append(median_step_ms(partial(compiled_step, captured=captured),
                                                  x, y, rounds))
        fused = graph.pop("fused", 0)
        aten = sum(graph.values())
        launches = fused + aten + eager_rest.kernels
        launches_of[row] = launches
        eager_median, compiled_median = (statistics.median(ms) for ms in (eager_ms, compiled_ms))
        print(f"| {row} | {eager_median:.1f} | {compiled_median:.1f} | "
              f"{eager_median / compiled_median:.2f} | {compile_seconds:.0f} | "
              f"{eager_kernels[row]} | "
              f"{launches} ({fused} + {aten} + {eager_rest.kernels}) | "
              f"{launches / launches_of['st']:.2f} |", flush=True)
        print(f"aten ops {row}'s compiled graph calls: "
              + ", ".join(f"{n}x {op}" for op, n in graph.most_common()), flush=True)
    gated = launches_of["st on mwt's model"]
    print(f"mwt over st on mwt's model, compiled: {launches_of['mwt'] / gated:.2f}x kernels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["simcnn:0.125", "vgg16:0.125",
                                                         "resnet20:0.125"],
                        help="arch:width")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled against eager steps (first model)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per kind (--compile); their median is printed")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=1, batch_size=args.batch_size, lr=0.05)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=generator)
    y = torch.arange(args.batch_size) % 10
    models = [(arch, float(width)) for arch, width in
              (entry.split(":") for entry in args.models)]
    kernels = [print_counts(arch, width, recipe, x, y) for arch, width in models]
    if args.compile:
        compiled_against_eager(*models[0], recipe, x, y, args.rounds, args.repeats, kernels[0])


if __name__ == "__main__":
    main()

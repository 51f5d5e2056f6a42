"""Cost of modular training (MwT, MODA) against standard training, and union-network latency.

Part 1: for each model, the same data (``--dataset``, default digits), recipe, seed and
machine train it with the ``st``, ``mwt`` and ``moda`` objectives through the shared loop; the
per-epoch time is the median of the epochs' ``seconds`` after the first (warm-up). The three
trainings run one after another, so a machine whose speed drifts (a shared one) moves these
ratios by tens of percent. The ratio against the target (at most 1.1x ST) is therefore taken
from interleaved steps: one model per kind, each stepped by the shared loop's step
(:class:`~dnnmod.training.train.Trainer`) on the same training batch in turn, ``--rounds``
times after two warm-up rounds; printed: the median milliseconds per step and the ratio to ST.

Part 2: the extra losses alone. MwT's cohesion/coupling and MODA's affinity/dispersion are mean
cosine similarities of same- and different-class sample pairs of a batch, taken on the vectors
a training batch captures (MwT: masks; MODA: spatially averaged activations). dnnmod takes all
pairs' similarities from one (batch, batch) product; the naive way, written out below, gathers
both vectors of every pair i < j and multiplies them. Both run forward + backward on the same
captured vectors (one training batch of the trained model); printed: milliseconds per batch
and the naive / dnnmod ratio.

Part 3: the modular-trained models are decomposed (MwT, MODA at their defaults) and the union
network of a sub-task of ``--subtask`` classes is timed against the base model it was cut from
(batch of ``--batch`` test images, one warm-up pass, best of 5 passes), with parameter counts.

    python benchmarks/modular_training.py                          # digits, demo models, CPU
    python benchmarks/modular_training.py --models simcnn:0.25 --batch-size 128   # fidelity's
    python benchmarks/modular_training.py --device cuda --epochs 4 --threads 16
    python benchmarks/modular_training.py --device cuda --dataset fashion_mnist --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from dnnmod.approaches import run_approach
from dnnmod.data import load_dataset, make_splits, prepare
from dnnmod.devices import synchronize
from dnnmod.models import build_model
from dnnmod.modules.extract import count_parameters
from dnnmod.modules.union import union_network
from dnnmod.training.objectives import (
    get_objective,
    pair_objective,
    side_by_side,
    spatial_mean,
)
from dnnmod.training.train import Recipe, Trainer, train

KINDS = ("st", "mwt", "moda")


def best_seconds(function, device, repeats: int = 5) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def gathered_pair_similarities(vectors: list[torch.Tensor], labels: torch.Tensor):
    """The naive way: both vectors of every pair i < j gathered, multiplied and summed; the
    same-class and different-class means (2,), as :class:`PairTerms`' ``means``."""
    first, second = torch.triu_indices(len(labels), len(labels), 1, device=labels.device)
    same = labels[first] == labels[second]
    cohesions, couplings = [], []
    for layer in vectors:
        unit = torch.nn.functional.normalize(layer.float(), dim=1)
        similarity = (unit[first] * unit[second]).sum(1)
        cohesions.append(similarity[same].mean())
        couplings.append(similarity[~same].mean())
    return torch.stack([torch.stack(cohesions).mean(), torch.stack(couplings).mean()])


def interleaved_step_seconds(arch: str, width: float, data, recipe: Recipe, device: str,
                             rounds: int) -> dict[str, float]:
    """Median seconds of one training step of each kind, the kinds stepped in turn on the same
    batches (full batches of a fixed shuffle of the training images, cycled)."""
    trainers = {}
    for kind in KINDS:
        torch.manual_seed(0)
        trainers[kind] = Trainer.create(build_model(arch, data.num_classes, width), recipe,
                                        get_objective(kind), device)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    full_batches = max(1, len(order) // recipe.batch_size)
    warm_up = 2
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with ExitStack() as stack:
        captured = {kind: stack.enter_context(trainer.objective.capture(trainer.model))
                    for kind, trainer in trainers.items()}
        for round_ in range(warm_up + rounds):
            start = (round_ % full_batches) * recipe.batch_size
            index = order[start:start + recipe.batch_size].to(data.train.labels.device)
            x, y = data.train.float_batch(index)
            for kind, trainer in trainers.items():
                synchronize(device)
                started = time.perf_counter()
                trainer.step(x, y, captured[kind])
                synchronize(device)
                if round_ >= warm_up:
                    times[kind].append(time.perf_counter() - started)
    return {kind: statistics.median(values) for kind, values in times.items()}


def captured_vectors(result, kind: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The (batch, K) vectors the ``kind`` objective's loss takes from one batch ``x``."""
    objective = get_objective(kind)
    with torch.no_grad(), objective.capture(result.model) as captured:
        result.model(x)
        vectors = list(captured.values())
    return [spatial_mean(v.float()) if v.dim() == 4 else v.float() for v in vectors]


def pair_term_seconds(loss, vectors: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Best time of one forward + backward of ``loss(vectors, labels)`` (coupling − cohesion,
    up to a constant) on fresh leaf copies of ``vectors``."""
    leaves = [v.detach().clone().requires_grad_(True) for v in vectors]

    def step():
        loss(leaves, labels).backward()

    return best_seconds(step, labels.device)


def fused_pair_loss(vectors: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """dnnmod's way, :func:`pair_objective` with weights 1 and 1: 1 − cohesion + coupling."""
    zero = torch.zeros((), device=labels.device)
    return pair_objective(zero, *side_by_side(vectors), labels, 1.0, 1.0)[0]


def gathered_pair_loss(vectors: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    cohesion, coupling = gathered_pair_similarities(vectors, labels)
    return coupling - cohesion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["simcnn:0.125", "vgg16:0.125"],
                        help="arch:width entries")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30,
                        help="interleaved training steps timed per kind")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--subtask", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dataset", default="digits",
                        help="a registry dataset (fashion_mnist reads Debian's copy or downloads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {args.threads} thread(s)")
    print(f"device: {device_name}; torch {torch.__version__}")

    root = Path(tempfile.mkdtemp(prefix="dnnmod-bench-"))
    prepare(args.dataset, root)
    make_splits(root, args.dataset, seed=0)
    data = load_dataset(root, args.dataset, seed=0, device=args.device)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=0.05, nesterov=True)
    x, _ = data.test.float_batch(torch.arange(min(args.batch, len(data.test)),
                                              device=data.test.labels.device))
    classes = list(range(args.subtask))

    for entry in args.models:
        arch, width = entry.split(":")
        trained, per_epoch = {}, {}
        for kind in KINDS:
            torch.manual_seed(0)
            model = build_model(arch, data.num_classes, float(width))
            result = train(model, data, recipe, seed=0, objective=get_objective(kind),
                           device=args.device, progress=False)
            seconds = [record.seconds for record in result.history]
            per_epoch[kind] = statistics.median(seconds[1:] or seconds)
            trained[kind] = result
        print(f"\n{arch} width {width}: seconds per epoch ({len(data.train)} images)")
        for kind in KINDS:
            accuracy = trained[kind].history[-1].val_accuracy
            print(f"  {kind:5s} {per_epoch[kind]:8.3f} s  x{per_epoch[kind] / per_epoch['st']:.2f}"
                  f"  (val {accuracy:.1f}% after {args.epochs} epochs)")
        step = interleaved_step_seconds(arch, float(width), data, recipe, args.device,
                                        args.rounds)
        print(f"{arch} width {width}: one training step of batch {args.batch_size}, the kinds "
              f"interleaved (median of {args.rounds})")
        for kind in KINDS:
            print(f"  {kind:5s} {step[kind] * 1e3:8.2f} ms  x{step[kind] / step['st']:.2f}")

        batch_x, batch_labels = data.train.float_batch(
            torch.arange(min(args.batch_size, len(data.train)), device=data.train.labels.device))
        print(f"{arch}: pair-similarity terms of one training batch ({len(batch_labels)} "
              "images), forward + backward")
        for kind in ("mwt", "moda"):
            vectors = captured_vectors(trained[kind], kind, batch_x)
            product = pair_term_seconds(fused_pair_loss, vectors, batch_labels)
            naive = pair_term_seconds(gathered_pair_loss, vectors, batch_labels)
            widths = "/".join(str(v.shape[1]) for v in vectors)
            print(f"  {kind:5s} {len(vectors)} layers ({widths}): product "
                  f"{product * 1e3:7.2f} ms | gathered pairs (naive) {naive * 1e3:7.2f} ms"
                  f" | x{naive / product:.1f}")

        print(f"{arch}: union network of classes {classes} vs its base model, "
              f"batch {len(x)}")
        for kind in ("mwt", "moda"):
            model = trained[kind].model.eval()
            meta = {"arch": arch, "dataset": args.dataset, "training": kind}
            modules = run_approach(kind, model, meta, data, seed=0, device=args.device)
            network = union_network(model, modules, classes)
            with torch.no_grad():
                base_s = best_seconds(lambda model=model: model(x), x.device)
                union_s = best_seconds(lambda network=network: network(x), x.device)
            print(f"  {kind:5s} base {base_s * 1e3:7.2f} ms, {count_parameters(model):8d} params"
                  f" | union {union_s * 1e3:7.2f} ms, {count_parameters(network):8d} params"
                  f" | latency x{union_s / base_s:.2f}")


if __name__ == "__main__":
    main()

"""The ``dnnmod`` command line: verbs on nouns (``dnnmod data prepare``, ``dnnmod train``).

Snakemake rules call these commands; nothing in the workflow runs inline Python. Errors caused
by input print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dnnmod.devices import select_device
from dnnmod.errors import ConfigError, DnnmodError

log = logging.getLogger("dnnmod")


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None


def cmd_list(args: argparse.Namespace) -> None:
    if args.what == "datasets":
        from dnnmod.data import DATASETS

        names = DATASETS
    else:
        from dnnmod.models import ARCHITECTURES

        names = ARCHITECTURES
    print("\n".join(sorted(names)))


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from dnnmod.data import prepare

    spec = dict(args.spec)
    local_dir = spec.pop("local_dir", None)
    path = prepare(args.dataset, Path(args.root), mirror=spec.pop("mirror", None),
                   files=spec.pop("files", None),
                   local_dir=Path(local_dir) if local_dir else None,
                   options=spec.pop("options", None))
    if spec:
        raise ConfigError(f"datasets.{args.dataset}: unknown keys {sorted(spec)}")
    log.info("prepared %s", path)


def cmd_data_split(args: argparse.Namespace) -> None:
    from dnnmod.data import make_splits

    path = make_splits(Path(args.root), args.dataset, args.seed, args.validation_fraction)
    log.info("wrote %s", path)


def cmd_data_derive(args: argparse.Namespace) -> None:
    from dnnmod.data import Task, derive_task

    path = derive_task(Task.from_config(args.task, args.spec), Path(args.root))
    log.info("derived %s", path)


def cmd_train(args: argparse.Namespace) -> None:
    from dnnmod.training.objectives import StandardTraining, get_objective
    from dnnmod.training.train import Recipe, train

    # Bad names and values fail before a device is claimed or data is loaded.
    objective = get_objective(args.training or StandardTraining.name, args.objective)
    recipe = Recipe.from_dict(args.recipe)
    claim = select_device(args.device)  # before torch initialises CUDA
    import torch

    from dnnmod.data import load_dataset
    from dnnmod.models import build_model
    from dnnmod.modules.inference import accuracy
    from dnnmod.training.model_io import model_record, save_model

    _configure_torch(claim.device, args.threads)
    data = load_dataset(Path(args.data_root), args.dataset, args.seed, device=claim.device)
    torch.manual_seed(args.seed)  # initial weights depend on the seed only
    model = build_model(args.arch, data.num_classes, args.width, **args.options)
    run_config = {"arch": args.arch, "dataset": args.dataset, "width": args.width,
                  "options": args.options}
    result = train(model, data, recipe, seed=args.seed, objective=objective,
                   device=claim.device,
                   checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                   run_config=run_config, mixed_precision=not args.no_amp)
    accuracies = {split: accuracy(result.model, getattr(data, split))
                  for split in ("train", "val", "test")}
    log.info("%s: test accuracy %.2f%% (selected epoch %d)", objective.name, accuracies["test"],
             result.selected_epoch)
    save_model(args.out, result.model, model_record(
        arch=args.arch, name=args.model_name or args.arch, width=args.width,
        options=args.options, dataset=args.dataset, data=data, seed=args.seed,
        objective=objective, recipe=recipe, result=result, accuracies=accuracies,
        device=_device_name(claim.device)))
    if args.checkpoint:  # the final artifact is committed: resume state has served its purpose
        Path(args.checkpoint).unlink(missing_ok=True)
    claim.release()


def cmd_modularize(args: argparse.Namespace) -> None:
    from dnnmod.approaches import get_approach, run_approach

    approach = get_approach(args.approach)  # fail on bad names and values before loading
    hyperparameters = approach.resolve(args.hyperparameters)
    reference_paths = dict(args.reference)
    claim = select_device(args.device)
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.training.model_io import load_model

    _configure_torch(claim.device, args.threads)
    model, meta = load_model(args.model, device=claim.device)
    training = approach.training_for(hyperparameters)
    if meta.get("training") != training:
        raise ConfigError(f"{args.model}: a model of training kind {meta.get('training')!r}; "
                          f"{args.approach} decomposes {training!r}-trained models")
    references = {name: ModuleSet.load(path, base=meta) for name, path in reference_paths.items()}
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    modules = run_approach(args.approach, model, meta, data, hyperparameters, seed=args.seed,
                           device=claim.device, references=references,
                           checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    modules.provenance["device"] = _device_name(claim.device)
    modules.save(args.out)
    if args.checkpoint:
        Path(args.checkpoint).unlink(missing_ok=True)
    log.info("%s: %d modules in %.1f s", args.approach, len(modules),
             modules.provenance["wall_seconds"])
    claim.release()


def _named_path(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def cmd_evaluate_modules(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.artifacts import write_json
    from dnnmod.data import load_dataset
    from dnnmod.modules.metrics import evaluate, metrics_record
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.training.model_io import load_model

    model, meta = load_model(args.model, device=claim.device)
    modules = ModuleSet.load(args.modules, base=meta)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    result = evaluate(model, modules, data.test, meta["metrics"]["test_accuracy"])
    write_json(args.out, metrics_record(meta, modules, result))
    log.info("%s on %s/%s: composed %.2f%% (base %.2f%%), KRR %.3f", modules.approach,
             meta["dataset"], meta["model"], result["composed_accuracy"],
             result["base_accuracy"], result["krr"])
    claim.release()


def _configure_torch(device: str, threads: int | None) -> None:
    """Thread count, and deterministic kernels on the CPU (same seed, same result)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(device == "cpu", warn_only=True)


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', '?')} {torch.cuda.get_device_name()}"
    return "cpu"


def cmd_table_base_models(args: argparse.Namespace) -> None:
    from dnnmod.report.tables import write_base_model_report

    write_base_model_report([Path(p) for p in args.models], Path(args.out),
                            Path(args.metrics) if args.metrics else None)


def _device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=os.environ.get("DNNMOD_DEVICE", "auto"),
                        choices=["auto", "cpu", "cuda"],
                        help="default: $DNNMOD_DEVICE, else auto (a free GPU slot, else CPU)")


def cmd_table_modularization(args: argparse.Namespace) -> None:
    from dnnmod.report.tables import write_modularization_report

    write_modularization_report([Path(p) for p in args.metrics], Path(args.out),
                                Path(args.figure) if args.figure else None,
                                Path(args.summary) if args.summary else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnnmod", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: DNNMOD_DEBUG=1)")
    verbs = parser.add_subparsers(dest="command", required=True)

    listing = verbs.add_parser("list", help="list registered datasets or model architectures")
    listing.add_argument("what", choices=["datasets", "models"])
    listing.set_defaults(func=cmd_list)

    data = verbs.add_parser("data", help="prepare datasets, splits and derived tasks"
                            ).add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="download (or generate), verify and convert")
    prepare.add_argument("--dataset", required=True)
    prepare.add_argument("--root", default="data", help="data directory (default: data)")
    prepare.add_argument("--spec", type=_json_arg, default={},
                         help="JSON: mirror, files {name: {url, md5}}, local_dir, options")
    prepare.set_defaults(func=cmd_data_prepare)
    split = data.add_parser("split", help="seeded train/validation split of the training set")
    split.add_argument("--dataset", required=True)
    split.add_argument("--root", default="data")
    split.add_argument("--seed", type=int, required=True)
    split.add_argument("--validation-fraction", type=float, default=0.2)
    split.set_defaults(func=cmd_data_split)
    derive = data.add_parser("derive", help="make a task (class subsets and unions, per-class "
                                            "counts) from prepared datasets")
    derive.add_argument("--task", required=True, help="task name (a key of tasks in config)")
    derive.add_argument("--spec", type=_json_arg, required=True,
                        help="JSON: parts [{dataset, classes}], samples_per_class, seed")
    derive.add_argument("--root", default="data")
    derive.set_defaults(func=cmd_data_derive)

    train = verbs.add_parser("train", help="train a base model (standard or modular training)")
    train.add_argument("--dataset", required=True)
    train.add_argument("--arch", required=True, help="architecture (dnnmod list models)")
    train.add_argument("--model-name", help="name recorded in metadata (default: arch)")
    train.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    train.add_argument("--options", type=_json_arg, default={},
                       help="JSON architecture options, e.g. '{\"batch_norm\": false}'")
    train.add_argument("--recipe", type=_json_arg, required=True, help="JSON training recipe")
    train.add_argument("--training",
                       help="training kind (default: st, standard training; approaches may "
                            "register others, e.g. their modular training)")
    train.add_argument("--objective", type=_json_arg, default={},
                       help="JSON hyperparameters overriding the training kind's defaults")
    train.add_argument("--seed", type=int, required=True)
    train.add_argument("--data-root", default="data")
    train.add_argument("--out", required=True, help="weights path (*.safetensors)")
    train.add_argument("--checkpoint", help="resumable checkpoint path (kept across restarts)")
    _device_argument(train)
    train.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    train.add_argument("--no-amp", action="store_true", help="disable CUDA mixed precision")
    train.set_defaults(func=cmd_train)

    modularize = verbs.add_parser("modularize", help="decompose a trained model into modules")
    modularize.add_argument("--approach", required=True, help="e.g. gradsplitter")
    modularize.add_argument("--model", required=True, help="base model weights (*.safetensors)")
    modularize.add_argument("--hyperparameters", type=_json_arg, default={},
                            help="JSON hyperparameters overriding the approach's defaults")
    modularize.add_argument("--reference", type=_named_path, action="append", default=[],
                            metavar="APPROACH=PATH",
                            help="a module set the approach reads (e.g. random's match), cut "
                                 "from the same base model; repeatable")
    modularize.add_argument("--seed", type=int, required=True)
    modularize.add_argument("--data-root", default="data")
    modularize.add_argument("--out", required=True, help="module set path (*.safetensors)")
    modularize.add_argument("--checkpoint", help="resumable state (kept across restarts)")
    modularize.add_argument("--threads", type=int, help="CPU threads for torch")
    _device_argument(modularize)
    modularize.set_defaults(func=cmd_modularize)

    evaluate = verbs.add_parser("evaluate-modules",
                                help="shared metrics of a module set on the test split")
    evaluate.add_argument("--modules", required=True, help="module set (*.safetensors)")
    evaluate.add_argument("--model", required=True, help="its base model (*.safetensors)")
    evaluate.add_argument("--data-root", default="data")
    evaluate.add_argument("--out", required=True, help="metrics JSON path")
    _device_argument(evaluate)
    evaluate.set_defaults(func=cmd_evaluate_modules)

    table = verbs.add_parser("table", help="build result tables").add_subparsers(
        dest="table_command", required=True)
    base = table.add_parser("base-models", help="E1: base-model accuracy and training time")
    base.add_argument("--models", nargs="+", required=True, help="model weights paths")
    base.add_argument("--out", required=True, help="CSV path (.md rendering written beside)")
    base.add_argument("--metrics", help="JSON path for DVC metrics (test accuracy, time)")
    base.set_defaults(func=cmd_table_base_models)
    e2 = table.add_parser("modularization", help="E2: module quality and cost per approach")
    e2.add_argument("--metrics", nargs="+", required=True, help="evaluate-modules JSON files")
    e2.add_argument("--out", required=True, help="CSV path (.md rendering written beside)")
    e2.add_argument("--figure", help="accuracy-vs-KRR scatter (PNG; a PDF is written beside)")
    e2.add_argument("--summary", help="JSON path for DVC metrics")
    e2.set_defaults(func=cmd_table_modularization)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except (DnnmodError, OSError) as err:
        # Input and file-system problems are the user's to fix: one line names them; the
        # traceback is for debugging dnnmod itself.
        if args.debug or os.environ.get("DNNMOD_DEBUG"):
            raise
        print(f"dnnmod: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

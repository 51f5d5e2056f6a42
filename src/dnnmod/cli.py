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
import time
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
    if args.metrics:  # as evaluate-modules would, on fresh copies of what it would read
        model, meta = load_model(args.model, device=claim.device)
        _write_module_metrics(model, meta, ModuleSet.load(args.out, base=meta), data,
                              args.metrics)
    claim.release()


def _named_path(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def cmd_evaluate_modules(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.training.model_io import load_model

    model, meta = load_model(args.model, device=claim.device)
    modules = ModuleSet.load(args.modules, base=meta)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    _write_module_metrics(model, meta, modules, data, args.out)
    claim.release()


def _write_module_metrics(model, meta, modules, data, out: str) -> None:
    """The shared metrics of a module set on the test split, as its metrics.json record."""
    from dnnmod.approaches import get_approach
    from dnnmod.artifacts import write_json
    from dnnmod.modules.metrics import evaluate, metrics_record

    result = evaluate(model, modules, data.test, meta["metrics"]["test_accuracy"],
                      union=get_approach(modules.approach).composes_by_union)
    write_json(out, metrics_record(meta, modules, result))
    log.info("%s on %s/%s: composed %.2f%% (base %.2f%%), KRR %.3f", modules.approach,
             meta["dataset"], meta["model"], result["composed_accuracy"],
             result["base_accuracy"], result["krr"])


def _configure_torch(device: str, threads: int | None) -> None:
    """Thread count, and deterministic kernels on the CPU (same seed, same result)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    # torch.use_deterministic_algorithms would also import torch._inductor (about 2 s of every
    # job) just to set the compiler's flag; no dnnmod command compiles, so set the eager one.
    torch._C._set_deterministic_algorithms(device == "cpu", warn_only=True)


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
    from dnnmod.report.orderings import write_ordering_report
    from dnnmod.report.tables import write_modularization_report

    table = write_modularization_report([Path(p) for p in args.metrics], Path(args.out),
                                        Path(args.figure) if args.figure else None,
                                        Path(args.summary) if args.summary else None)
    if args.orderings:
        write_ordering_report(table, Path(args.orderings))


def cmd_table_cost(args: argparse.Namespace) -> None:
    from dnnmod.report.cost import write_cost_report

    write_cost_report(Path(args.results), args.energy, Path(args.out), Path(args.scenarios),
                      Path(args.figure) if args.figure else None,
                      Path(args.metrics) if args.metrics else None)


def cmd_report_html(args: argparse.Namespace) -> None:
    from dnnmod.report.html import build_report

    contents = build_report(Path(args.results), Path(args.out), args.config,
                            Path(args.captions) if args.captions else None)
    log.info("wrote %s: %d tables, %d figures, %d jobs", args.out, len(contents["tables"]),
             len(contents["figures"]), contents["jobs"])


def cmd_reuse_patch(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.artifacts import write_json
    from dnnmod.reuse.patching import patch_weak_models

    record = patch_weak_models(Path(args.modules), Path(args.model),
                               [(weak_type, Path(path)) for weak_type, path in args.weak],
                               Path(args.data_root), args.setting, device=claim.device,
                               protocol=args.protocol,
                               calibration_layer=args.calibration_layer)
    record["device"] = _device_name(claim.device)
    write_json(args.out, record)
    for row in record["rows"]:
        log.info("%s %s TC %s: precision %.2f -> %.2f, recall %.2f -> %.2f", record["approach"],
                 row["weak_type"], row["target_name"], row["weak_precision"],
                 row["patched_precision"], row["weak_recall"], row["patched_recall"])
    claim.release()


def cmd_reuse_patch_table(args: argparse.Namespace) -> None:
    from dnnmod.report.patching import write_patching_table

    write_patching_table([Path(p) for p in args.metrics], Path(args.out),
                         Path(args.summary) if args.summary else None)


def cmd_reuse_patch_figure(args: argparse.Namespace) -> None:
    from dnnmod.report.patching import patching_figure

    patching_figure([Path(p) for p in args.metrics], Path(args.out))


def cmd_reuse_new_task(args: argparse.Namespace) -> None:
    from dnnmod.reuse.newtask import resolve_continuous_learning, setting_kind

    pairs = [_pair(entry) for entry in args.pairs] if isinstance(args.pairs, list) else None
    if not pairs:
        raise ConfigError(f"--pairs: expected a non-empty JSON list of [dataset A, class a, "
                          f"dataset B, class b]; got {args.pairs!r}")
    continuous_learning = None if args.continuous_learning is None else \
        resolve_continuous_learning("--continuous-learning", args.continuous_learning)
    kinds = {setting_kind(p.dataset_a, p.dataset_b) for p in pairs}
    if len(kinds) != 1:
        raise ConfigError("--pairs: mixes pairs within one dataset and pairs across two; a "
                          "setting holds one kind")
    claim = select_device(args.device)
    from dnnmod.artifacts import write_json
    from dnnmod.data import load_dataset, load_prepared
    from dnnmod.reuse.newtask import compose_new_tasks, load_candidates

    started = time.monotonic()
    candidates = load_candidates([(Path(modules), Path(model)) for modules, model in
                                  args.candidate], Path(args.data_root), args.selection_split,
                                 claim.device)
    wrong = [c for c in candidates if c.modules.approach != args.approach]
    seeds = sorted({c.meta["seed"] for c in candidates})
    if wrong:
        raise ConfigError(f"--candidate: {wrong[0].source} holds {wrong[0].modules.approach} "
                          f"modules, not {args.approach} ones")
    if len(seeds) != 1:
        raise ConfigError(f"--candidate: module sets of base models of different seeds {seeds}")
    tests = {pair.task: load_prepared(Path(args.data_root), pair.task, claim.device)[1]
             for pair in pairs}
    # Continuous learning trains on the pair task's training split of the candidates' seed,
    # the images the from-scratch baseline trains on.
    trains = None if continuous_learning is None else {
        pair.task: load_dataset(Path(args.data_root), pair.task, seeds[0], claim.device).train
        for pair in pairs}
    records = compose_new_tasks(candidates, pairs, tests, trains, continuous_learning,
                                seeds[0])
    write_json(args.out, {
        "experiment": "e4_new_tasks", "setting": args.setting, "kind": kinds.pop(),
        "approach": args.approach, "model": args.model, "seed": seeds[0],
        "selection_split": args.selection_split, "continuous_learning": continuous_learning,
        "candidates": [{**c.describe(), "selection_f1": c.f1} for c in candidates],
        "pairs": records, "seconds": time.monotonic() - started,
        "device": _device_name(claim.device)})
    for record in records:
        log.info("%s %s: composed %.2f%% (modules of %s, %s)", args.approach, record["pair"],
                 record["composed_accuracy"], record["module_a"]["model"],
                 record["module_b"]["model"])
        if "continuous_learning" in record:
            log.info("%s %s: after continuous learning %.2f%%", args.approach, record["pair"],
                     record["continuous_learning"]["composed_accuracy"])
    claim.release()


def _pair(entry):
    from dnnmod.reuse.newtask import Pair

    if (not isinstance(entry, list) or len(entry) != 4
            or not all(isinstance(v, str) for v in entry[::2])
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1::2])):
        raise ConfigError(f"--pairs: expected [dataset A, class a, dataset B, class b] "
                          f"entries; got {entry!r}")
    return Pair(*entry)


def cmd_reuse_new_task_table(args: argparse.Namespace) -> None:
    from dnnmod.report.newtask import write_new_task_report

    write_new_task_report([Path(p) for p in args.composed], [Path(p) for p in args.scratch],
                          Path(args.out), Path(args.metrics) if args.metrics else None)


def cmd_reuse_new_task_figure(args: argparse.Namespace) -> None:
    from dnnmod.report.newtask import new_task_figure

    new_task_figure([Path(p) for p in args.composed], [Path(p) for p in args.scratch],
                    Path(args.out))


def cmd_reuse_subtasks(args: argparse.Namespace) -> None:
    from dnnmod.reuse.subtasks import resolve_settings

    settings = resolve_settings(args.settings)  # bad keys and values fail before loading
    claim = select_device(args.device)
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.reuse.subtasks import check_st_model, evaluate_subtasks, write_subtasks
    from dnnmod.training.model_io import load_model

    _configure_torch(claim.device, args.threads)
    model, meta = load_model(args.model, device=claim.device)
    modules = ModuleSet.load(args.modules, base=meta)
    st_model = model if meta["training"] == "st" else None
    if args.st_model and Path(args.st_model).resolve() != Path(args.model).resolve():
        st_model, st_meta = load_model(args.st_model, device=claim.device)
        check_st_model(st_meta, meta, args.st_model)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    frame, summary = evaluate_subtasks(model, modules, data, settings, st_model=st_model,
                                       seed=meta["seed"])
    write_subtasks(Path(args.out), frame, summary, meta, modules, _device_name(claim.device))
    log.info("%s on %s/%s: %d sub-tasks in %.1f s (+ %.1f s shared passes), composed %.2f%% "
             "vs base %.2f%% on average", modules.approach, meta["dataset"], meta["model"],
             summary["subsets"], summary["subsets_seconds"], summary["shared_seconds"],
             frame["composed_accuracy"].mean(), frame["base_accuracy"].mean())
    claim.release()


def cmd_reuse_subtasks_table(args: argparse.Namespace) -> None:
    from dnnmod.report.subtasks import write_subtask_report

    write_subtask_report([Path(p) for p in args.subtasks], Path(args.out),
                         Path(args.metrics) if args.metrics else None)


def cmd_reuse_subtasks_figure(args: argparse.Namespace) -> None:
    from dnnmod.report.subtasks import subtask_figure

    subtask_figure([Path(p) for p in args.subtasks], Path(args.out))


def cmd_evaluate_decomposition(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.approaches.pan_rajan import decomposition_cost
    from dnnmod.artifacts import write_json
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.training.model_io import load_model

    model, meta = load_model(args.model, device=claim.device)
    modules = ModuleSet.load(args.modules, base=meta)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    record = decomposition_cost(model, meta, modules, data.test)
    write_json(args.out, record)
    log.info("%s on %s/%s: top-1 %.2f%% -> %.2f%%, top-5 %.2f%% -> %.2f%%, Jaccard %.3f",
             modules.approach, meta["dataset"], meta["model"], record["model_top1"],
             record["composed_top1"], record["model_top5"], record["composed_top5"],
             record["jaccard"])
    claim.release()


def cmd_table_pan_rajan(args: argparse.Namespace) -> None:
    from dnnmod.report.pan_rajan import write_decomposition_report

    write_decomposition_report([Path(p) for p in args.costs], Path(args.out),
                               Path(args.summary) if args.summary else None)


def cmd_reuse_replace(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.artifacts import write_json
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.reuse.replacement import replacement_record
    from dnnmod.training.model_io import load_model

    _configure_torch(claim.device, args.threads)
    sides = []
    for model_path, modules_path in ((args.weaker_model, args.weaker_modules),
                                     (args.stronger_model, args.stronger_modules)):
        model, meta = load_model(model_path, device=claim.device)
        sides.append((model, meta, ModuleSet.load(modules_path, base=meta)))
    meta = sides[0][1]
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    record = replacement_record(sides[0], sides[1], data.test, _device_name(claim.device))
    write_json(args.out, record)
    log.info("%s %s: weaker composed %.2f%%, stronger %.2f%%, swapped mean %.2f%%",
             record["approach"], record["dataset"], record["weaker_composed_top1"],
             record["stronger_composed_top1"],
             sum(row["top1"] for row in record["rows"]) / len(record["rows"]))
    claim.release()


def cmd_reuse_replace_table(args: argparse.Namespace) -> None:
    from dnnmod.report.replacement import write_replacement_table

    write_replacement_table([Path(p) for p in args.records], Path(args.out),
                            Path(args.summary) if args.summary else None)


def cmd_reuse_replace_figure(args: argparse.Namespace) -> None:
    from dnnmod.report.replacement import replacement_figure

    replacement_figure([Path(p) for p in args.records], Path(args.out))


def cmd_sensitivity_table(args: argparse.Namespace) -> None:
    from dnnmod.report.sensitivity import write_sensitivity_report

    write_sensitivity_report(args.points, [Path(p) for p in args.metrics], Path(args.out),
                             Path(args.summary) if args.summary else None)


def cmd_sensitivity_figure(args: argparse.Namespace) -> None:
    from dnnmod.report.sensitivity import write_sensitivity_figure

    write_sensitivity_figure(Path(args.table), Path(args.out))


def cmd_curves(args: argparse.Namespace) -> None:
    from dnnmod.report import curves

    figure = {"ga-convergence": curves.ga_convergence_figure,
              "mask-training": curves.mask_training_figure,
              "modular-training": curves.modular_training_figure}[args.curves_command]
    figure([Path(p) for p in args.inputs], Path(args.out))


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
                        help="JSON: parts [{dataset, classes}], samples_per_class, seed, "
                             "dirichlet {alpha, split_seed, min_per_class} (a class-imbalanced "
                             "draw from one dataset's training split)")
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
    modularize.add_argument("--metrics", help="also evaluate the module set on the test split "
                                              "and write its metrics JSON (as "
                                              "evaluate-modules does)")
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
    decomposition = verbs.add_parser(
        "evaluate-decomposition", help="Pan & Rajan's Table 1 measures of a module set: model "
                                       "and composed top-1/top-5, model-module Jaccard")
    decomposition.add_argument("--modules", required=True, help="module set (*.safetensors)")
    decomposition.add_argument("--model", required=True, help="its base model (*.safetensors)")
    decomposition.add_argument("--data-root", default="data")
    decomposition.add_argument("--out", required=True, help="JSON path")
    _device_argument(decomposition)
    decomposition.set_defaults(func=cmd_evaluate_decomposition)

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
    e2.add_argument("--figure", help="accuracy against KRR and module size (PNG; a PDF is "
                                      "written beside)")
    e2.add_argument("--summary", help="JSON path for DVC metrics")
    e2.add_argument("--orderings", help="CSV path of the papers' orderings checked on E2 "
                                        "(.md and .tex written beside)")
    e2.set_defaults(func=cmd_table_modularization)
    table_1 = table.add_parser("pan-rajan", help="Pan & Rajan's Table 1: decomposition cost "
                                                 "per module set, published beside")
    table_1.add_argument("--costs", nargs="+", required=True,
                         help="evaluate-decomposition JSON files")
    table_1.add_argument("--out", required=True, help="CSV path (.md rendering written beside)")
    table_1.add_argument("--summary", help="JSON path for DVC metrics")
    table_1.set_defaults(func=cmd_table_pan_rajan)
    cost = table.add_parser("cost", help="E8: time, device, energy and CO2e of every job, from "
                                         "the benchmark files; reuse against retraining")
    cost.add_argument("--results", required=True, help="the study's results/<study> folder")
    cost.add_argument("--energy", type=_json_arg, default={},
                      help="JSON overriding the energy constants (config energy)")
    cost.add_argument("--out", required=True, help="per-job CSV path (.md, .tex beside)")
    cost.add_argument("--scenarios", required=True, help="per-stage and scenario totals CSV")
    cost.add_argument("--figure", help="energy/CO2e bars (PNG; a PDF is written beside)")
    cost.add_argument("--metrics", help="JSON path for DVC metrics")
    cost.set_defaults(func=cmd_table_cost)

    report = verbs.add_parser("report", help="build the study report").add_subparsers(
        dest="report_command", required=True)
    report_html = report.add_parser("html", help="one self-contained HTML file: every table "
                                                 "and figure, config, environment, job times")
    report_html.add_argument("--results", required=True, help="the study's results/<study>")
    report_html.add_argument("--out", required=True, help="HTML path")
    report_html.add_argument("--captions", help="folder of <table or figure name>.rst captions")
    report_html.add_argument("--config", type=_json_arg, default={},
                             help="JSON study configuration shown in the report")
    report_html.set_defaults(func=cmd_report_html)

    sensitivity = verbs.add_parser("sensitivity", help="E7: sensitivity sweeps and ablations "
                                                       "(table and figure of the sweep points)"
                                   ).add_subparsers(dest="sensitivity_command", required=True)
    e7_table = sensitivity.add_parser("table", help="E7 table: each sweep point's module-set "
                                                    "metrics, per seed and mean ± std")
    e7_table.add_argument("--points", type=_json_arg, required=True,
                          help="JSON list of sweep points (approach, dataset, model, parameter, "
                               "value, stage, training, default, configured, seed), one per "
                               "--metrics file, in the same order")
    e7_table.add_argument("--metrics", nargs="+", required=True,
                          help="evaluate-modules JSON files of the points")
    e7_table.add_argument("--out", required=True, help="CSV path (.md, .tex beside)")
    e7_table.add_argument("--summary", help="JSON path for DVC metrics")
    e7_table.set_defaults(func=cmd_sensitivity_table)
    e7_figure = sensitivity.add_parser("figure", help="E7 figure: accuracy loss, KRR and module "
                                                      "size per value, a panel per parameter")
    e7_figure.add_argument("--table", required=True, help="the E7 table (CSV)")
    e7_figure.add_argument("--out", required=True, help="PNG path (a PDF is written beside)")
    e7_figure.set_defaults(func=cmd_sensitivity_figure)

    curves = verbs.add_parser("curves", help="training-curve figures from recorded runs"
                              ).add_subparsers(dest="curves_command", required=True)
    for verb, what, inputs in (
            ("ga-convergence", "CNNSplitter: best and mean fitness, composed validation "
                               "accuracy and KRR per generation", "cnnsplitter module sets"),
            ("mask-training", "GradSplitter: composed validation accuracy and KRR per epoch",
             "gradsplitter module sets"),
            ("modular-training", "MwT/MODA: loss parts and validation accuracy per epoch",
             "modular-trained models")):
        figure = curves.add_parser(verb, help=what)
        figure.add_argument("--inputs", nargs="+", required=True,
                            help=f"{inputs} (*.safetensors; their JSON beside is read)")
        figure.add_argument("--out", required=True, help="PNG path (a PDF is written beside)")
        figure.set_defaults(func=cmd_curves)

    reuse = verbs.add_parser("reuse", help="reuse module sets: patching (E3), new tasks (E4), "
                                           "sub-tasks (E5), replacement (E6)"
                             ).add_subparsers(dest="reuse_command", required=True)
    patch = reuse.add_parser("patch", help="E3: patch weak models with a strong model's "
                                           "target-class modules (min-max or MODA protocol)")
    patch.add_argument("--modules", required=True, help="module set (*.safetensors)")
    patch.add_argument("--model", required=True,
                       help="the strong model it was cut from (*.safetensors)")
    patch.add_argument("--weak", type=_named_path, action="append", required=True,
                       metavar="TYPE=PATH",
                       help="a weak model (simple, underfit or overfit) trained on a weak task "
                            "whose last class is the target class; repeatable")
    patch.add_argument("--setting", required=True, help="patching setting name (tables)")
    patch.add_argument("--protocol", default="minmax",
                       help="minmax (ASE/TOSEM: min-max normalised module score replaces the "
                            "TC column) or moda (MODA: a trained calibration layer over the "
                            "weak model's other logits and the module score); default minmax")
    patch.add_argument("--calibration-layer", type=_json_arg, metavar="JSON",
                       help="protocol moda only: the calibration layer's training, "
                            '\'{"epochs": 20, "lr": 0.05, "batch_size": 128, "split": "train"}\' '
                            "(MODA's; keys optional; split: train or val)")
    patch.add_argument("--data-root", default="data")
    patch.add_argument("--out", required=True, help="metrics JSON path")
    _device_argument(patch)
    patch.set_defaults(func=cmd_reuse_patch)
    patch_table = reuse.add_parser("patch-table", help="E3 table: weak vs patched per target "
                                                       "class, averages, published beside")
    patch_table.add_argument("--metrics", nargs="+", required=True,
                             help="reuse patch JSON files")
    patch_table.add_argument("--out", required=True, help="CSV path (.md rendering beside)")
    patch_table.add_argument("--summary", help="JSON path for DVC metrics")
    patch_table.set_defaults(func=cmd_reuse_patch_table)
    patch_figure = reuse.add_parser("patch-figure", help="E3 figure: weak vs patched P/R/F1 "
                                                         "per target class")
    patch_figure.add_argument("--metrics", nargs="+", required=True,
                              help="reuse patch JSON files")
    patch_figure.add_argument("--out", required=True, help="PNG path (a PDF is written beside)")
    patch_figure.set_defaults(func=cmd_reuse_patch_figure)
    new_task = reuse.add_parser("new-task", help="E4: compose binary classifiers for class "
                                                 "pairs from the modules chosen by best F1")
    new_task.add_argument("--approach", required=True, help="approach of every candidate")
    new_task.add_argument("--setting", required=True, help="setting name (tables)")
    new_task.add_argument("--model", required=True,
                          help="the setting's from-scratch baseline model name (tables)")
    new_task.add_argument("--pairs", type=_json_arg, required=True,
                          help='JSON list of [dataset A, class a, dataset B, class b], e.g. '
                               '\'[["digits", 3, "shapes", 1]]\'; each pair\'s test images '
                               "are those of its derived task pair_<A>_<a>_<B>_<b>")
    new_task.add_argument("--candidate", nargs=2, action="append", required=True,
                          metavar=("MODULES", "MODEL"),
                          help="a candidate module set and its base model; repeatable")
    new_task.add_argument("--selection-split", default="val",
                          help="split of each candidate's dataset the modules are chosen on by "
                               "binary F1 (val or train; default val)")
    new_task.add_argument("--continuous-learning", type=_json_arg, metavar="JSON",
                          help="also retrain the chosen modules (masks fixed) on each pair "
                               "task's training split, Pan & Rajan's continuous learning, and "
                               'score them again: \'{"epochs": 5, "lr": 0.0001, '
                               '"batch_size": 64}\' (keys optional)')
    new_task.add_argument("--data-root", default="data")
    new_task.add_argument("--out", required=True, help="composed-records JSON path")
    _device_argument(new_task)
    new_task.set_defaults(func=cmd_reuse_new_task)
    for verb, func, what in (
            ("new-task-table", cmd_reuse_new_task_table,
             "E4 table: composed vs from-scratch accuracy per pair and on average"),
            ("new-task-figure", cmd_reuse_new_task_figure,
             "E4 figure: accuracy difference per pair and on average")):
        report = reuse.add_parser(verb, help=what)
        report.add_argument("--composed", nargs="+", required=True,
                            help="reuse new-task JSON files")
        report.add_argument("--scratch", nargs="+", required=True,
                            help="from-scratch models of the pairs (*.safetensors)")
        report.add_argument("--out", required=True,
                            help="CSV path (.md beside)" if verb.endswith("table")
                            else "PNG path (a PDF is written beside)")
        if verb.endswith("table"):
            report.add_argument("--metrics", help="JSON path for DVC metrics")
        report.set_defaults(func=func)
    subtasks = reuse.add_parser("subtasks", help="E5: every sub-task of a module set's classes "
                                                 "(sizes 2..N, or a seeded sample): composed "
                                                 "accuracy vs the base model, size, FLOPs")
    subtasks.add_argument("--modules", required=True, help="module set (*.safetensors)")
    subtasks.add_argument("--model", required=True,
                          help="the base model it was cut from (*.safetensors)")
    subtasks.add_argument("--st-model",
                          help="the standard-trained model of the same architecture, dataset "
                               "and seed, for the ST column (default: --model when it is one)")
    subtasks.add_argument("--settings", type=_json_arg, default={},
                          help="JSON: max_subsets, samples_per_size, seed, union_subsets, "
                               "fine_tune_epochs, fine_tune_lr, fine_tune_batch_size")
    subtasks.add_argument("--data-root", default="data")
    subtasks.add_argument("--out", required=True,
                          help="per-sub-task CSV path (a JSON run record is written beside)")
    subtasks.add_argument("--threads", type=int, help="CPU threads for torch")
    _device_argument(subtasks)
    subtasks.set_defaults(func=cmd_reuse_subtasks)
    for verb, func, what, out in (
            ("subtasks-table", cmd_reuse_subtasks_table,
             "E5 table: mean accuracy, size and FLOPs per approach and |T|",
             "CSV path (.md beside)"),
            ("subtasks-figure", cmd_reuse_subtasks_figure,
             "E5 figure: accuracy, size and FLOPs vs |T|, one line per approach",
             "PNG path (a PDF is written beside)")):
        report = reuse.add_parser(verb, help=what)
        report.add_argument("--subtasks", nargs="+", required=True,
                            help="per-sub-task CSV files of reuse subtasks")
        report.add_argument("--out", required=True, help=out)
        if verb.endswith("table"):
            report.add_argument("--metrics", help="JSON path for DVC metrics")
        report.set_defaults(func=func)
    replace = reuse.add_parser("replace", help="E6: swap each class's module of a weaker model "
                                               "for a stronger model's; composed top-1/top-5")
    for role in ("weaker", "stronger"):
        replace.add_argument(f"--{role}-model", required=True,
                             help=f"the {role} base model (*.safetensors)")
        replace.add_argument(f"--{role}-modules", required=True,
                             help=f"the module set cut from the {role} model")
    replace.add_argument("--data-root", default="data")
    replace.add_argument("--out", required=True, help="per-pair JSON record path")
    replace.add_argument("--threads", type=int, help="CPU threads for torch")
    _device_argument(replace)
    replace.set_defaults(func=cmd_reuse_replace)
    for verb, func, what, out in (
            ("replace-table", cmd_reuse_replace_table,
             "E6 table: composed accuracy per swapped class, published beside",
             "CSV path (.md beside)"),
            ("replace-figure", cmd_reuse_replace_figure,
             "E6 figure: composed top-1 per swapped class, no-swap baselines as lines",
             "PNG path (a PDF is written beside)")):
        report = reuse.add_parser(verb, help=what)
        report.add_argument("--records", nargs="+", required=True,
                            help="JSON records of reuse replace")
        report.add_argument("--out", required=True, help=out)
        if verb.endswith("table"):
            report.add_argument("--summary", help="JSON path for DVC metrics")
        report.set_defaults(func=func)
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

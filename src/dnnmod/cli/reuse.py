"""``dnnmod reuse``: reuse module sets, patching (E3), new tasks (E4), sub-tasks (E5) and
replacement (E6). Their tables and figures are in :mod:`dnnmod.cli.reports`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from dnnmod.cli.common import (
    Commands,
    add_device_argument,
    configure_torch,
    device_name,
    json_arg,
    named_path,
)
from dnnmod.devices import select_device
from dnnmod.errors import ConfigError

log = logging.getLogger("dnnmod")


def image_count(text: str) -> int | None:
    """``--calibration-images``: a positive count, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of images or 'all'")
    return count


def cmd_reuse_patch(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.artifacts import write_json
    from dnnmod.reuse.patching import patch_weak_models

    record = patch_weak_models(Path(args.modules), Path(args.model),
                               [(weak_type, Path(path)) for weak_type, path in args.weak],
                               Path(args.data_root), args.setting, device=claim.device,
                               protocol=args.protocol,
                               calibration_layer=args.calibration_layer,
                               calibration_images=args.calibration_images)
    record["device"] = device_name(claim.device)
    write_json(args.out, record)
    for row in record["rows"]:
        log.info("%s %s TC %s: precision %.2f -> %.2f, recall %.2f -> %.2f", record["approach"],
                 row["weak_type"], row["target_name"], row["weak_precision"],
                 row["patched_precision"], row["weak_recall"], row["patched_recall"])
    claim.release()


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
        "device": device_name(claim.device)})
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


def cmd_reuse_subtasks(args: argparse.Namespace) -> None:
    from dnnmod.reuse.subtasks import resolve_settings

    settings = resolve_settings(args.settings)  # bad keys and values fail before loading
    claim = select_device(args.device)
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.reuse.subtasks import check_st_model, evaluate_subtasks, write_subtasks
    from dnnmod.training.model_io import load_model

    configure_torch(claim.device, args.threads)
    model, meta = load_model(args.model, device=claim.device)
    modules = ModuleSet.load(args.modules, base=meta, model=model)
    st_model = model if meta["training"] == "st" else None
    if args.st_model and Path(args.st_model).resolve() != Path(args.model).resolve():
        st_model, st_meta = load_model(args.st_model, device=claim.device)
        check_st_model(st_meta, meta, args.st_model)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    frame, summary = evaluate_subtasks(model, modules, data, settings, st_model=st_model,
                                       seed=meta["seed"])
    write_subtasks(Path(args.out), frame, summary, meta, modules, device_name(claim.device))
    log.info("%s on %s/%s: %d sub-tasks in %.1f s (+ %.1f s shared passes), composed %.2f%% "
             "vs base %.2f%% on average", modules.approach, meta["dataset"], meta["model"],
             summary["subsets"], summary["subsets_seconds"], summary["shared_seconds"],
             frame["composed_accuracy"].mean(), frame["base_accuracy"].mean())
    claim.release()


def cmd_reuse_replace(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.artifacts import write_json
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.reuse.replacement import replacement_record
    from dnnmod.training.model_io import load_model

    configure_torch(claim.device, args.threads)
    sides = []
    for model_path, modules_path in ((args.weaker_model, args.weaker_modules),
                                     (args.stronger_model, args.stronger_modules)):
        model, meta = load_model(model_path, device=claim.device)
        sides.append((model, meta, ModuleSet.load(modules_path, base=meta, model=model)))
    meta = sides[0][1]
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    record = replacement_record(sides[0], sides[1], data.test, device_name(claim.device))
    write_json(args.out, record)
    log.info("%s %s: weaker composed %.2f%%, stronger %.2f%%, swapped mean %.2f%%",
             record["approach"], record["dataset"], record["weaker_composed_top1"],
             record["stronger_composed_top1"],
             sum(row["top1"] for row in record["rows"]) / len(record["rows"]))
    claim.release()


def add_commands(commands: Commands) -> None:
    patch = commands.add("reuse patch", "E3: patch weak models with a strong model's "
                                        "target-class modules (min-max or MODA protocol)",
                         cmd_reuse_patch)
    patch.add_argument("--modules", required=True, help="module set (*.safetensors)")
    patch.add_argument("--model", required=True,
                       help="the strong model it was cut from (*.safetensors)")
    patch.add_argument("--weak", type=named_path, action="append", required=True,
                       metavar="TYPE=PATH",
                       help="a weak model (simple, underfit or overfit) trained on a weak task "
                            "whose last class is the target class; repeatable")
    patch.add_argument("--setting", required=True, help="patching setting name (tables)")
    patch.add_argument("--protocol", default="minmax",
                       help="minmax (ASE/TOSEM: min-max normalised module score replaces the "
                            "TC column) or moda (MODA: a trained calibration layer over the "
                            "weak model's other logits and the module score); default minmax")
    patch.add_argument("--calibration-layer", type=json_arg, metavar="JSON",
                       help="protocol moda only: the calibration layer's training, "
                            '\'{"epochs": 20, "lr": 0.05, "batch_size": 128, "split": "train"}\' '
                            "(MODA's; keys optional; split: train or val)")
    patch.add_argument("--calibration-images", type=image_count, metavar="N|all",
                       help="protocol minmax only: how many of the strong model's validation "
                            "images of the target class give the min-max range (default all, "
                            "the authors')")
    patch.add_argument("--data-root", default="data")
    patch.add_argument("--out", required=True, help="metrics JSON path")
    add_device_argument(patch)

    new_task = commands.add("reuse new-task", "E4: compose binary classifiers for class pairs "
                                              "from the modules chosen by best F1",
                            cmd_reuse_new_task)
    new_task.add_argument("--approach", required=True, help="approach of every candidate")
    new_task.add_argument("--setting", required=True, help="setting name (tables)")
    new_task.add_argument("--model", required=True,
                          help="the setting's from-scratch baseline model name (tables)")
    new_task.add_argument("--pairs", type=json_arg, required=True,
                          help='JSON list of [dataset A, class a, dataset B, class b], e.g. '
                               '\'[["digits", 3, "shapes", 1]]\'; each pair\'s test images '
                               "are those of its derived task pair_<A>_<a>_<B>_<b>")
    new_task.add_argument("--candidate", nargs=2, action="append", required=True,
                          metavar=("MODULES", "MODEL"),
                          help="a candidate module set and its base model; repeatable")
    new_task.add_argument("--selection-split", default="val",
                          help="split of each candidate's dataset the modules are chosen on by "
                               "binary F1 (val or train; default val)")
    new_task.add_argument("--continuous-learning", type=json_arg, metavar="JSON",
                          help="also retrain the chosen modules (masks fixed) on each pair "
                               "task's training split, Pan & Rajan's continuous learning, and "
                               'score them again: \'{"epochs": 5, "lr": 0.0001, '
                               '"batch_size": 64}\' (keys optional)')
    new_task.add_argument("--data-root", default="data")
    new_task.add_argument("--out", required=True, help="composed-records JSON path")
    add_device_argument(new_task)

    subtasks = commands.add("reuse subtasks", "E5: every sub-task of a module set's classes "
                                              "(sizes 2..N, or a seeded sample): composed "
                                              "accuracy vs the base model, size, FLOPs",
                            cmd_reuse_subtasks)
    subtasks.add_argument("--modules", required=True, help="module set (*.safetensors)")
    subtasks.add_argument("--model", required=True,
                          help="the base model it was cut from (*.safetensors)")
    subtasks.add_argument("--st-model",
                          help="the standard-trained model of the same architecture, dataset "
                               "and seed, for the ST column (default: --model when it is one)")
    subtasks.add_argument("--settings", type=json_arg, default={},
                          help="JSON: max_subsets, samples_per_size, seed, union_subsets, "
                               "fine_tune_epochs, fine_tune_lr, fine_tune_batch_size")
    subtasks.add_argument("--data-root", default="data")
    subtasks.add_argument("--out", required=True,
                          help="per-sub-task CSV path (a JSON run record is written beside)")
    subtasks.add_argument("--threads", type=int, help="CPU threads for torch")
    add_device_argument(subtasks)

    replace = commands.add("reuse replace", "E6: swap each class's module of a weaker model "
                                            "for a stronger model's; composed top-1/top-5",
                           cmd_reuse_replace)
    for role in ("weaker", "stronger"):
        replace.add_argument(f"--{role}-model", required=True,
                             help=f"the {role} base model (*.safetensors)")
        replace.add_argument(f"--{role}-modules", required=True,
                             help=f"the module set cut from the {role} model")
    replace.add_argument("--data-root", default="data")
    replace.add_argument("--out", required=True, help="per-pair JSON record path")
    replace.add_argument("--threads", type=int, help="CPU threads for torch")
    add_device_argument(replace)

"""``dnnmod check-approach`` (the approach contract), ``dnnmod modularize``, CNNSplitter's
layer sensitivity sweep (``cnnsplitter-sweep``, what its ``keep_ratios: sweep`` reads) and the
evaluation of a module set: ``evaluate-modules`` (the shared metrics, E2) and
``evaluate-decomposition`` (Pan & Rajan's Table 1)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dnnmod.cli.common import (
    Commands,
    add_device_argument,
    add_st_model_argument,
    configure_torch,
    device_name,
    json_arg,
    named_path,
)
from dnnmod.devices import select_device
from dnnmod.errors import ConfigError

log = logging.getLogger("dnnmod")


def cmd_check_approach(args: argparse.Namespace) -> int:
    from dnnmod.approaches.contract import check_approach_command

    return check_approach_command(args.approach, Path(args.work_dir) if args.work_dir else None)


def cmd_cnnsplitter_sweep(args: argparse.Namespace) -> None:
    from dnnmod.approaches import get_approach

    hyperparameters = get_approach("cnnsplitter").resolve(args.hyperparameters)
    claim = select_device(args.device)
    from dnnmod.approaches.cnnsplitter import layer_sensitivity_sweep
    from dnnmod.artifacts import write_json
    from dnnmod.data import load_dataset
    from dnnmod.training.model_io import load_model

    configure_torch(claim.device, args.threads)
    model, meta = load_model(args.model, device=claim.device)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    record = layer_sensitivity_sweep(model, meta, data, hyperparameters, seed=args.seed,
                                     device=claim.device)
    record["device"] = device_name(claim.device)
    write_json(args.out, record)
    log.info("cnnsplitter layer sensitivity: sensitive %s, keep ratios %s / %s (%.1f s)",
             record["derived"]["sensitive_layers"], record["derived"]["sensitive_keep_ratios"],
             record["derived"]["other_keep_ratios"], record["wall_seconds"])
    claim.release()


def cmd_modularize(args: argparse.Namespace) -> None:
    from dnnmod.approaches import get_approach, run_approach

    approach = get_approach(args.approach)  # fail on bad names and values before loading
    hyperparameters = approach.resolve(args.hyperparameters)
    if args.layer_sensitivity and args.approach != "cnnsplitter":
        raise ConfigError(f"--layer-sensitivity: only cnnsplitter reads a layer sensitivity "
                          f"sweep, not {args.approach}")
    reference_paths = dict(args.reference)
    claim = select_device(args.device)
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.training.model_io import load_model

    configure_torch(claim.device, args.threads)
    model, meta = load_model(args.model, device=claim.device)
    if args.layer_sensitivity:
        from dnnmod.approaches.cnnsplitter import sweep_for
        from dnnmod.artifacts import read_json

        hyperparameters = approach.resolve({
            **args.hyperparameters, "layer_sensitivity": sweep_for(
                read_json(args.layer_sensitivity), meta, hyperparameters, args.seed)})
    training = approach.training_for(hyperparameters)
    if meta.get("training") != training:
        raise ConfigError(f"{args.model}: a model of training kind {meta.get('training')!r}; "
                          f"{args.approach} decomposes {training!r}-trained models")
    references = {name: ModuleSet.load(path, base=meta, model=model)
                  for name, path in reference_paths.items()}
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    modules = run_approach(args.approach, model, meta, data, hyperparameters, seed=args.seed,
                           device=claim.device, references=references,
                           checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    modules.provenance["device"] = device_name(claim.device)
    modules.save(args.out)
    if args.checkpoint:
        Path(args.checkpoint).unlink(missing_ok=True)
    log.info("%s: %d modules in %.1f s", args.approach, len(modules),
             modules.provenance["wall_seconds"])
    if args.metrics:  # as evaluate-modules would, on fresh copies of what it would read
        model, meta = load_model(args.model, device=claim.device)
        write_module_metrics(model, meta, ModuleSet.load(args.out, base=meta, model=model),
                              data, args.metrics, args.st_model)
    claim.release()


def cmd_evaluate_modules(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.training.model_io import load_model

    model, meta = load_model(args.model, device=claim.device)
    modules = ModuleSet.load(args.modules, base=meta, model=model)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    write_module_metrics(model, meta, modules, data, args.out, args.st_model)
    claim.release()


def write_module_metrics(model, meta, modules, data, out: str, st_model: str | None) -> None:
    """The shared metrics of a module set on the test split, as its metrics.json record;
    ``st_model``: the weights of the ST model of the same architecture, dataset and seed,
    whose test accuracy the approaches of protocol ``modular_model`` are measured against."""
    from dnnmod.approaches import get_approach
    from dnnmod.artifacts import write_json
    from dnnmod.modules.metrics import evaluate, metrics_record
    from dnnmod.reuse.subtasks import check_st_model
    from dnnmod.training.records import read_model_record

    st_accuracy = None
    if st_model:
        st_meta = read_model_record(st_model)
        check_st_model(st_meta, meta, st_model)
        st_accuracy = st_meta["metrics"]["test_accuracy"]
    approach = get_approach(modules.approach)
    result = evaluate(model, modules, data.test, meta["metrics"]["test_accuracy"],
                      union=approach.composes_by_union, approach=approach,
                      st_accuracy=st_accuracy)
    write_json(out, metrics_record(meta, modules, result))
    log.info("%s on %s/%s: composed %.2f%% (base %.2f%%), KRR %.3f", modules.approach,
             meta["dataset"], meta["model"], result["composed_accuracy"],
             result["base_accuracy"], result["krr"])


def cmd_evaluate_decomposition(args: argparse.Namespace) -> None:
    claim = select_device(args.device)
    from dnnmod.approaches.pan_rajan import decomposition_cost
    from dnnmod.artifacts import write_json
    from dnnmod.data import load_dataset
    from dnnmod.modules.moduleset import ModuleSet
    from dnnmod.training.model_io import load_model

    model, meta = load_model(args.model, device=claim.device)
    modules = ModuleSet.load(args.modules, base=meta, model=model)
    data = load_dataset(Path(args.data_root), meta["dataset"], meta["seed"], device=claim.device)
    record = decomposition_cost(model, meta, modules, data.test)
    write_json(args.out, record)
    log.info("%s on %s/%s: top-1 %.2f%% -> %.2f%%, top-5 %.2f%% -> %.2f%%, Jaccard %.3f",
             modules.approach, meta["dataset"], meta["model"], record["model_top1"],
             record["composed_top1"], record["model_top5"], record["composed_top5"],
             record["jaccard"])
    claim.release()


def add_commands(commands: Commands) -> None:
    check = commands.add("check-approach", "run the approach contract on an approach (a "
                                           "plug-in's): each requirement passed or failed; "
                                           "status 1 if any failed", cmd_check_approach)
    check.add_argument("approach", help="PACKAGE.MODULE:CLASS, or a registered approach's name")
    check.add_argument("--work-dir", help="where the tiny bench's data and models go "
                                          "(default: a temporary directory)")

    modularize = commands.add("modularize", "decompose a trained model into modules",
                              cmd_modularize)
    modularize.add_argument("--approach", required=True, help="e.g. gradsplitter")
    modularize.add_argument("--model", required=True, help="base model weights (*.safetensors)")
    modularize.add_argument("--hyperparameters", type=json_arg, default={},
                            help="JSON hyperparameters overriding the approach's defaults")
    modularize.add_argument("--reference", type=named_path, action="append", default=[],
                            metavar="APPROACH=PATH",
                            help="a module set the approach reads (random_mwt: mwt's), cut "
                                 "from the same base model; repeatable")
    modularize.add_argument("--layer-sensitivity", metavar="PATH",
                            help="cnnsplitter: the layer sensitivity sweep (dnnmod "
                                 "cnnsplitter-sweep) that keep_ratios 'sweep' reads")
    modularize.add_argument("--seed", type=int, required=True)
    modularize.add_argument("--data-root", default="data")
    modularize.add_argument("--out", required=True, help="module set path (*.safetensors)")
    modularize.add_argument("--checkpoint", help="resumable state (kept across restarts)")
    modularize.add_argument("--metrics", help="also evaluate the module set on the test split "
                                              "and write its metrics JSON (as "
                                              "evaluate-modules does)")
    add_st_model_argument(modularize)
    modularize.add_argument("--threads", type=int, help="CPU threads for torch")
    add_device_argument(modularize)

    sweep = commands.add("cnnsplitter-sweep",
                         "CNNSplitter's layer sensitivity sweep of a trained model (each conv "
                         "layer alone pruned to r = 0.1..1.0; the keep ratios of keep_ratios "
                         "'sweep' derive from it)", cmd_cnnsplitter_sweep)
    sweep.add_argument("--model", required=True, help="base model weights (*.safetensors)")
    sweep.add_argument("--hyperparameters", type=json_arg, default={},
                       help="JSON cnnsplitter hyperparameters of the search that reads it (its "
                            "fitness_samples and confidence choose the images)")
    sweep.add_argument("--seed", type=int, required=True, help="the search's seed")
    sweep.add_argument("--data-root", default="data")
    sweep.add_argument("--out", required=True, help="sweep JSON path")
    sweep.add_argument("--threads", type=int, help="CPU threads for torch")
    add_device_argument(sweep)

    evaluate = commands.add("evaluate-modules",
                            "shared metrics of a module set on the test split",
                            cmd_evaluate_modules)
    decomposition = commands.add(
        "evaluate-decomposition", "Pan & Rajan's Table 1 measures of a module set: model and "
                                  "composed top-1/top-5, model-module Jaccard",
        cmd_evaluate_decomposition)
    for parser, out in ((evaluate, "metrics JSON path"), (decomposition, "JSON path")):
        parser.add_argument("--modules", required=True, help="module set (*.safetensors)")
        parser.add_argument("--model", required=True, help="its base model (*.safetensors)")
        parser.add_argument("--data-root", default="data")
        parser.add_argument("--out", required=True, help=out)
    add_st_model_argument(evaluate)
    add_device_argument(evaluate)
    add_device_argument(decomposition)

"""``dnnmod train``: a base model, by standard training or an approach's modular training."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dnnmod.cli.common import (
    Commands,
    add_device_argument,
    configure_torch,
    device_name,
    json_arg,
)
from dnnmod.devices import select_device

log = logging.getLogger("dnnmod")


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

    configure_torch(claim.device, args.threads)
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
        device=device_name(claim.device)))
    if args.checkpoint:  # the final artifact is committed: resume state has served its purpose
        Path(args.checkpoint).unlink(missing_ok=True)
    claim.release()


def add_commands(commands: Commands) -> None:
    train = commands.add("train", "train a base model (standard or modular training)", cmd_train)
    train.add_argument("--dataset", required=True)
    train.add_argument("--arch", required=True, help="architecture (dnnmod list models)")
    train.add_argument("--model-name", help="name recorded in metadata (default: arch)")
    train.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    train.add_argument("--options", type=json_arg, default={},
                       help="JSON architecture options, e.g. '{\"batch_norm\": false}'")
    train.add_argument("--recipe", type=json_arg, required=True, help="JSON training recipe")
    train.add_argument("--training",
                       help="training kind (default: st, standard training; approaches may "
                            "register others, e.g. their modular training)")
    train.add_argument("--objective", type=json_arg, default={},
                       help="JSON hyperparameters overriding the training kind's defaults")
    train.add_argument("--seed", type=int, required=True)
    train.add_argument("--data-root", default="data")
    train.add_argument("--out", required=True, help="weights path (*.safetensors)")
    train.add_argument("--checkpoint", help="resumable checkpoint path (kept across restarts)")
    add_device_argument(train)
    train.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    train.add_argument("--no-amp", action="store_true", help="disable CUDA mixed precision")

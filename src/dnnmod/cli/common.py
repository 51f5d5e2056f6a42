"""What the command modules share: how a command is added, argument types and options, and the
torch set-up of a job. Nothing here imports torch at import time: ``dnnmod --help`` and the
table and figure jobs must not pay for it (tests/test_import_costs.py)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping


class Commands:
    """Where a command module adds its commands: ``add("train", ...)`` a verb,
    ``add("reuse patch", ...)`` a verb of a group, the group made on first use with its help
    from ``groups``."""

    def __init__(self, verbs: argparse._SubParsersAction, groups: Mapping[str, str]) -> None:
        self.verbs, self.groups = verbs, groups
        self.made: dict[str, argparse._SubParsersAction] = {}

    def add(self, command: str, help: str, func: Callable[[argparse.Namespace], int | None]
            ) -> argparse.ArgumentParser:
        group, _, verb = command.rpartition(" ")
        if group and group not in self.made:
            self.made[group] = self.verbs.add_parser(group, help=self.groups[group]
                                                     ).add_subparsers(dest=f"{group}_command",
                                                                      required=True)
        parser = (self.made[group] if group else self.verbs).add_parser(verb, help=help)
        parser.set_defaults(func=func)
        return parser


def json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None


def named_path(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=os.environ.get("DNNMOD_DEVICE", "auto"),
                        choices=["auto", "cpu", "cuda"],
                        help="default: $DNNMOD_DEVICE, else auto (a free GPU slot, else CPU)")


def add_st_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--st-model", help="the standard-trained model of the same architecture, "
                                           "dataset and seed (*.safetensors): MwT's and MODA's "
                                           "accuracy loss is measured against its accuracy")


def configure_torch(device: str, threads: int | None) -> None:
    """Thread count, and deterministic kernels on the CPU (same seed, same result)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    # torch.use_deterministic_algorithms would also import torch._inductor (about 2 s of every
    # job) just to set the compiler's flag; no dnnmod command compiles, so set the eager one.
    torch._C._set_deterministic_algorithms(device == "cpu", warn_only=True)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', '?')} {torch.cuda.get_device_name()}"
    return "cpu"

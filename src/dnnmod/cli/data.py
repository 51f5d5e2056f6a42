"""``dnnmod list`` and ``dnnmod data``: registered names, datasets, splits and derived tasks."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dnnmod.cli.common import Commands, json_arg
from dnnmod.errors import ConfigError

log = logging.getLogger("dnnmod")


def cmd_list(args: argparse.Namespace) -> None:
    from dnnmod.plugins import listing

    print("\n".join(listing(args.what)))


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


def cmd_data_archives(args: argparse.Namespace) -> None:
    from dnnmod.data.official_archives import ArchiveSizes, write_archives

    write_archives(Path(args.out), ArchiveSizes(args.train_per_class, args.test_per_class),
                   args.datasets, args.seed)
    log.info("wrote %s", Path(args.out))


def add_commands(commands: Commands) -> None:
    listing = commands.add("list", "list registered approaches, training kinds (objectives), "
                                   "models, datasets or combination rules; a plug-in's with its "
                                   "distribution", cmd_list)
    listing.add_argument("what", choices=["approaches", "objectives", "models", "datasets",
                                          "combination_rules"])

    prepare = commands.add("data prepare", "download (or generate), verify and convert",
                           cmd_data_prepare)
    prepare.add_argument("--dataset", required=True)
    prepare.add_argument("--root", default="data", help="data directory (default: data)")
    prepare.add_argument("--spec", type=json_arg, default={},
                         help="JSON: mirror, files {name: {url, md5}}, local_dir, options")
    split = commands.add("data split", "seeded train/validation split of the training set",
                         cmd_data_split)
    split.add_argument("--dataset", required=True)
    split.add_argument("--root", default="data")
    split.add_argument("--seed", type=int, required=True)
    split.add_argument("--validation-fraction", type=float, default=0.2)
    derive = commands.add("data derive", "make a task (class subsets and unions, per-class "
                                         "counts) from prepared datasets", cmd_data_derive)
    derive.add_argument("--task", required=True, help="task name (a key of tasks in config)")
    derive.add_argument("--spec", type=json_arg, required=True,
                        help="JSON: parts [{dataset, classes}], samples_per_class, seed, "
                             "dirichlet {alpha, split_seed, min_per_class} (a class-imbalanced "
                             "draw from one dataset's training split)")
    derive.add_argument("--root", default="data")
    archives = commands.add("data archives", "write small datasets in the official download "
                                             "formats, and their checksums, for a mirror",
                            cmd_data_archives)
    archives.add_argument("--out", required=True, help="folder to serve as the mirror")
    archives.add_argument("--datasets", nargs="+",
                          help="cifar10 cifar100 svhn fashion_mnist (default: all)")
    archives.add_argument("--train-per-class", type=int, default=20)
    archives.add_argument("--test-per-class", type=int, default=10)
    archives.add_argument("--seed", type=int, default=0)

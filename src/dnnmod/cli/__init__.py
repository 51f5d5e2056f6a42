"""The ``dnnmod`` command line: verbs on nouns (``dnnmod data prepare``, ``dnnmod train``).

Snakemake rules call these commands; nothing in the workflow runs inline Python. Errors caused
by input print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

from dnnmod import fork_server
from dnnmod.errors import DnnmodError

if TYPE_CHECKING:
    import argparse

#: The command groups and their help (``dnnmod GROUP VERB``); the modules below add the verbs.
GROUPS = {
    "data": "prepare datasets, splits and derived tasks",
    "study": "derive study configurations",
    "reuse": "reuse module sets: patching (E3), new tasks (E4), sub-tasks (E5), replacement "
             "(E6)",
    "table": "build result tables",
    "sensitivity": "E7: sensitivity sweeps and ablations (table and figure of the sweep points)",
    "curves": "training-curve figures from recorded runs",
    "report": "build the study report",
}
#: The modules that add commands, in the order ``dnnmod --help`` lists them. Imported when the
#: parser is built: a job that the fork server starts only hands its arguments on.
COMMAND_MODULES = ("data", "study", "train", "modularize", "reuse", "reports")


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from dnnmod.cli.common import Commands

    parser = argparse.ArgumentParser(prog="dnnmod", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: DNNMOD_DEBUG=1)")
    commands = Commands(parser.add_subparsers(dest="command", required=True), GROUPS)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dnnmod.cli.{name}").add_commands(commands)
    server = commands.add("fork-server", "start workflow jobs from one process that has "
                                         "imported torch (the workflow starts it)", cmd_fork_server)
    server.add_argument("--socket", required=True, help="Unix socket path to listen on")
    server.add_argument("--parent", type=int, required=True,
                        help="serve while this process (the Snakemake run) lives")
    return parser


def cmd_fork_server(args: argparse.Namespace) -> int:
    fork_server.serve(args.socket, args.parent)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and os.environ.get(fork_server.SOCKET_ENV):
        # a job of a local workflow run: started by the fork server if one answers
        status = fork_server.delegate(os.environ[fork_server.SOCKET_ENV], sys.argv[1:])
        if status is not None:
            return status
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        status = args.func(args)
    except (DnnmodError, OSError) as err:
        # Input and file-system problems are the user's to fix: one line names them; the
        # traceback is for debugging dnnmod itself.
        if args.debug or os.environ.get("DNNMOD_DEBUG"):
            raise
        print(f"dnnmod: error: {err}", file=sys.stderr)
        return 2
    return status or 0  # a command that reports failures returns its status

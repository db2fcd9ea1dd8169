"""The `loopstack` command. Each subcommand lives with the code it drives and registers itself here.

Adding a subcommand = one line in COMMANDS pointing at a module with `register(subparsers)`. Those
modules must stay light at import time (argparse only): `loopstack --help` must not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loopstack import __version__
from loopstack.errors import UserError

# (module with register(subparsers)) in the order `--help` lists them
COMMANDS = [
    "loopstack.commands",  # config, env
    "data_pipeline.cli",  # data ...
    "pretrain.cli",  # train, eval
    "pretrain.use_cli",  # generate, export, convert, harness
    "launch.cli",  # launch ...
    "pretrain.research.cli",  # research stability|extrapolate
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopstack",
        description="Pretraining stack for looped (recurrent-depth) transformers.",
    )
    parser.add_argument("--version", action="version", version=f"loopstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency inside an existing module
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        _say(f"loopstack: error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _say("loopstack: interrupted")
        return 130


def _say(line: str) -> None:
    """One stderr line in one write: under torchrun every rank may refuse at once, and print's separate write of
    the newline let two ranks' lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())

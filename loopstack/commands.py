"""Foundation subcommands: `loopstack config show|validate|keys` and `loopstack env`."""

from __future__ import annotations

import argparse


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    """The `--set key=value` override flag every config-taking command shares."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.loops=8 (repeatable)")


def parse_loop_list(text: str, flag: str = "--loops") -> list[int]:
    """`--loops 1,4,8`: the loop counts in the order given (integers >= 1); a one-line UserError otherwise. Every
    command that takes a list of loop counts (eval, eval --task, harness) parses it here."""
    from loopstack.errors import UserError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text}: expected comma-separated loop counts >= 1, e.g. 1,2,4,8")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    cfg = sub.add_parser("config", help="show, validate or list run configs")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved config (base + overrides) as YAML")
    show.add_argument("config", help="YAML config file")
    add_set_flag(show)
    show.set_defaults(func=_config_show)
    val = cfg_sub.add_parser("validate", help="check a config; exit 2 with one line if it is wrong")
    val.add_argument("config", help="YAML config file")
    add_set_flag(val)
    val.set_defaults(func=_config_validate)
    keys = cfg_sub.add_parser("keys", help="list every config key with its type, default and meaning")
    keys.set_defaults(func=_config_keys)

    env = sub.add_parser("env", help="versions, accelerators and the launcher environment seen")
    env.set_defaults(func=_env)


def _config_show(args: argparse.Namespace) -> int:
    from pretrain.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _config_validate(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    load_config(args.config, args.overrides)
    print(f"{args.config}: ok")
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    from loopstack.typed_config import describe
    from pretrain.config import RunConfig

    for key, tp, default, help_text in describe(RunConfig):
        print(f"{key:34s} {tp:28s} default {default!r:14s} {help_text}")
    return 0


def _env(args: argparse.Namespace) -> int:
    from loopstack.env_report import environment_report

    for key, value in environment_report():
        print(f"{key:22s} {value}")
    return 0

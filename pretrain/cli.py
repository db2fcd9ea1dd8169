"""`loopstack train` and `loopstack eval` (argparse only at import time: torch loads inside the handlers)."""

from __future__ import annotations

import argparse

from data_pipeline import SYNTH_TASKS
from loopstack.commands import add_set_flag, parse_loop_list


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="train a looped model (one process, or each rank under torchrun)",
        description="Train from a YAML config. Exit 0 when finished, 75 after a SIGUSR1/SIGTERM checkpoint "
                    "(requeue me), 2 on a user error.")
    train.add_argument("config", help="YAML run config, e.g. configs/smoke-cpu.yaml")
    add_set_flag(train)
    train.add_argument("--run-dir", default=None, help="output directory (default runs/<name>)")
    train.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                       help="auto: newest complete checkpoint of the run dir (default); PATH: that checkpoint; "
                            "none: start fresh")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="held-out loss vs loop count for a run's checkpoint, and its plots")
    ev.add_argument("run_dir", help="a run directory made by `loopstack train`")
    ev.add_argument("--checkpoint", default="auto", help="checkpoint dir (default: the newest complete one)")
    ev.add_argument("--loops", default="", help="comma-separated loop counts (default: config's eval.loops)")
    ev.add_argument("--batches", type=int, default=0,
                    help="eval batches per loop count (default: config's); with --task: batches of task.batch_size "
                         "problems per depth")
    ev.add_argument("--task", choices=SYNTH_TASKS, default=None,
                    help="answer accuracy on a synthetic depth task by difficulty, inside and beyond the trained "
                         "depth (instead of the held-out loss)")
    ev.add_argument("--exit-threshold", default="", metavar="Q[,Q...]",
                    help="adaptive depth with the learned exit gate (runs trained with model.exit_gate): per token, "
                         "stop once the cumulative exit probability reaches Q (0 < Q <= 1); reports the loss and the "
                         "mean loops used at each Q, at most --loops loops (default: the trained count)")
    ev.add_argument("--exit-epsilon", default="", metavar="EPS[,EPS...]",
                    help="adaptive depth by convergence: per token, stop once the state's relative change is below "
                         "EPS; reported like --exit-threshold")
    add_set_flag(ev)
    ev.set_defaults(func=_eval)


def _exit_rules(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The (rule, value) pairs of --exit-threshold / --exit-epsilon, checked (one-line errors naming the flag)."""
    from loopstack.errors import UserError

    rules = []
    for flag, kind, text, ok in (("--exit-threshold", "threshold", args.exit_threshold, lambda q: 0 < q <= 1),
                                 ("--exit-epsilon", "epsilon", args.exit_epsilon, lambda e: e >= 0)):
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                value = float(part)
            except ValueError:
                raise UserError(f"{flag} {text!r}: {part!r} is not a number") from None
            if not ok(value):
                raise UserError(f"{flag} {value:g}: out of range (see loopstack eval --help)")
            rules.append((kind, value))
    return rules


def _train(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    from pretrain.train import run

    return run(cfg, args.run_dir, args.resume)


def _eval(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from loopstack.errors import UserError
    from pretrain.config import load_config

    run_dir = Path(args.run_dir)
    rules = _exit_rules(args)
    if args.task:
        from pretrain.taskeval import run_task_eval

        return run_task_eval(args, rules)
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir}: no config.yaml (not a run directory made by `loopstack train`)")
    overrides = list(args.overrides)
    if args.loops and not rules:
        overrides.append(f"eval.loops={parse_loop_list(args.loops)}")
    if args.batches:
        overrides.append(f"eval.batches={args.batches}")
    cfg = load_config(run_dir / "config.yaml", overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % cfg.parallel.tp and not any(o.startswith("parallel.tp=") for o in overrides):
        # a run trained with TP on many GPUs, evaluated here: ZeRO 1-3 checkpoints re-shard on load
        print(f"eval: {world} process(es), the run used parallel.tp = {cfg.parallel.tp}: evaluating with tp = 1")
        cfg = load_config(run_dir / "config.yaml", [*overrides, "parallel.tp=1"])
    if any(kind == "threshold" for kind, _ in rules):
        from pretrain.models.config import require_exit_gate

        require_exit_gate(cfg.model, run_dir)
    from pretrain.train import evaluate_run

    caps = parse_loop_list(args.loops) if args.loops and rules else None
    return evaluate_run(cfg, run_dir, args.checkpoint, exit_rules=rules, exit_loops=caps)

"""`loopstack research stability|extrapolate` (argparse only at import time: torch loads inside the handlers)."""

from __future__ import annotations

import argparse

from data_pipeline import SYNTH_TASKS


def register(sub: argparse._SubParsersAction) -> None:
    from pretrain.research.common import add_common_flags

    research = sub.add_parser("research", help="controlled sweeps of looped variants, with plots and a report")
    rsub = research.add_subparsers(dest="research_command", metavar="STUDY", required=True)

    st = rsub.add_parser(
        "stability", help="held-out loss, state norms and gradient oscillation vs training loop count",
        description="Train every (variant, loops, seed) with one config (only model.variant, model.loops and seed "
                    "differ), resumable, in parallel; write OUT/results/*.json, OUT/plots/*.png and OUT/report.md. "
                    "See docs/research/stability.md.")
    add_common_flags(st, "configs/research-stability.yaml", "lt,lt_i,flt_res,flt,recall,huginn,parcae", "3,6,12",
                     "runs/research/stability",
                     default_seeds=2)
    st.set_defaults(func=_stability)

    ex = rsub.add_parser(
        "extrapolate", help="answer accuracy by difficulty (up to 2-3x the trained) and test-time loops",
        description="Train every variant on a synthetic depth task up to difficulty d, report answer accuracy by "
                    "difficulty up to --max-depth at test-time loops 1 to 4x the trained count. See "
                    "docs/research/extrapolation.md.")
    add_common_flags(ex, "configs/research-extrapolate.yaml", "looped,recall,recall_internal,flt", "4",
                     "runs/research/extrapolate")
    ex.add_argument("--task", choices=SYNTH_TASKS, default="parity",
                    help="default parity; chain is the one whose harder problems use the same tokens and length")
    ex.add_argument("--train-depth", type=int, default=4, help="deepest trained difficulty d (default 4)")
    ex.add_argument("--max-depth", type=int, default=0, help="deepest evaluated difficulty (default 3 x d)")
    ex.add_argument("--train-docs", type=int, default=20000, help="training problems written (default 20000)")
    ex.add_argument("--problems", type=int, default=200, help="problems per difficulty evaluated (default 200)")
    ex.add_argument("--outer-norm", default="", metavar="on,off",
                    help="also sweep model.outer_norm (comma-separated on/off; default: each variant's recipe)")
    ex.set_defaults(func=_extrapolate)


def _stability(args: argparse.Namespace) -> int:
    from pretrain.research.stability import run_command

    return run_command(args)


def _extrapolate(args: argparse.Namespace) -> int:
    from pretrain.research.extrapolate import run_command

    return run_command(args)

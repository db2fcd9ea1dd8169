"""What `research stability` and `research extrapolate` share between parsing their flags and the report: the grid
flags (one-line errors), the base config (the documented default file when none is given), validating every run's
config before anything starts, and sweep -> sweep.json -> report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from loopstack.errors import UserError
from pretrain.research.sweep import ROOT, RunSpec, default_jobs, machine, parse_list, run_sweep


def parse_grid(args: argparse.Namespace, valid: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """(--variants, --loops) checked; --seeds, --jobs, --threads too."""
    from loopstack.commands import parse_loop_list

    variants = parse_list(args.variants, "--variants", valid)
    loops = list(dict.fromkeys(parse_loop_list(args.loops)))
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: expected at least 1")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected at least 1")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: expected at least 1")
    return variants, loops


def resolve_config(path: str) -> str:
    """CONFIG as given (relative to the current directory), else relative to the repository (the default file)."""
    if Path(path).exists():
        return path
    if not Path(path).is_absolute() and (ROOT / path).exists():
        return str(ROOT / path)
    raise UserError(f"{path}: no such config file")


def load_base(args: argparse.Namespace):
    from pretrain.config import load_config

    args.config = resolve_config(args.config)
    return load_config(args.config, args.overrides)


def validate(specs: list[RunSpec]) -> None:
    """Every run's resolved config, before any run starts: a bad override is one line, not N failed runs."""
    from pretrain.config import load_config

    for spec in specs:
        load_config(spec.config, spec.overrides)


def sweep_and_report(args: argparse.Namespace, cfg, specs: list[RunSpec], kind: str) -> int:
    from pretrain.research import report
    from pretrain.train import prepare_data

    validate(specs)
    out = Path(args.out)
    jobs = args.jobs or default_jobs(args.threads)
    prepare_data(cfg)  # tokenizer + shards once, before the runs (each run finds them made)
    started = time.time()
    results = run_sweep(specs, out, jobs=jobs, threads=args.threads)
    meta = {"kind": kind, "command": "loopstack " + shlex.join(sys.argv[1:]), "config": args.config,
            "overrides": list(args.overrides), "machine": machine(), "jobs": jobs, "threads": args.threads,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sweep_wall_s": time.time() - started,
            "runs": [s.name for s in specs]}
    path = report.write_report(out, specs, results, meta)
    failed = [name for name, r in results.items() if r.get("status") not in ("ok", "diverged")]
    print(f"report: {path}")
    if failed:
        print(f"{len(failed)} run(s) failed ({', '.join(failed)}): see {out / 'logs'}/; run the command again to "
              f"retry them")
        return 1
    return 0


def add_common_flags(p: argparse.ArgumentParser, default_config: str, default_variants: str, default_loops: str,
                     default_out: str, default_seeds: int = 1) -> None:
    from loopstack.commands import add_set_flag

    p.add_argument("config", nargs="?", default=default_config,
                   help=f"base YAML config shared by every run (default {default_config})")
    p.add_argument("--variants", default=default_variants, help=f"comma-separated (default {default_variants})")
    p.add_argument("--loops", default=default_loops,
                   help=f"training loop counts, comma-separated (default {default_loops})")
    p.add_argument("--seeds", type=int, default=default_seeds,
                   help=f"seeds per (variant, loops) (default {default_seeds})")
    p.add_argument("--out", default=default_out, help=f"sweep directory (default {default_out})")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: cores / --threads)")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads per run (default 1)")
    add_set_flag(p)

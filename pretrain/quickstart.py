"""`make quickstart`: the whole road on a fresh CPU machine in minutes.

1. train a sentencepiece tokenizer on the embedded corpus (this interpreter's standard library),
2. tokenize it into checksummed Arrow shards,
3. train a small Fully Looped Transformer on 2 processes (DP=2, ZeRO-1) with checkpoints,
4. evaluate held-out loss at several loop counts and plot it,
5. print where everything is.
Re-running resumes (a finished run is only re-evaluated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args(argv)

    from data_pipeline.prepare import ensure_dataset
    from loopstack.errors import UserError
    from pretrain.config import load_config
    from pretrain.plots import plot_run

    t0 = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}")
        print(f"[1/4] tokenizer + shards from {cfg.data.sources} -> {cfg.tokenizer.dir}, {cfg.data.out}", flush=True)
        ensure_dataset(cfg.data, cfg.tokenizer)
    except UserError as err:
        print(f"quickstart: error: {err}", file=sys.stderr)
        return 2
    nproc = cfg.launch.procs_per_node
    print(f"[2/4] training {cfg.model.variant} ({cfg.model.loops} loops) on {nproc} processes -> {run_dir}",
          flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "loopstack.cli", "train", args.config, "--run-dir", str(run_dir), "--resume", "auto"]
    for o in args.overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"quickstart: training exited with code {rc}", file=sys.stderr)
        return rc
    print("[3/4] plots", flush=True)
    plots = plot_run(run_dir)
    print("[4/4] summary", flush=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    latest_eval = json.loads((run_dir / "eval" / "latest.json").read_text())
    k = max(1, len(losses) // 10)
    print(f"\n  train loss      {sum(losses[:k]) / k:.3f} (first {k} logs) -> {sum(losses[-k:]) / k:.3f} (last {k})")
    print("  held-out loss   " + "  ".join(f"{n} loops: {v:.3f}" for n, v in latest_eval["loss_vs_loops"].items()))
    print(f"\n  tokenizer       {cfg.tokenizer.dir}/")
    print(f"  shards          {cfg.data.out}/ (manifest.json)")
    print(f"  run             {run_dir}/")
    print(f"  metrics         {run_dir}/metrics.jsonl")
    print(f"  checkpoints     {run_dir}/checkpoints/ (latest: "
          f"{(run_dir / 'checkpoints' / 'latest').read_text().strip()})")
    print(f"  eval            {run_dir}/eval/latest.json")
    for p in plots:
        print(f"  plot            {p}")
    print(f"\n  done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

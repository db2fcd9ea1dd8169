"""Adaptive depth: what a learned exit gate (and token routing) buys in tokens/s and FLOPs per token (CPU).

    python -m benchmarks.bench_adaptive            # writes benchmarks/results/adaptive.json (a few minutes)
    python -m benchmarks.bench_adaptive --quick    # fewer steps and tokens (a smoke run)
    make bench BENCH=adaptive

Each model trains on the smoke corpus with the same config, seed and steps (`configs/smoke-cpu.yaml`, 6 loops), one
`loopstack train` per model: fixed depth, the exit gate (`model.exit_gate`), and each Mixture-of-Recursions router
when the build has them (`model.router`). Recorded per model:
- training: the median tokens/s of the logged steps after the first (warm-up) and the model FLOPs per token the
  trainer counts (`model_flops_per_s / tokens_per_s`), and the final held-out loss at the trained depth;
- generation (`generate_batch`, greedy, the KV cache, 8 prompts from the eval data, batch 1 so that a step whose
  token stopped really skips loops): tokens/s and mean loops per new token, for the gate at several thresholds
  (1.0 = fixed depth) with the held-out loss and mean loops of `loopstack eval --exit-threshold` at each, so
  speed can be read at matched quality; after a warm-up, the fastest of 3 repeats; and the forward FLOPs per new
  token at the mean loops it ran (`pretrain.models.flops`, attention over the mean context).
Step time on a shared 2-core machine is only as good as the load allows; each result records the 1-minute load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke-cpu.yaml"
MODELS = {"fixed": [], "exit_gate": ["model.exit_gate=true"]}
ROUTERS = {"mor_expert_choice": ["model.router=expert_choice"], "mor_token_choice": ["model.router=token_choice"]}
THRESHOLDS = (1.0, 0.9, 0.7, 0.5)


def _has_routers() -> bool:
    from pretrain.models.config import ModelConfig

    return "router" in ModelConfig.__dataclass_fields__


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "loopstack.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"loopstack {' '.join(args[:2])} failed: {out.stderr[-2000:]}")
    return out


def _train(run: Path, flags: list[str], steps: int) -> dict:
    sets = [f"train.steps={steps}", "model.loops=6", "logging.every=1", "logging.diagnostics_every=0",
            f"checkpoint.every={steps}", "eval.loops=[6]", "eval.batches=4", *flags]
    _cli("train", str(SMOKE), "--run-dir", str(run), *[a for s in sets for a in ("--set", s)])
    steps_ = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in steps_ if "tokens_per_s" in r and r.get("tokens_per_s")][1:]
    evals = [r for r in steps_ if "eval/loss@6" in r]
    tok_s = statistics.median(r["tokens_per_s"] for r in logged)
    flops = statistics.median(r["model_flops_per_s"] / r["tokens_per_s"] for r in logged)
    return {"train_tokens_per_s": tok_s, "train_model_flops_per_token": flops, "eval_loss": evals[-1]["eval/loss@6"],
            "final_train_loss": [r["loss"] for r in steps_ if "loss" in r][-1]}


def _generation(run: Path, thresholds: tuple[float, ...] | None, prompts: int, new_tokens: int,
                repeats: int) -> list[dict]:
    import torch

    from pretrain.inference import load_run
    from pretrain.models.generate import generate_batch

    loaded = load_run(run)
    torch.manual_seed(0)
    ids = [loaded.tokenizer.encode(t)[:24] for t in _prompt_texts(prompts)]
    generate_batch(loaded.model, ids[:1], 4)  # warm-up
    rows = []
    for q in thresholds or (None,):
        times = []
        for _ in range(repeats):  # the fastest of the repeats: the least disturbed by other load
            new = loops = 0
            start = time.perf_counter()
            for p in ids:  # batch 1: a decode step skips loops as soon as its one token has stopped
                g = generate_batch(loaded.model, [p], new_tokens, exit_threshold=q)
                new += len(g.tokens[0])
                loops += sum(g.loops_used[0])
            times.append(time.perf_counter() - start)
        mean_loops = loops / max(new, 1)
        rows.append({"threshold": q, "tokens_per_s": new / min(times), "mean_loops": mean_loops,
                     "flops_per_new_token": _decode_flops(loaded, len(ids[0]) + new_tokens // 2, mean_loops),
                     "new_tokens": new, "seconds": times})
    return rows


def _decode_flops(loaded, context: int, loops: float) -> float:
    """Forward FLOPs of one decoded token that runs `loops` loops on average (a fraction: tokens stop at different
    loops) against `context` cached positions (the mean over a generation): prelude + loops x one loop + coda and
    head, from `pretrain.models.flops` (attention over the whole context, not halved as in causal training; the
    gate's and routers' 2 d per loop left out)."""
    from pretrain.models.flops import flops_per_token

    f = flops_per_token(loaded.cfg.model, context, 1, vocab_size=loaded.model.vocab_size, attention="full")
    return f.prelude_forward + loops * f.core_forward + f.head_forward


def _prompt_texts(n: int) -> list[str]:
    import json as _json

    text = (Path(_json.__file__).read_text(encoding="utf-8")).splitlines()
    lines = [line.strip() for line in text if len(line.strip()) > 30]
    return lines[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    steps, prompts, new_tokens, repeats = (12, 2, 8, 1) if args.quick else (60, 8, 32, 3)
    models = dict(MODELS, **(ROUTERS if _has_routers() else {}))
    results: dict = {"steps": steps, "loops": 6, "config": "configs/smoke-cpu.yaml", "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as tmp:
        for name, flags in models.items():
            run = Path(tmp) / name
            print(f"adaptive: training {name} ({steps} steps)", flush=True)
            row = _train(run, flags, steps)
            row["load_1min"] = os.getloadavg()[0]
            gate = name == "exit_gate"
            row["generation"] = _generation(run, THRESHOLDS if gate else None, prompts, new_tokens, repeats)
            if gate:
                _cli("eval", str(run), "--exit-threshold", ",".join(map(str, THRESHOLDS)))
                record = json.loads((run / "eval" / "exit_latest.json").read_text())
                quality = {r["threshold"]: r for r in record["exit"]}
                for g in row["generation"]:
                    g["eval_loss"] = quality[g["threshold"]]["loss"]
                    g["eval_mean_loops"] = quality[g["threshold"]]["mean_loops"]
            results["models"][name] = row
            print(f"adaptive: {name}: {json.dumps(row)}", flush=True)
    write_result("adaptive", results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

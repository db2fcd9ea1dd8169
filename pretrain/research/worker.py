"""One run of a research sweep: `python -m pretrain.research.worker SPEC.json OUT` (started by `sweep.run_one`).

Trains with the real `loopstack train` (a child process: the same code path, exit codes and resume as a user's
run), then evaluates the final checkpoint in this process with the spec kind's `evaluate(spec, run_dir)` and
writes `OUT/results/<name>.json` atomically, last. Train exit codes: 0 -> evaluate, status ok; 3 -> status
diverged (a normal outcome of a stability sweep: recorded with the trainer's one-line reason, no evaluation);
75 (stopped by a signal after a checkpoint) -> no result, the next invocation resumes; anything else -> status
failed with the log's last error line.

A worker outlives a sweep killed with SIGKILL (nothing can pass that on), so it watches its parent
(`watch_parent`): once a second it checks that the sweep that started it (`LOOPSTACK_RESEARCH_PARENT`) is still its
parent, and when not it sends its trainer SIGTERM, which checkpoints and exits 75: no run keeps computing
unattended, and the next invocation resumes it.

Every result holds: the spec, status, reason, wall_s (train + eval, this attempt), the train command, the training
curve and diagnostics read from metrics.jsonl (`training_record`), and the kind's own measurements.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loopstack.fileio import atomic_write_json
from pretrain.research.sweep import EXIT_DIVERGED, EXIT_REQUEUE, ROOT, RunSpec, SweepPaths, last_line


def train_command(spec: RunSpec, run_dir: Path) -> list[str]:
    sets = [a for o in spec.overrides for a in ("--set", o)]
    return [sys.executable, "-m", "loopstack.cli", "train", spec.config, "--run-dir", str(run_dir), *sets]


def watch_parent(parent: int, child: subprocess.Popen, period: float = 1.0) -> threading.Thread:
    """Send `child` SIGTERM once this process's parent is no longer `parent` (it died and we were reparented);
    returns the (daemon) watching thread, which ends when the child does."""
    def watch() -> None:
        while child.poll() is None:
            if os.getppid() != parent:
                child.send_signal(signal.SIGTERM)
                return
            time.sleep(period)

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread


def training_record(run_dir: Path) -> dict:
    """The training curve and diagnostics of metrics.jsonl: per logged step loss, lr, grad_norm; per diagnostics
    step the per-loop state_norm, rel_change and grad_norm (`diag/*`)."""
    from pretrain.metrics import read_metrics

    steps = [r for r in read_metrics(run_dir) if isinstance(r.get("loss"), (int, float))]
    diag = [{"step": r["step"], "state_norm": r["diag/state_norm"], "rel_change": r.get("diag/rel_change", []),
             "grad_norm": r.get("diag/grad_norm", [])} for r in steps if "diag/state_norm" in r]
    return {"step": [r["step"] for r in steps], "loss": [r["loss"] for r in steps],
            "lr": [r.get("lr") for r in steps], "grad_norm": [r.get("grad_norm") for r in steps],
            "diagnostics": diag}


def grad_oscillation(train: dict) -> float | None:
    """Step-to-step variability of the gradient norm: std of log(g_{i+1}) - log(g_i) over consecutive logged steps
    of the constant-lr phase (lr >= 0.999 x its peak: after warmup, before any decay), so neither the warmup's
    growth nor the warmdown's shrinkage counts as oscillation. 0 for a smooth curve; ~0.1 means the norm moves by
    ~10% per step. None when fewer than 3 such steps were logged (log every step for this: logging.every=1)."""
    lrs = [x for x in train["lr"] if x is not None]
    if not lrs:
        return None
    peak = max(lrs)
    logs = [math.log(g) for lr, g in zip(train["lr"], train["grad_norm"], strict=True)
            if lr is not None and lr >= 0.999 * peak and g is not None and g > 0 and math.isfinite(g)]
    diffs = [b - a for a, b in zip(logs, logs[1:], strict=False)]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))


def main(argv: list[str]) -> int:
    spec_path, out = Path(argv[0]), Path(argv[1])
    spec = RunSpec(**json.loads(spec_path.read_text()))
    paths = SweepPaths(out)
    run_dir = paths.run_dir(spec)
    threads = int(os.environ.get("LOOPSTACK_RESEARCH_THREADS", "1"))
    started = time.perf_counter()
    cmd = train_command(spec, run_dir)
    print(f"train: {' '.join(cmd)}", flush=True)
    parent = int(os.environ.get("LOOPSTACK_RESEARCH_PARENT", os.getppid()))
    if os.getppid() != parent:  # the sweep died before this worker started: leave the run for the next invocation
        print("train: the sweep that started this run is gone; the next invocation runs it", flush=True)
        return EXIT_REQUEUE
    child = subprocess.Popen(cmd, cwd=os.getcwd(), env=dict(os.environ), stdout=sys.stdout, stderr=sys.stderr)
    # the sweep stops a worker with SIGTERM: pass it on, so the trainer checkpoints and exits 75 (resumed next time);
    # a sweep killed outright (SIGKILL) is noticed by the parent watch, which does the same
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    watch_parent(parent, child)
    code = child.wait()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    result: dict = {"spec": spec.identity(), "status": "ok", "reason": "", "train_exit": code,
                    "train_command": cmd, "threads": threads}
    if code == EXIT_REQUEUE:
        print("train: stopped by a signal after a checkpoint; the next invocation resumes", flush=True)
        return code
    if code == EXIT_DIVERGED:
        result.update(status="diverged", reason=last_line(paths.log(spec), "diverged"))
    elif code != 0:
        result.update(status="failed", reason=f"train exit {code}: {last_line(paths.log(spec))}")
    train = training_record(run_dir)
    result["train"] = train
    result["grad_oscillation"] = grad_oscillation(train)
    result["final_train_loss"] = train["loss"][-1] if train["loss"] else None
    if result["status"] == "ok":
        import torch

        torch.set_num_threads(threads)
        if spec.kind == "stability":
            from pretrain.research.stability import evaluate
        else:
            from pretrain.research.extrapolate import evaluate
        try:
            result.update(evaluate(spec, run_dir))
        except Exception as err:  # noqa: BLE001 - recorded as this run's failure, the sweep goes on
            result.update(status="failed", reason=f"evaluation: {type(err).__name__}: {err}")
            print(f"evaluation failed: {err!r}", flush=True)
    result["wall_s"] = time.perf_counter() - started
    atomic_write_json(paths.result(spec), result)
    print(f"result: {paths.result(spec)} ({result['status']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))

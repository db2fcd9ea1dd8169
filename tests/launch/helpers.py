"""Helpers for the launcher tests: the CLI, the real SLURM cluster, waiting on a run's files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "configs/smoke-cpu.yaml"


def cli_env() -> dict[str, str]:
    """The environment of every command a test starts (and, through sbatch, of its jobs): one OpenMP thread
    per process, so runs that are compared give bit-identical losses and a busy machine does not make
    OpenMP threads spin against each other."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def loopstack(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the CLI the way a user does, from the repository root (configs' data paths are relative to it)."""
    proc = subprocess.run([sys.executable, "-m", "loopstack.cli", *args], cwd=kw.pop("cwd", ROOT),
                          capture_output=True, text=True, timeout=timeout, env=kw.pop("env", cli_env()), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"loopstack {' '.join(args)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def slurm_problem() -> str | None:
    """Why SLURM cannot run a job here, or None when it can."""
    for tool in ("sbatch", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "is UP" not in ping.stdout:
        return f"slurmctld does not answer (`scontrol ping`: {' '.join((ping.stdout + ping.stderr).split()[:4])})"
    info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(s.startswith(("idle", "mixed", "allocated", "completing")) for s in info):
        return f"no usable node (sinfo states: {info or 'none'})"
    return None


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3, on_timeout=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    detail = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail}")


def events(run_dir: Path) -> list[dict]:
    from launch.journal import read_events

    return read_events(run_dir)


def event_names(run_dir: Path) -> list[str]:
    return [e["event"] for e in events(run_dir)]


def metrics(run_dir: Path) -> list[dict]:
    from pretrain.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if "step" in r and "loss" in r]


def last_step(run_dir: Path) -> int:
    m = metrics(run_dir)
    return m[-1]["step"] if m else 0


def job_report(run_dir: Path) -> str:
    """Everything useful when a SLURM test fails: journal, batch and trainer logs, squeue."""
    parts = [f"--- journal\n{json.dumps(events(run_dir), indent=1)}"]
    logs = Path(run_dir) / "launch" / "logs"
    for log in sorted(logs.glob("*")) if logs.is_dir() else []:
        text = log.read_text(errors="replace")
        parts.append(f"--- {log.name} (last 3000 chars)\n{text[-3000:]}")
    parts.append("--- squeue\n" + subprocess.run(["squeue", "-t", "all"], capture_output=True, text=True).stdout)
    return "\n".join(parts)


def scancel_signal(job_id: str, sig: str = "USR1") -> None:
    """What SLURM does before a time limit or a preemption: the signal to the batch shell only."""
    subprocess.run(["scancel", f"--signal={sig}", "--batch", job_id], check=True)


def port() -> int:
    return free_port()

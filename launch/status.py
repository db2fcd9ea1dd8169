"""`loopstack launch status RUN_DIR`: where a launched run stands, from its files (and squeue if present).

Sources: the journal (<run>/launch/events.jsonl: submissions, starts, signals, exits, requeues),
metrics.jsonl (last logged step and loss), checkpoints/latest (newest complete checkpoint), and, when
SLURM answers, the live state of the run's jobs. Works for training runs and for data-prep runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from launch import journal, sbatch
from loopstack.errors import UserError

# journal event -> state of the run after it (training: launch/templates/train.sbatch)
STATE_AFTER = {
    "submit": "PENDING",
    "start": "RUNNING",
    "signal": "STOPPING",  # a signal was forwarded; the trainer is checkpointing
    "exit": "STOPPING",
    "requeue": "REQUEUED",  # waiting for SLURM to restart the same job id
    "chain_next": "WAITING",  # waiting for the next job of the --chain
    "finished": "COMPLETED",
    "failed": "FAILED",
    "diverged": "DIVERGED",  # trainer exit 3: the loss diverged; never requeued (change the config first)
    "no_space": "NO_SPACE",  # trainer exit 74: disk full while checkpointing; never requeued (free space first)
    "restart_limit": "STOPPED",
    "requeue_failed": "STOPPED",
    "stopped": "CANCELLED",
    # data preparation (launch/templates/prepare.sbatch, merge.sbatch)
    "task_start": "RUNNING",
    "task_done": "RUNNING",
    "task_failed": "FAILED",
    "merge_start": "MERGING",
    "merged": "COMPLETED",
    "merge_failed": "FAILED",
}
ACTIVE = {"PENDING", "RUNNING", "STOPPING", "REQUEUED", "WAITING", "MERGING"}
SLURM_DEAD = {"CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def submitted_jobs(run_dir: Path) -> list[str]:
    ids: list[str] = []
    for e in journal.read_events(run_dir):
        if e["event"] == "submit":
            ids += [str(j) for j in e.get("job_ids", [])]
    return ids


def _last_metrics(run_dir: Path) -> dict | None:
    """The last complete JSON line of metrics.jsonl that has a step (read from the end: files grow large)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            return record
    return None


def _latest_checkpoint(run_dir: Path) -> str | None:
    try:
        name = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    return name or None


def status(run_dir: str | Path, live: bool = True) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    events = journal.read_events(run_dir)
    if not events and not (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir}: not a launched run (no launch/events.jsonl and no metrics.jsonl)")
    submits = [i for i, e in enumerate(events) if e["event"] == "submit"]
    current = events[submits[-1]:] if submits else events
    kind = current[0].get("mode", "requeue") if current and current[0]["event"] == "submit" else "unknown"
    state = STATE_AFTER.get(current[-1]["event"], "UNKNOWN") if current else "UNKNOWN"
    if current and current[-1]["event"] == "exit" and current[-1].get("rc") == 0:
        state = "COMPLETED"
    job_ids = submitted_jobs(run_dir)
    latest_jobs = [str(j) for j in current[0].get("job_ids", [])] if kind != "unknown" else []
    starts = [e for e in current if e["event"] == "start"]
    out: dict = {
        "run_dir": str(run_dir),
        "mode": kind,
        "state": state,
        "job_ids": job_ids,
        "restarts": max(0, len(starts) - 1),
        "starts": [{"job_id": e.get("job_id"), "restart": e.get("restart"), "time": e.get("time"),
                    "checkpoint": e.get("checkpoint"), "log": e.get("log")} for e in starts],
        "last_step": None, "last_loss": None, "last_checkpoint": _latest_checkpoint(run_dir),
        "slurm": {},
    }
    metrics = _last_metrics(run_dir)
    if metrics:
        out["last_step"], out["last_loss"] = metrics.get("step"), metrics.get("loss")
    if kind == "data":
        sub = current[0]
        done = {e.get("task") for e in events if e["event"] == "task_done"}
        out["slices"] = sub.get("tasks")
        out["slices_done"] = sorted(t for t in done if t is not None)
    if live and job_ids:
        out["slurm"] = sbatch.job_states(job_ids)
        latest = {j: s for j, s in out["slurm"].items() if j.split("_")[0] in {x.split("_")[0] for x in latest_jobs}}
        if state in ACTIVE and latest and all(s in SLURM_DEAD for s in latest.values()):
            out["state"] = "LOST"  # SLURM ended the job without its script recording why (e.g. SIGKILL)
    return out


def format_status(info: dict) -> str:
    rows = [("run", info["run_dir"]), ("state", info["state"])]
    if info["mode"] == "data":
        rows.append(("slices done", f"{len(info['slices_done'])} of {info['slices']}"))
    else:
        rows.append(("mode", info["mode"]))
        step = info["last_step"]
        loss = info["last_loss"]
        rows.append(("last step", "-" if step is None else f"{step}" + (f" (loss {loss:.4f})"
                                                                          if isinstance(loss, float) else "")))
        ckpt = info["last_checkpoint"]
        rows.append(("last checkpoint", f"checkpoints/{ckpt}" if ckpt else "-"))
        rows.append(("restarts", str(info["restarts"])))
    jobs = []
    for j in info["job_ids"]:
        tasks = sorted((t for t in info["slurm"] if t.startswith(f"{j}_")), key=lambda t: t.split("_")[1])
        if tasks:  # a job array: squeue knows its tasks as <id>_<index>
            jobs += [f"{t} ({info['slurm'][t]})" for t in tasks]
        else:
            jobs.append(f"{j} ({info['slurm'][j]})" if j in info["slurm"] else j)
    rows.append(("jobs", ", ".join(jobs) or "-"))
    if info["starts"] and info["starts"][-1].get("log"):
        rows.append(("log", info["starts"][-1]["log"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

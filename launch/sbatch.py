"""The few SLURM client calls the launchers make: sbatch, squeue, scancel."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from loopstack.errors import UserError

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UserError(f"`{tool}` not found: run this on a SLURM login node (scripts/slurm-up.sh starts a "
                        f"single-node test cluster), or use --dry-run to only render the script")
    return path


def submit(script: Path, extra: list[str] = ()) -> str:
    """`sbatch [extra] script` -> the job id (for an array: the array's job id)."""
    cmd = [_need("sbatch"), "--parsable", *extra, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = " ".join(proc.stderr.split()) or f"exit {proc.returncode}"
        raise UserError(f"sbatch {script} failed: {reason}")
    job_id = proc.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
    if not job_id.split("_")[0].isdigit():
        raise UserError(f"sbatch {script}: unexpected answer {proc.stdout.strip()!r}")
    return job_id


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Live state of each job SLURM still knows about (finished jobs drop out after MinJobAge).

    Array tasks are listed as `<array id>_<index>`. Returns {} when squeue is missing or fails.
    """
    if not job_ids or shutil.which("squeue") is None:
        return {}
    states: dict[str, str] = {}
    for job_id in job_ids:  # one call per id: squeue rejects the whole list if one id is unknown
        cmd = ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            continue
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
    return states


def release(job_id: str) -> None:
    """Let a job submitted with --hold start (the launcher holds it until its journal entry is written)."""
    proc = subprocess.run([_need("scontrol"), "release", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = " ".join(proc.stderr.split()) or f"exit {proc.returncode}"
        raise UserError(f"scontrol release {job_id} failed: {reason} (the job stays held: `scontrol release "
                        f"{job_id}` starts it, `scancel {job_id}` drops it)")


def cancel(job_ids: list[str]) -> None:
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], capture_output=True)

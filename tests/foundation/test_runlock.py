"""The run directory lock (loopstack.runlock): a live holder refuses a second trainer in one line, a dead one
(this host, the same SLURM job, a job SLURM no longer runs, or a silent heartbeat) is taken over. Real files,
real processes holding real flocks; the trainer's own use is tested end to end in tests/trainer/test_reliability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from loopstack import runlock
from loopstack.errors import UserError
from loopstack.fileio import atomic_write, remove_stale_temps
from loopstack.runlock import LOCK, RunLock


def _plant(run_dir, age_s: float = 0.0, **rec) -> None:
    """A lock file as another trainer would have left it, its heartbeat `age_s` seconds old."""
    record = {"host": "node-17", "pid": 4242, "pid_start": "1", "slurm_job": None, "slurm_restart": "0",
              "started": time.time() - age_s, **rec}
    path = run_dir / LOCK
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_acquire_release_and_refusal_of_a_live_holder(tmp_path):
    lock = RunLock.acquire(tmp_path, heartbeat_s=0.05)
    rec = json.loads((tmp_path / LOCK).read_text())
    assert rec["pid"] == os.getpid() and rec["host"]
    old = (tmp_path / LOCK).stat().st_mtime_ns
    time.sleep(0.3)
    assert (tmp_path / LOCK).stat().st_mtime_ns > old  # the heartbeat touches it
    # another process on this host: our flock (and our pid) says we are alive
    code = ("import sys; from loopstack.runlock import RunLock; from loopstack.errors import UserError\n"
            "try:\n    RunLock.acquire(sys.argv[1])\nexcept UserError as e:\n    print(e); sys.exit(2)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    line = out.stdout.strip()
    assert "\n" not in line and f"is in use by pid {os.getpid()} on" in line and f"delete {tmp_path / LOCK}" in line
    lock.release()
    assert not (tmp_path / LOCK).exists()
    RunLock.acquire(tmp_path).release()


def test_dead_process_on_this_host_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", f"from loopstack.runlock import RunLock; "
                           f"RunLock.acquire({str(tmp_path)!r})"], capture_output=True)  # exits holding it
    assert proc.returncode == 0 and (tmp_path / LOCK).exists()
    said = []
    RunLock.acquire(tmp_path, say=said.append).release()
    assert len(said) == 1 and "no process" in said[0], said


def test_other_host_fresh_heartbeat_refused_old_heartbeat_taken_over(tmp_path):
    _plant(tmp_path, age_s=5)
    with pytest.raises(UserError, match=r"in use by pid 4242 on node-17.*heartbeat 5 s ago"):
        RunLock.acquire(tmp_path)
    _plant(tmp_path, age_s=runlock.STALE_AFTER_S + 60)
    said = []
    RunLock.acquire(tmp_path, say=said.append).release()
    assert "no heartbeat for" in said[0]


def test_same_slurm_job_is_a_requeue(tmp_path, monkeypatch):
    _plant(tmp_path, age_s=1, slurm_job="991", slurm_restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "992")
    monkeypatch.setattr(runlock, "_slurm_job_active", lambda job: None)  # no squeue on this box
    with pytest.raises(UserError, match=r"SLURM job 991, restart 0"):
        RunLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    said = []
    RunLock.acquire(tmp_path, say=said.append).release()
    assert "restart of SLURM job 991" in said[0]


def test_stale_temporary_files_are_removed(tmp_path):
    atomic_write(tmp_path / "latest", "4\n")
    (tmp_path / ".latest.tmp1234").write_text("3")  # what a kill during atomic_write leaves
    (tmp_path / ".keep.tmpx").write_text("not ours")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".latest.tmp1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.tmpx", "latest"]

"""One training job per run directory: an exclusive lock held for the job's lifetime.

    lock = RunLock.acquire(run_dir)      # global rank 0 only; the other ranks learn the outcome from it
    ...                                  # train
    lock.release()                       # also on errors; a SIGKILL leaves the file behind (see below)

`<run>/LOCK` is created with O_EXCL and holds a JSON record of its holder: host, pid, SLURM job id and restart,
start time. The holder keeps an `flock` on it and touches its mtime every `HEARTBEAT_S` seconds. A second
trainer finds the file and asks whether its holder is alive:

- the flock is held by someone (same host, or a filesystem that shares flocks between nodes): alive;
- same host, and no process with that pid (or it is another process that reused the pid): dead;
- the same SLURM job id as ours: dead (SLURM runs one incarnation of a job at a time, this is its requeue);
- a SLURM job that `squeue` no longer lists as active: dead;
- otherwise the heartbeat decides: a file not touched for `STALE_AFTER_S` seconds was left by a dead job.

A dead holder's lock is taken over with a message naming it; a live one refuses the new trainer in one line
naming the holder, the lock file and how to clear it. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loopstack.errors import UserError

LOCK = "LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats; generous for clock skew between nodes on a shared filesystem
# States in which a job's trainer may still write. COMPLETING is left out: its processes have been killed, and
# the next job of a --chain (afterany) may start while the controller still lists the previous one so.
SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                "SUSPENDED", "STOPPED", "SIGNALING"}


def _proc_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot, from /proc), None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"  # alive, start time unknown (no /proc)
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "started": time.time()}


def describe(rec: dict) -> str:
    who = f"pid {rec.get('pid')} on {rec.get('host')}"
    if rec.get("slurm_job"):
        who += f" (SLURM job {rec['slurm_job']}, restart {rec.get('slurm_restart', '0')})"
    if isinstance(rec.get("started"), (int, float)):
        who += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rec['started']))}"
    return who


def _slurm_job_active(job: str) -> bool | None:
    """Whether SLURM still lists a job as active; None when squeue is missing or does not answer."""
    if shutil.which("squeue") is None:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:  # "Invalid job id specified": gone from the controller's memory
        return False if "invalid job id" in proc.stderr.lower() else None
    return any(state.strip() in SLURM_ACTIVE for state in proc.stdout.splitlines())


def why_dead(rec: dict, heartbeat_age: float, flock_free: bool) -> str | None:
    """Why the holder described by `rec` is certainly gone, or None when it may be alive."""
    if not flock_free:
        return None
    here = socket.gethostname()
    if rec.get("host") == here and isinstance(rec.get("pid"), int):
        start = _proc_start(rec["pid"])
        if start is None:
            return f"no process {rec['pid']} on {here}"
        if rec.get("pid_start") and start not in ("?", rec["pid_start"]):
            return f"pid {rec['pid']} on {here} is now another process"
        return None  # that very process is alive
    job = rec.get("slurm_job")
    if job and job == os.environ.get("SLURM_JOB_ID"):
        return f"this is a restart of SLURM job {job}"
    if job:
        active = _slurm_job_active(job)
        if active is False:
            return f"SLURM job {job} is no longer active"
        if active:
            return None
    if heartbeat_age > STALE_AFTER_S:
        return f"no heartbeat for {heartbeat_age:.0f} s"
    return None


@dataclass
class RunLock:
    path: Path
    fd: int
    record: dict
    _stop: threading.Event
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, *, say: Callable[[str], None] = print,
                heartbeat_s: float = HEARTBEAT_S) -> RunLock:
        """Take the lock of `run_dir` or raise a one-line UserError naming its live holder."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        for _ in range(20):  # a few rounds of create / inspect, in case another trainer races us
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                if cls._take_over_if_dead(path, say):
                    continue
                time.sleep(0.2)
                continue
            _try_flock(fd)
            record = _holder()
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
            lock = cls(path, fd, record, threading.Event())
            lock._start_heartbeat(heartbeat_s)
            return lock
        raise UserError(f"{path}: could not take the run lock (another trainer keeps re-creating it)")

    @staticmethod
    def _take_over_if_dead(path: Path, say: Callable[[str], None]) -> bool:
        """Remove the lock at `path` when its holder is dead (True), raise when it is alive."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return True  # released meanwhile: try to create it again
        try:
            st = os.fstat(fd)
            text = os.read(fd, 1 << 16).decode(errors="replace")
            try:
                rec = json.loads(text)
            except ValueError:
                rec = None
            age = time.time() - st.st_mtime
            if rec is None and age < 30:  # being written right now by its creator: look again shortly
                return False
            flock_free = _try_flock(fd)
            if rec is None:
                rec, reason = {}, ("unreadable lock file, untouched for a while" if flock_free else None)
            else:
                reason = why_dead(rec, age, flock_free)
            if reason is None:
                raise UserError(
                    f"{path.parent} is in use by {describe(rec)} (heartbeat {age:.0f} s ago): another trainer is "
                    f"running in this run directory; wait for it or stop it, or use another --run-dir; if that job "
                    f"is dead, delete {path}")
            try:
                if os.stat(path).st_ino != st.st_ino:
                    return True  # someone else replaced it meanwhile: look again
            except FileNotFoundError:
                return True
            say(f"run lock: taking over {path} from {describe(rec)}: {reason}")
            os.unlink(path)
            return True
        finally:
            os.close(fd)

    def _start_heartbeat(self, every: float) -> None:
        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    os.utime(self.fd)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)


def _try_flock(fd: int) -> bool:
    """Take an exclusive flock without waiting: False when another process holds one (it is alive), True when
    taken, or when this filesystem does not support flock (then the other rules decide)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True

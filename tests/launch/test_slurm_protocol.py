"""The requeue protocol's other exits, on the real SLURM cluster, with a stand-in trainer (seconds each).

The stand-in is a few lines of Python that honour the trainer's signal contract; what is under test is the
rendered job script: failures are not requeued, `scancel` stops for good, max_restarts is respected.
The real `loopstack train` goes through the same script in test_slurm_train.py.
"""

import subprocess
import textwrap

import pytest

from launch.slurm import TrainJob
from loopstack.errors import UserError
from pretrain.config import load_config
from tests.launch.helpers import ROOT, SMOKE, event_names, events, job_report, loopstack, port, scancel_signal, wait_for

STAND_IN = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    stop = []
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda n, f: stop.append(n))
    Path(sys.argv[1]).touch()              # handlers are in place
    while not stop:
        time.sleep(0.05)
    Path(sys.argv[1] + ".got").write_text(str(stop[0]))
    sys.exit(75)                           # "checkpoint written, requeue me"
""")


def submit(tmp_path, command: str, *overrides: str) -> tuple[str, object]:
    cfg = load_config(SMOKE, [f"launch.port={port()}", "launch.time=00:05:00", "launch.signal_grace_s=30",
                              *overrides])
    job = TrainJob(cfg=cfg, run_dir=tmp_path / "run", workdir=ROOT, train_command=command)
    (job_id,) = job.submit()
    return job_id, job.run_dir


def stand_in(tmp_path) -> tuple[str, object]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return f"python {script} {tmp_path / 'ready'}", tmp_path / "ready"


def slurm_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout


def test_failing_trainer_is_not_requeued(slurm, tmp_path):
    # a loopstack command that fails with a user error (exit 2), run through the same exit-code recorder
    job_id, run = submit(tmp_path, 'python -m launch.exitcode "$EXIT_FILE" config validate /nonexistent.yaml')
    wait_for(lambda: "failed" in event_names(run), 60, "the job to record the failure",
             on_timeout=lambda: job_report(run))
    names = event_names(run)
    assert names == ["submit", "start", "exit", "failed"], job_report(run)
    exit_event = events(run)[2]
    assert exit_event["rc"] == 1 and exit_event["trainer_rc"] == "2"  # torchrun says 1; rank 0 really said 2
    wait_for(lambda: "JobState=FAILED" in slurm_job(job_id), 30, "SLURM to mark the job FAILED",
             on_timeout=lambda: slurm_job(job_id))
    assert "Restarts=0" in slurm_job(job_id)


def test_scancel_stops_for_good(slurm, tmp_path):
    """A TERM from `scancel JOB` must not requeue: `scontrol requeue` would bring a cancelled job back."""
    command, ready = stand_in(tmp_path)
    job_id, run = submit(tmp_path, command)
    wait_for(ready.exists, 60, "the stand-in trainer to start", on_timeout=lambda: job_report(run))
    with pytest.raises(UserError, match=f"already has active job\\(s\\) {job_id} \\(RUNNING\\)"):
        submit(tmp_path, command)  # a second job training into the same run directory is refused
    subprocess.run(["scancel", job_id], check=True)
    wait_for(lambda: "stopped" in event_names(run), 60, "the job to record the stop",
             on_timeout=lambda: job_report(run))
    assert "requeue" not in event_names(run), job_report(run)
    assert any(e["event"] == "signal" and e["signal"] == "TERM" for e in events(run))
    info = slurm_job(job_id)
    assert "JobState=CANCELLED" in info or "JobState=COMPLETING" in info, info
    assert "Restarts=0" in info, info


def test_term_to_batch_shell_reaches_trainer_and_restart_limit_holds(slurm, tmp_path):
    """A preemption's TERM to the batch shell is passed on as USR1 (srun would answer a TERM by killing the
    step, so the trainer could not checkpoint); with launch.max_restarts=0 the job then stops."""
    command, ready = stand_in(tmp_path)
    job_id, run = submit(tmp_path, command, "launch.max_restarts=0")
    wait_for(ready.exists, 60, "the stand-in trainer to start", on_timeout=lambda: job_report(run))
    scancel_signal(job_id, "TERM")
    wait_for(lambda: "restart_limit" in event_names(run), 60, "the job to hit its restart limit",
             on_timeout=lambda: job_report(run))
    assert (tmp_path / "ready.got").read_text() == "10", job_report(run)  # the trainer got USR1, was not killed
    assert "requeue" not in event_names(run) and "Restarts=0" in slurm_job(job_id)


def test_sbatch_refusal_is_a_one_line_user_error(slurm, tmp_path):
    proc = loopstack("launch", "slurm", SMOKE, "--partition", "no-such-partition", "--run-dir", str(tmp_path / "r"),
                     check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sbatch" in lines[0] and "invalid partition" in lines[0].lower(), proc.stderr

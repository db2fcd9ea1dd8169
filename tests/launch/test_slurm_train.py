"""The real trainer under the real SLURM: preempted -> checkpoint -> requeue -> resume -> the same final loss.

`loopstack train configs/smoke-cpu.yaml` is submitted with `loopstack launch slurm` (CPU, one process),
interrupted with `scancel --signal=USR1 [--batch] JOB`, and must restart as the same job, resume from the
checkpoint it wrote, and end with exactly the loss of an uninterrupted run. `--chain` the same way.
"""

import json
import subprocess
import sys

import pytest

from tests.launch.helpers import (
    ROOT,
    SMOKE,
    cli_env,
    event_names,
    events,
    job_report,
    last_step,
    loopstack,
    metrics,
    port,
    scancel_signal,
    wait_for,
)

STEPS = 200  # ~25 ms a step here: long enough to land a signal mid-run, short enough for CI
TRAIN_SET = ["--set", f"train.steps={STEPS}", "--set", "checkpoint.every=10"]
SIGNAL_AFTER_STEP = 15


@pytest.fixture(scope="module")
def reference(smoke_data, tmp_path_factory):
    """The uninterrupted run, started at once in the background (it overlaps the SLURM jobs' waits)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.Popen(
        [*_cli(), "train", SMOKE, "--run-dir", str(run), *TRAIN_SET], cwd=ROOT, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    done: list[dict] = []

    def final() -> dict:
        if not done:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-3000:]
            m = metrics(run)
            assert m and m[-1]["step"] == STEPS, out[-3000:]
            done.append(m[-1])
        return done[0]

    yield final
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _cli() -> list[str]:
    return [sys.executable, "-m", "loopstack.cli"]


def _submit(run, *extra: str) -> list[str]:
    loopstack("launch", "slurm", SMOKE, "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00",
              "--run-dir", str(run), *TRAIN_SET, "--set", f"launch.port={port()}", "--set", "launch.signal_grace_s=60",
              *extra)
    return events(run)[0]["job_ids"]


def _signal_mid_run(run, job_id: str) -> None:
    wait_for(lambda: last_step(run) >= SIGNAL_AFTER_STEP, 180, f"training to pass step {SIGNAL_AFTER_STEP}",
             interval=0.1, on_timeout=lambda: job_report(run))
    scancel_signal(job_id, "USR1")


def _assert_resumed_exactly(run, reference_final: dict, stopped_at: str) -> None:
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl must hold every step once after the resume"
    assert SIGNAL_AFTER_STEP <= int(stopped_at) < STEPS, f"stopped at {stopped_at}: the signal did not land mid-run"
    final = metrics(run)[-1]
    assert final["loss"] == pytest.approx(reference_final["loss"], abs=1e-6), (final["loss"], reference_final["loss"])


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, smoke_data, reference, tmp_path):
    """Two interruptions: USR1 to the batch shell (time limit, `--signal=B:USR1@grace`), then USR1 to the job's
    steps only (a preemption that bypasses the batch shell): both checkpoint, requeue and resume."""
    run = tmp_path / "run"
    (job_id,) = _submit(run)
    _signal_mid_run(run, job_id)
    wait_for(lambda: event_names(run).count("start") == 2, 120, "the requeued job to start again",
             interval=0.5, on_timeout=lambda: job_report(run))
    resumed_at = int(events(run)[-1]["checkpoint"])
    wait_for(lambda: last_step(run) >= resumed_at + 10, 120, "the restarted job to train", interval=0.1,
             on_timeout=lambda: job_report(run))
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # the steps, not the batch shell
    wait_for(lambda: event_names(run)[-1] in ("finished", "failed", "restart_limit", "stopped", "requeue_failed"),
             240, "the job to checkpoint, requeue, resume and finish", interval=0.5, on_timeout=lambda: job_report(run))
    names = event_names(run)
    assert names == ["submit", "start", "signal", "exit", "requeue", "start", "exit", "requeue", "start", "exit",
                     "finished"], job_report(run)
    ev = events(run)
    first_stop, first_restart, second_stop, second_restart = ev[3], ev[5], ev[6], ev[8]
    # 1: the batch shell got USR1 and forwarded it; rank 0 exited 75 (torchrun itself reports 1)
    assert first_stop["signal"] == "USR1" and first_stop["trainer_rc"] == "75" and first_stop["rc"] != 0
    # 2: the batch shell saw no signal; rank 0's recorded 75 is what asked for the requeue
    assert second_stop["signal"] == "" and second_stop["trainer_rc"] == "75", job_report(run)
    for stop, restart, count in ((first_stop, first_restart, 1), (second_stop, second_restart, 2)):
        assert restart["job_id"] == job_id and restart["restart"] == count  # same job id, SLURM_RESTART_COUNT
        assert restart["checkpoint"] == stop["checkpoint"]  # starts from the checkpoint the stop wrote
        stop_log = (run / "launch" / "logs" / f"train-{job_id}.{count - 1}.log").read_text()
        restart_log = (run / "launch" / "logs" / f"train-{job_id}.{count}.log").read_text()
        assert f"stopped by signal 10 at step {stop['checkpoint']}" in stop_log, stop_log[-2000:]
        ckpt = run / "checkpoints" / stop["checkpoint"]
        assert f"resumed from {ckpt} at step {stop['checkpoint']}" in restart_log, restart_log[-2000:]
    assert int(first_stop["checkpoint"]) < int(second_stop["checkpoint"])
    _assert_resumed_exactly(run, reference(), second_stop["checkpoint"])
    batch_log = (run / "launch" / "logs" / f"slurm-{job_id}.out").read_text()
    assert batch_log.count("requeueing job") == 2 and "training finished" in batch_log  # one log, appended
    status = json.loads(loopstack("launch", "status", str(run), "--json").stdout)
    assert status["state"] == "COMPLETED" and status["restarts"] == 2 and status["job_ids"] == [job_id]
    assert status["last_step"] == STEPS and status["last_checkpoint"] == str(STEPS)


def test_chain_resumes_in_the_next_job(slurm, smoke_data, reference, tmp_path):
    """--chain 3 for clusters without requeue: job 1 is signalled, job 2 resumes and finishes, job 3 is cancelled."""
    run = tmp_path / "run"
    job_ids = _submit(run, "--chain", "3")
    assert len(job_ids) == 3
    assert (run / "launch" / "chain").read_text().split() == job_ids
    _signal_mid_run(run, job_ids[0])
    wait_for(lambda: event_names(run)[-1] in ("finished", "failed", "stopped"), 240,
             "the chain to finish", interval=0.5, on_timeout=lambda: job_report(run))
    names = event_names(run)
    assert names == ["submit", "start", "signal", "exit", "chain_next", "start", "exit", "finished"], job_report(run)
    ev = events(run)
    assert ev[5]["job_id"] == job_ids[1] and ev[5]["checkpoint"] == ev[3]["checkpoint"]
    _assert_resumed_exactly(run, reference(), ev[3]["checkpoint"])
    wait_for(lambda: "JobState=CANCELLED" in subprocess.run(["scontrol", "show", "job", "-o", job_ids[2]],
                                                            capture_output=True, text=True).stdout,
             30, "the unused third job to be cancelled", on_timeout=lambda: job_report(run))
    status = json.loads(loopstack("launch", "status", str(run), "--json").stdout)
    assert status["state"] == "COMPLETED" and status["mode"] == "chain" and status["restarts"] == 1

"""Faults a demanding user runs into, each through real `loopstack train` / `loopstack eval` processes:
two trainers on one run directory, a refused resume, a diverging run, leftovers of a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loopstack.errors import EXIT_DIVERGED
from tests.trainer.conftest import ROOT, losses, records, run_train, train_cmd

QUICK = ["logging.every=1", "eval.batches=1", "eval.loops=[1]"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    errors = [line for line in out.stderr.splitlines() if line.startswith("loopstack: error:")]
    assert len(errors) >= 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return errors[0]


def _eval(run: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "loopstack.cli", "eval", str(run), *args], capture_output=True,
                         text=True, cwd=ROOT, env=_env(), timeout=300)
    assert out.returncode == expect, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_second_trainer_is_refused_and_a_dead_holder_is_taken_over(smoke_data, tmp_path):
    run = tmp_path / "held"
    flags = smoke_data + QUICK + ["train.steps=400", "checkpoint.every=3"]
    first = subprocess.Popen(train_cmd(2, run, flags), cwd=ROOT, env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list((run / "checkpoints").glob("*/COMPLETE")):
            assert first.poll() is None and time.time() < deadline, "the first trainer did not checkpoint"
            time.sleep(0.2)
        holder = json.loads((run / "LOCK").read_text())
        config_before = (run / "config.yaml").read_bytes()
        second = run_train(1, run, flags, expect=2, timeout=240)
        line = _one_line_error(second)
        assert f"is in use by pid {holder['pid']} on {holder['host']}" in line, line
        assert f"delete {run / 'LOCK'}" in line
        assert (run / "config.yaml").read_bytes() == config_before  # the refused trainer wrote nothing
        assert first.poll() is None  # and did not disturb the first one
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the lock stays behind
        first.wait()
    assert (run / "LOCK").exists()
    done = max(int(p.parent.name) for p in (run / "checkpoints").glob("*/COMPLETE"))
    third = run_train(1, run, smoke_data + QUICK + [f"train.steps={done + 2}", "checkpoint.every=3"])
    assert f"taking over {run / 'LOCK'} from pid {holder['pid']}" in third.stdout, third.stdout[-2000:]
    assert f"resumed from {run}/checkpoints/{done}" in third.stdout
    assert not (run / "LOCK").exists()  # released at the end


def test_refused_resume_and_eval_leave_the_run_record_alone(smoke_data, tmp_path):
    run = tmp_path / "record"
    run_train(1, run, smoke_data + QUICK + ["train.steps=2", "checkpoint.every=2"])
    config = (run / "config.yaml").read_bytes()
    metrics = (run / "metrics.jsonl").read_bytes()
    refused = run_train(1, run, smoke_data + QUICK + ["train.steps=4", "model.d_model=128"], expect=2)
    line = _one_line_error(refused)
    assert "model.d_model: 64 -> 128" in line and "checkpoints/2" in line, line
    assert (run / "config.yaml").read_bytes() == config and (run / "metrics.jsonl").read_bytes() == metrics
    # eval with overrides reads the run, it does not rewrite it; a plain eval afterwards still works
    _eval(run, "--set", "eval.batches=2", "--loops", "1,2")
    assert (run / "config.yaml").read_bytes() == config
    _eval(run)
    assert not (run / "wandb").exists()


def test_diverged_run_exits_3_naming_the_last_good_checkpoint(smoke_data, tmp_path):
    run = tmp_path / "diverge"
    run_train(1, run, smoke_data + QUICK + ["train.steps=4", "checkpoint.every=4"])
    # the same run resumed with a learning rate far too high: the loss climbs far above ln(vocab)
    out = run_train(1, run, smoke_data + QUICK + ["train.steps=60", "checkpoint.every=2", "train.lr=10",
                                                  "train.warmup_steps=0", "train.diverge_patience=6",
                                                  "train.spike_factor=0"], expect=EXIT_DIVERGED)
    line = _one_line_error(out)
    assert "the run diverged" in line and f"last good checkpoint: {run}/checkpoints/4 " in line, line
    got = losses(run)
    assert max(got) < 60 and max(got[s] for s in got if s > 4) > 7.24  # stopped early, far above ln(512) + 1
    # no checkpoint was written while the loss was above the threshold
    assert sorted(int(p.parent.name) for p in (run / "checkpoints").glob("*/COMPLETE"))[-1] <= 6


def test_leftovers_of_a_killed_run_do_not_leak_into_the_next(smoke_data, tmp_path):
    run = tmp_path / "leftovers"
    (run / "checkpoints").mkdir(parents=True)
    # a run killed before its first checkpoint logged steps 1-5, and a kill during `latest`'s atomic write
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 6)))
    (run / "checkpoints" / ".latest.tmp999").write_text("3\n")
    run_train(1, run, smoke_data + QUICK + ["train.steps=3", "checkpoint.every=3"])
    steps = [r["step"] for r in records(run)]
    assert steps == [1, 2, 3] and 9.0 not in losses(run).values()
    assert not list((run / "checkpoints").glob(".latest.tmp*"))


def test_a_refusal_on_one_rank_stops_every_rank(smoke_data, tmp_path):
    """Only rank 1 reads its trainer state: when that file is refused, rank 0 must not go on into training (it
    would wait in a collective until torchrun kills it); both ranks stop with the same one line."""
    import hashlib

    run = tmp_path / "ranks"
    flags = smoke_data + QUICK + ["train.steps=2", "checkpoint.every=2"]
    run_train(2, run, flags)
    ckpt = run / "checkpoints" / "2"
    victim = ckpt / "trainer_state_rank1.pt"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    meta = json.loads((ckpt / "COMPLETE").read_text())  # as an attacker or a careless copy would leave it
    meta["sha256"]["trainer_state_rank1.pt"] = hashlib.sha256(victim.read_bytes()).hexdigest()
    (ckpt / "COMPLETE").write_text(json.dumps(meta))
    out = run_train(2, run, flags + ["train.steps=4"], "--resume", str(ckpt), expect=1, timeout=120)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("loopstack: error:")]
    assert len(lines) == 2 and len(set(lines)) == 1 and f"{victim}: unreadable checkpoint file" in lines[0], \
        out.stderr[-3000:]

"""End-to-end trainer tests: real `loopstack train` processes on CPU (gloo), nothing faked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopstack.errors import EXIT_REQUEUE
from tests.trainer.conftest import ROOT, losses, records, run_train, train_cmd

STEPS = ["train.steps=6", "logging.every=1", "checkpoint.every=100", "eval.batches=1", "eval.loops=[1]"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-9)


def test_zero_stages_and_tp_match_single_process(smoke_data, tmp_path):
    """Same global batch (8 sequences) on every layout: ZeRO 0-3 x TP 1-2 on 2-4 processes give the
    single-process losses to fp32 tolerance."""
    ref = tmp_path / "ref"
    run_train(1, ref, smoke_data + STEPS + ["train.micro_batch=8", "parallel.zero_stage=0"])
    want = losses(ref)
    assert len(want) == 6
    layouts = [  # (processes, tp, zero, micro_batch per DP rank)
        (2, 1, 1, 4), (2, 2, 0, 8), (2, 2, 2, 8), (4, 2, 3, 4),
    ]
    for nproc, tp, zero, mb in layouts:
        run = tmp_path / f"n{nproc}-tp{tp}-z{zero}"
        run_train(nproc, run, smoke_data + STEPS + [f"parallel.tp={tp}", f"parallel.zero_stage={zero}",
                                                     f"train.micro_batch={mb}"])
        got = losses(run)
        worst = max(_rel(want[s], got[s]) for s in want)
        assert worst < 1e-4, f"{run.name}: losses differ from single process by {worst:.2e}: {want} vs {got}"


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_kill9_and_resume_is_bit_identical(smoke_data, tmp_path):
    flags = smoke_data + ["train.steps=24", "checkpoint.every=8", "logging.every=1", "eval.batches=1",
                          "eval.loops=[1]"]
    ref = tmp_path / "ref"
    run_train(2, ref, flags)
    cut = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(train_cmd(2, cut, flags), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(cut / "metrics.jsonl", 13, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(int(p.parent.name) for p in (cut / "checkpoints").glob("*/COMPLETE"))
    assert done and done[-1] < 24, done
    # a half-written checkpoint (no COMPLETE mark) newer than the real ones must be ignored
    fake = cut / "checkpoints" / "23"
    fake.mkdir(exist_ok=True)
    (fake / "trainer_state_rank0.pt").write_bytes(b"partial")
    out = run_train(2, cut, flags, "--resume", "auto")
    assert f"resumed from {cut}/checkpoints/{done[-1]} at step {done[-1]}" in out.stdout, out.stdout[-2000:]
    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert a == b  # bit-identical, not approximately


def test_sigusr1_checkpoints_and_exits_for_requeue(smoke_data, tmp_path):
    run = tmp_path / "sig"
    flags = smoke_data + ["train.steps=400", "checkpoint.every=1000", "logging.every=1", "eval.batches=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(train_cmd(1, run, flags), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(run / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    latest = int((run / "checkpoints" / "latest").read_text())
    assert 3 <= latest < 400 and (run / "checkpoints" / str(latest) / "COMPLETE").exists()
    assert max(losses(run)) == latest  # it stopped right after the checkpointed step


def test_bf16_runs_on_cpu(smoke_data, tmp_path):
    run = tmp_path / "bf16"
    run_train(1, run, smoke_data + ["train.steps=8", "train.dtype=bf16", "logging.every=1", "eval.batches=1",
                                    "eval.loops=[1]", "checkpoint.every=4"])
    got = losses(run)
    assert len(got) == 8 and all(v == v for v in got.values())
    assert got[8] < got[1]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [4, 8]


def test_run_directory_layout(smoke_data, tmp_path):
    run = tmp_path / "layout"
    out = run_train(1, run, smoke_data + ["train.steps=4", "logging.every=2", "checkpoint.every=2",
                                          "checkpoint.keep_last=1", "eval.loops=[1,2]", "eval.batches=1",
                                          "logging.diagnostics_every=2"])
    assert (run / "config.yaml").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "loops"):
        assert key in records[0], key
    assert (run / "checkpoints" / "latest").read_text().strip() == "4"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["4"]  # keep_last=1, no temporary directory left
    ev = json.loads((run / "eval" / "latest.json").read_text())
    assert ev["step"] == 4 and set(ev["loss_vs_loops"]) == {"1", "2"}
    # the eval reaches metrics.jsonl (and wandb) as eval/loss@<loops>, with progress on the console
    [logged] = [r for r in lines if "eval/loss@1" in r]
    assert logged == {"step": 4, "eval/loss@1": ev["loss_vs_loops"]["1"], "eval/loss@2": ev["loss_vs_loops"]["2"]}
    assert "eval step 4: loops=2 loss" in out.stdout
    # per-loop diagnostics become one wandb series per loop
    from pretrain.metrics import wandb_scalars

    scalars = wandb_scalars(records[0])
    n = len(records[0]["diag/state_norm"])
    assert n >= 1 and [scalars[f"diag/state_norm@{i}"] for i in range(1, n + 1)] == records[0]["diag/state_norm"]
    assert scalars["loss"] == records[0]["loss"]


@pytest.mark.parametrize("bad,needle", [
    (["--set", "model.loopz=3"], "model.loopz"),
    (["--resume", "/nonexistent/ckpt"], "not a complete checkpoint"),
])
def test_user_errors_are_one_line(smoke_data, tmp_path, bad, needle):
    out = subprocess.run([*train_cmd(1, tmp_path / "x", smoke_data), *bad], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("variant,extra", [
    ("huginn", ["model.n_prelude=1", "model.n_coda=1", "loop.sampler=poisson_lognormal", "loop.backprop_loops=2",
                "loop.max_loops=6"]),
    ("parcae", ["model.n_prelude=1", "model.n_coda=1", "train.optimizer=muon", "train.muon_lr=0.01"]),
    # Mixture-of-Recursions routing (expert choice: top-k per loop, the router losses) at a sampled depth
    ("flt", ["model.router=expert_choice", "model.n_prelude=1", "model.n_coda=1", "loop.sampler=uniform",
             "loop.max_loops=4"]),
])
def test_resume_is_exact_with_random_state_and_sampled_depth(smoke_data, tmp_path, variant, extra):
    """Random h_0 noise, sampled depth and Muon state all come back from a checkpoint: steps after the resume
    point repeat the uninterrupted run bit for bit."""
    flags = smoke_data + [f"model.variant={variant}", "train.steps=8", "checkpoint.every=4", "logging.every=1",
                          "eval.batches=1", "eval.loops=[1]", "checkpoint.keep_last=5", *extra]
    ref = tmp_path / "ref"
    run_train(1, ref, flags)
    resumed = tmp_path / "resumed"
    run_train(1, resumed, flags, "--resume", str(ref / "checkpoints" / "4"))
    a, b = losses(ref), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    assert [a[s] for s in b] == [b[s] for s in b]
    assert len({r["loops"] for r in records(ref)}) > (1 if variant != "parcae" else 0)  # the depth really was sampled


def test_resume_on_a_different_data_parallel_size(smoke_data, tmp_path):
    """A DP=2 checkpoint resumes on DP=1 and says what changes. ZeRO-0 state is whole; ZeRO-1 and ZeRO-3 state
    is re-partitioned from the whole tensors saved with the checkpoint: after the resize all continue with the
    same losses (AdamW moments and Muon momentum restored, not restarted), within fp32 tolerance. (Every ZeRO stage x
    optimizer x dtype repartitions bit for bit at the engine level in test_elastic.py; here the trainer's path, with
    ZeRO-3 for AdamW and ZeRO-1 for Muon against ZeRO-0.)"""
    flags = smoke_data + ["train.steps=4", "checkpoint.every=2", "logging.every=1", "eval.batches=1",
                          "eval.loops=[1]", "train.warmup_steps=0", "train.schedule=constant"]
    for opt, stages in (("adamw", (0, 3)), ("muon", (0, 1))):
        got = {}
        for zero in stages:
            run = tmp_path / f"{opt}-z{zero}"
            run_train(2, run, flags + [f"parallel.zero_stage={zero}", f"train.optimizer={opt}"])
            if zero == 0 and opt == "adamw":  # ZeRO-0 <-> ZeRO 1-3 does not convert: one line, nothing written
                before = sorted(p.name for p in (run / "checkpoints").iterdir())
                bad = run_train(1, run, flags + ["parallel.zero_stage=1", "train.steps=7"], expect=2)
                assert "saved with parallel.zero_stage = 0, this run has 1" in bad.stderr
                assert "Traceback" not in bad.stderr
                assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
            out = run_train(1, run, flags + [f"parallel.zero_stage={zero}", f"train.optimizer={opt}",
                                             "train.steps=7", "train.micro_batch=8"])
            assert "data-parallel size 2 -> 1: model and optimizer loaded" in out.stdout
            got[zero] = losses(run)
            assert sorted(got[zero]) == list(range(1, 8))
        for zero in set(got) - {0}:
            worst = max(_rel(got[0][s], got[zero][s]) for s in range(5, 8))
            assert worst < 1e-5, f"{opt}: ZeRO-{zero} resized run differs from ZeRO-0 by {worst:.2e}: {got}"


def test_damaged_checkpoints_are_skipped_or_refused_in_one_line(smoke_data, tmp_path):
    """A complete checkpoint damaged afterwards: `--resume auto` says so, takes the older one and the run
    continues bit-identically; an explicit path to it, or a file garbled at its recorded size, is one line."""
    flags = smoke_data + ["train.steps=8", "checkpoint.every=4", "logging.every=1", "eval.batches=1",
                          "eval.loops=[1]"]
    run = tmp_path / "run"
    run_train(1, run, flags)
    want = losses(run)
    ckpts = run / "checkpoints"
    meta = json.loads((ckpts / "8" / "COMPLETE").read_text())
    assert meta["files"]["trainer_state_rank0.pt"] == (ckpts / "8" / "trainer_state_rank0.pt").stat().st_size
    model_file = next(name for name in meta["files"] if name.startswith("mp_rank_"))
    with open(ckpts / "8" / model_file, "r+b") as f:  # a copy cut short
        f.truncate(100)

    bad = run_train(1, run, flags, "--resume", str(ckpts / "8"), expect=2)
    assert f"damaged checkpoint: {ckpts / '8' / model_file}: 100 bytes" in bad.stderr
    assert "Traceback" not in bad.stderr

    out = run_train(1, run, flags)  # auto: passes over step 8, resumes from 4, re-saves 8
    assert f"skipping damaged checkpoint {ckpts / '8'}" in out.stdout
    assert f"resumed from {ckpts / '4'} at step 4" in out.stdout
    assert losses(run) == want

    state = ckpts / "4" / "trainer_state_rank0.pt"  # garbled in place: right size, wrong bytes
    state.write_bytes(b"\0" * state.stat().st_size)
    bad = run_train(1, run, flags + ["train.steps=9"], "--resume", str(ckpts / "4"), expect=2)
    assert f"{state}: content differs from the sha256 COMPLETE recorded" in bad.stderr
    assert "Traceback" not in bad.stderr
    # checkpoints written before COMPLETE recorded sha256 are checked by size only: loading finds the damage
    for step in ("4", "8"):
        meta = json.loads((ckpts / step / "COMPLETE").read_text())
        del meta["sha256"]
        (ckpts / step / "COMPLETE").write_text(json.dumps(meta))
    bad = run_train(1, run, flags + ["train.steps=9"], "--resume", str(ckpts / "4"), expect=2)
    assert f"{state}: unreadable checkpoint file" in bad.stderr and "Traceback" not in bad.stderr
    model = ckpts / "8" / model_file
    model.write_bytes(b"\0" * model.stat().st_size)
    bad = run_train(1, run, flags + ["train.steps=9"], expect=2)
    assert f"{ckpts / '8'}: DeepSpeed could not load this checkpoint" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_resume_on_a_different_tensor_parallel_size(smoke_data, tmp_path):
    """A TP=2 checkpoint (ZeRO-1) resumes as TP=1 x DP=2: the shards are rebuilt from the whole-tensor state
    of every old TP rank, and the run continues as the uninterrupted TP=2 run does (fp32 tolerance)."""
    flags = smoke_data + ["checkpoint.every=2", "logging.every=1", "eval.batches=1", "eval.loops=[1]",
                          "train.warmup_steps=0", "train.schedule=constant", "train.micro_batch=8",
                          "parallel.zero_stage=1", "train.optimizer=muon"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_train(2, ref, flags + ["parallel.tp=2", "train.steps=7"])
    run_train(2, cut, flags + ["parallel.tp=2", "train.steps=4"])
    out = run_train(2, cut, flags + ["parallel.tp=1", "train.steps=7", "train.micro_batch=4"])
    assert "tensor-parallel size 2 -> 1 and data-parallel size 1 -> 2: model and optimizer loaded" in out.stdout
    want, got = losses(ref), losses(cut)
    assert sorted(got) == list(range(1, 8))
    assert [got[s] for s in range(1, 5)] == [want[s] for s in range(1, 5)]
    worst = max(_rel(want[s], got[s]) for s in range(5, 8))
    assert worst < 1e-4, f"TP-changed run differs from the uninterrupted one by {worst:.2e}: {want} vs {got}"

    bad = run_train(1, cut, flags + ["parallel.zero_stage=0", "train.steps=9"], expect=2)
    assert "zero_stage = 1, this run has 0" in bad.stderr and "Traceback" not in bad.stderr

    # the TP=2 run's checkpoint evaluates in one plain process
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    sets = [a for f in smoke_data for a in ("--set", f)]
    at_tp2 = json.loads((ref / "eval" / "latest.json").read_text())["loss_vs_loops"]["1"]
    shutil.rmtree(ref / "eval")
    ev = subprocess.run([sys.executable, "-m", "loopstack.cli", "eval", str(ref), "--loops", "1,2", *sets],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "the run used parallel.tp = 2: evaluating with tp = 1" in ev.stdout
    table = json.loads((ref / "eval" / "latest.json").read_text())
    assert table["step"] == 7 and set(table["loss_vs_loops"]) == {"1", "2"}
    assert _rel(at_tp2, table["loss_vs_loops"]["1"]) < 1e-4  # the same model, sharded another way

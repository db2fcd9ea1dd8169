"""`loopstack research stability` end to end on a toy budget: 2 variants x 2 loop counts x 1 seed of a d_model-32
model, 6 steps each (real training through `loopstack train`, real processes), then what the sweep promises:

- every result JSON, plot and the report exist, with the numbers each run measured;
- the plotted diagnostics and losses equal values computed here directly from the run's final checkpoint
  (`load_run`, forward with diagnostics=True on the same held-out batch) and from metrics.jsonl;
- a second invocation redoes nothing; a run whose result is lost resumes from its checkpoint (killed after
  checkpoint 3 of 6: the newest checkpoint removed) and a run redone from scratch gives the same numbers as before;
- bad flags are one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, SMOKE

TOY = ["model.d_model=32", "train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=2", "logging.every=1",
       "logging.diagnostics_every=2", "train.warmup_steps=1", "train.schedule=constant",
       "eval.batches=1"]
RUNS = ["lt-L1-s0", "lt-L2-s0", "flt-L1-s0", "flt-L2-s0"]


def research(out: Path, flags: list[str], *extra: str) -> subprocess.CompletedProcess:
    sets = [a for f in flags for a in ("--set", f)]
    cmd = [sys.executable, "-m", "loopstack.cli", "research", "stability", SMOKE, "--variants", "lt,flt",
           "--loops", "1,2", "--seeds", "1", "--out", str(out), "--jobs", "2", *sets, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def sweep(smoke_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    flags = smoke_data + TOY
    return out, flags, research(out, flags)


def result(out: Path, name: str) -> dict:
    return json.loads((out / "results" / f"{name}.json").read_text())


def measured(r: dict) -> dict:
    """The numbers of a result (not its wall time or process details)."""
    return {k: r[k] for k in ("status", "heldout_loss", "final_loss", "final_diagnostics", "train", "grad_oscillation",
                              "final_train_loss", "step")}


def test_a_toy_sweep_writes_every_result_plot_and_the_report(sweep):
    out, _, done = sweep
    assert f"report: {out / 'report.md'}" in done.stdout and "eta" in done.stdout
    for name in RUNS:
        r = result(out, name)
        variant, loops = name.split("-")[0], int(name.split("-")[1][1:])
        assert r["status"] == "ok" and r["spec"]["variant"] == variant and r["spec"]["loops"] == loops
        assert r["step"] == 6 and r["train"]["step"] == [1, 2, 3, 4, 5, 6]
        assert set(r["heldout_loss"]) == {str(n) for n in r["spec"]["test_loops"]}
        assert str(2 * loops) in r["heldout_loss"]
        assert all(math.isfinite(v) and 2 < v < 10 for v in r["heldout_loss"].values())
        assert [d["step"] for d in r["train"]["diagnostics"]] == [2, 4, 6]
        assert all(len(d["state_norm"]) == loops for d in r["train"]["diagnostics"])
        assert len(r["final_diagnostics"][str(2 * loops)]["state_norm"]) == 2 * loops
        assert r["grad_oscillation"] is not None and r["wall_s"] > 0
    for png in ("loss_vs_train_loops", "state_norm", "grad_norm", "test_time_loops"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "loopstack research stability" in report and "Machine:" in report
    assert "| lt | 2 | 1/0/0 |" in report and "| flt | 1 | 1/0/0 |" in report and "1 seed: spread unknown" in report
    assert json.loads((out / "sweep.json").read_text())["runs"] == RUNS


def test_plotted_numbers_equal_the_model_computed_directly(sweep):
    import torch

    from pretrain.inference import load_run
    from pretrain.research.stability import fixed_batch
    from pretrain.research.worker import grad_oscillation
    from pretrain.train import eval_data

    out = sweep[0]
    plotted = json.loads((out / "plot_data.json").read_text())["flt"]["2"]
    loaded = load_run(out / "runs" / "flt-L2-s0")
    x = fixed_batch(loaded.cfg, loaded.tokenizer.sha256, "cpu")
    with torch.no_grad():
        diag = loaded.model(x.inputs, x.labels, loops=4, diagnostics=True).diagnostics
    assert plotted["final_state_norm_loops"] == 4
    assert plotted["final_state_norm"] == pytest.approx(diag.state_norm, rel=1e-6, abs=0)
    # held-out loss at the trained count: the eval batches (1) of the run's held-out stream at 2 loops
    data = eval_data(loaded.cfg, type("Env", (), {"dp_rank": 0, "dp": 1}), loaded.tokenizer.sha256)
    batch = data.next_batch()
    tokens = torch.as_tensor(batch["tokens"]).long()
    with torch.no_grad():
        loss = loaded.model(tokens[:, :-1], tokens[:, 1:], loops=2).loss.item()
    assert plotted["final_loss"] == [pytest.approx(loss, rel=1e-6)]
    # over training: metrics.jsonl as the trainer wrote it
    logged = [json.loads(line) for line in (out / "runs" / "flt-L2-s0" / "metrics.jsonl").read_text().splitlines()]
    diag_rows = [r for r in logged if "diag/state_norm" in r]
    assert plotted["diag_step"] == [r["step"] for r in diag_rows]
    assert plotted["diag_last_state_norm"] == [r["diag/state_norm"][-1] for r in diag_rows]
    steps = [r for r in logged if "loss" in r]
    assert plotted["grad_norm"] == [r["grad_norm"] for r in steps]
    # oscillation: std of successive log grad-norm differences over the constant-lr steps, by hand
    peak = max(r["lr"] for r in steps)
    logs = [math.log(r["grad_norm"]) for r in steps if r["lr"] >= 0.999 * peak]
    diffs = [b - a for a, b in zip(logs, logs[1:], strict=False)]
    mean = sum(diffs) / len(diffs)
    by_hand = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    assert plotted["grad_oscillation"] == [pytest.approx(by_hand, rel=1e-9)]
    two_levels = grad_oscillation({"lr": [1, 1, 1, 1], "grad_norm": [1, 2, 1, 2]})
    assert two_levels == pytest.approx(2 * math.log(2) / math.sqrt(3))


def test_rerun_redoes_nothing_resumes_a_killed_run_and_repeats_a_run_exactly(sweep):
    out, flags, _ = sweep
    before = {name: result(out, name) for name in RUNS}
    mtimes = {name: (out / "results" / f"{name}.json").stat().st_mtime_ns for name in RUNS}
    again = research(out, flags)
    assert "sweep:" not in again.stdout and again.stdout.count("skip ") == 4
    assert {name: (out / "results" / f"{name}.json").stat().st_mtime_ns for name in RUNS} == mtimes

    # lt-L2-s0 killed after its step-3 checkpoint (the result and the newer checkpoint gone); flt-L1-s0 from scratch
    (out / "results" / "lt-L2-s0.json").unlink()
    shutil.rmtree(out / "runs" / "lt-L2-s0" / "checkpoints" / "6")
    (out / "results" / "flt-L1-s0.json").unlink()
    shutil.rmtree(out / "runs" / "flt-L1-s0")
    third = research(out, flags)
    assert "sweep: 2 run(s) to do of 4" in third.stdout and third.stdout.count("skip ") == 2
    assert "resumed from" in (out / "logs" / "lt-L2-s0.log").read_text().split("=== ")[-1]
    for name in ("lt-L2-s0", "flt-L1-s0"):
        assert measured(result(out, name)) == measured(before[name]), name


def test_bad_flags_are_one_line(capsys):
    from loopstack.cli import main

    cases = [(["--variants", "lt,fltt"], "--variants: unknown 'fltt' (did you mean 'flt'?)"),
             (["--loops", "0,2"], "--loops 0,2: expected comma-separated loop counts >= 1"),
             (["--seeds", "0"], "--seeds 0: expected at least 1"),
             (["--set", "model.loopz=3"], "unknown key 'model.loopz' (did you mean 'model.loops'?)"),
             (["configs/nope.yaml"], "configs/nope.yaml: no such config file")]
    for flags, message in cases:
        assert main(["research", "stability", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (flags, err)


def test_the_documented_default_configs_load():
    from pretrain.config import load_config

    for name in ("research-stability", "research-extrapolate"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [])
        assert cfg.model.n_prelude == 0 and cfg.model.n_coda == 0


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped (an orphan in a container whose init does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_stops_its_trainer_when_the_sweep_is_killed(tmp_path):
    """Real processes: a stand-in sweep starts a worker (the worker's own `watch_parent`), which starts a trainer
    stand-in that records SIGTERM as the trainer does (checkpoint, exit 75); the sweep gets SIGKILL."""
    import signal
    import time

    flag = tmp_path / "terminated"
    trainer = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (open({str(flag)!r}, 'w')"
               f".write('term'), sys.exit(75))); time.sleep(120)")
    worker = ("import os, subprocess, sys; from pretrain.research.worker import watch_parent; "
              f"child = subprocess.Popen([sys.executable, '-c', {trainer!r}]); print(child.pid, flush=True); "
              "watch_parent(os.getppid(), child, period=0.1); sys.exit(child.wait())")
    sweep = ("import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
             "print(w.pid, flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", sweep, worker], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker_pid, trainer_pid = int(proc.stdout.readline()), int(proc.stdout.readline())
        time.sleep(0.5)
        assert not flag.exists() and not _gone(trainer_pid)  # the sweep is alive: the trainer runs on
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not (_gone(worker_pid) and _gone(trainer_pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.read_text() == "term"  # SIGTERM, so the real trainer would checkpoint and exit 75
        assert _gone(trainer_pid) and _gone(worker_pid)
    finally:
        proc.kill()
        proc.wait()

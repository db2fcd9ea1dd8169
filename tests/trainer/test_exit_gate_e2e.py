"""The learned exit gate end to end: a real `loopstack train` run with model.exit_gate resumes bit-identically (its
objective's parts logged), stage II (loop.exit_gate_only, from the run by train.init_from) changes the gate alone, and
`loopstack eval --exit-threshold` reports the loss and the loops used (threshold 1 = the fixed-depth loss)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.trainer.conftest import ROOT, losses, records, run_train

FLAGS = ["train.schedule=constant", "checkpoint.every=100", "logging.every=1", "eval.batches=1", "eval.loops=[1]",
         "model.exit_gate=true", "logging.diagnostics_every=0"]


def test_exit_gate_run_resumes_trains_stage_two_and_evaluates_with_a_threshold(smoke_data, tmp_path):
    import torch

    from pretrain.inference import load_run

    flags = smoke_data + FLAGS
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_train(1, ref, flags + ["train.steps=6"])
    run_train(1, cut, flags + ["train.steps=3"])
    run_train(1, cut, flags + ["train.steps=6"], "--resume", "auto")
    assert len(losses(ref)) == 6 and losses(cut) == losses(ref)  # bit-identical
    assert [r["exit/mean_loops"] for r in records(cut)] == [r["exit/mean_loops"] for r in records(ref)]
    assert all(1.0 <= r["exit/mean_loops"] <= 3.0 for r in records(ref))

    stage2 = tmp_path / "stage2"
    run_train(1, stage2, flags + ["train.steps=2", "loop.exit_gate_only=true", f"train.init_from={ref}"])
    assert all("exit/gate_loss" in r for r in records(stage2))
    before, after = load_run(ref).model.state_dict(), load_run(stage2).model.state_dict()
    changed = {k for k, v in before.items() if v is not None and not torch.equal(v, after[k])}
    assert changed == {"exit_gate.weight", "exit_gate.bias"}

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "loopstack.cli", "eval", str(ref), "--exit-threshold", "0.5,1"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mean loops used" in out.stdout, out.stdout
    record = json.loads((ref / "eval" / "exit_latest.json").read_text())
    rows = {r["threshold"]: r for r in record["exit"]}
    assert rows[1.0]["loss"] == record["fixed_depth"]["3"] and rows[1.0]["mean_loops"] == 3.0
    assert 1.0 <= rows[0.5]["mean_loops"] <= 3.0


def test_exit_flags_are_checked_in_one_line(tmp_path):
    from argparse import Namespace

    import pytest

    from loopstack.errors import UserError
    from pretrain.cli import _eval
    from tests.use_helpers import make_run

    run = make_run(tmp_path, "flt")  # no exit gate
    base = dict(run_dir=str(run), checkpoint="auto", loops="", batches=0, task=None, overrides=[], exit_epsilon="")
    with pytest.raises(UserError, match="trained without the learned exit gate"):
        _eval(Namespace(**base, exit_threshold="0.5"))
    with pytest.raises(UserError, match=r"--exit-threshold 1.5: out of range"):
        _eval(Namespace(**base, exit_threshold="1.5"))
    with pytest.raises(UserError, match="is not a number"):
        _eval(Namespace(**base, exit_threshold="0.5,x"))

"""`loopstack research extrapolate` end to end on a toy budget: parity trained on difficulties 1..2, evaluated on
1..4, two variants (one with both outer-norm settings), a d_model-32 model trained 6 steps through `loopstack train`:
every file and plot, the plotted accuracies equal `taskeval.accuracy_table` on the run's final model computed here,
a second invocation redoes nothing, and bad flags are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT

TOY = ["model.d_model=32", "data.seq_len=32", "train.steps=6", "train.micro_batch=4", "checkpoint.every=100",
       "train.warmup_steps=1", "train.schedule=constant"]


def research(out: Path, *flags: str) -> subprocess.CompletedProcess:
    sets = [a for f in TOY for a in ("--set", f)]
    cmd = [sys.executable, "-m", "loopstack.cli", "research", "extrapolate", "--task", "parity", "--train-depth", "2",
           "--max-depth", "4", "--loops", "2", "--train-docs", "300", "--problems", "20", "--out", str(out),
           "--jobs", "2", *sets, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_a_toy_extrapolation_sweep(tmp_path):
    import torch

    from pretrain.inference import load_run
    from pretrain.taskeval import accuracy_table

    out = tmp_path / "out"
    done = research(out, "--variants", "looped,flt", "--outer-norm", "off")  # the switch reaches every run
    assert "sweep: 2 run(s) to do of 2" in done.stdout and f"report: {out / 'report.md'}" in done.stdout
    flt = json.loads((out / "results" / "flt-outer_off-L2-s0.json").read_text())
    assert flt["status"] == "ok" and "model.outer_norm=false" in flt["spec"]["overrides"]
    assert flt["depths"] == [1, 2, 3, 4] and flt["train_depth"] == 2 and flt["spec"]["test_loops"] == [1, 2, 4, 6, 8]
    for png in ("accuracy_vs_depth", "accuracy_vs_loops"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| flt-outer_off | 2 | 1/1 |" in (out / "report.md").read_text()

    plotted = json.loads((out / "plot_data.json").read_text())["flt-outer_off"]["2"]
    loaded = load_run(out / "runs" / "flt-outer_off-L2-s0")
    assert loaded.cfg.model.outer_norm is False
    with torch.no_grad():
        table = accuracy_table(loaded.model, loaded.tokenizer, "parity", [1, 2, 3, 4], [1, 2, 8], 20,
                               seed=flt["problem_seed"], size=flt["size"], context=[loaded.tokenizer.eos_id])
    for d in (1, 2, 3, 4):
        for k in (1, 2, 8):
            assert plotted["accuracy"][str(d)][str(k)] == table[d][k]
    assert plotted["beyond"]["8"] == [pytest.approx((table[3][8] + table[4][8]) / 2)]

    again = research(out, "--variants", "looped,flt", "--outer-norm", "off")
    assert "sweep:" not in again.stdout and again.stdout.count("skip ") == 2


def test_bad_extrapolate_flags_are_one_line(capsys):
    from loopstack.cli import main

    cases = [(["--variants", "recal"], "--variants: unknown 'recal' (did you mean 'recall'?)"),
             (["--outer-norm", "of"], "--outer-norm: unknown 'of' (did you mean 'off'?)"),
             (["--train-depth", "4", "--max-depth", "3"], "--max-depth 3: must exceed --train-depth 4")]
    for flags, message in cases:
        assert main(["research", "extrapolate", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (flags, err)

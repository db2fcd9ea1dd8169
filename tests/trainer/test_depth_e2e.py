"""The depth curriculum end to end: real `loopstack train` runs log the ramp and resume bit-identically."""

from __future__ import annotations

from tests.trainer.conftest import losses, run_train
from tests.trainer.conftest import records as read_records

# uniform depth (mean 4: draws 1..7) under a curriculum from 1 loop over 6 steps: cap(s) = 1 + s up to 7, every
# draw clamped to it; gradient through the last 2 loops. The constant schedule makes a run with a lower
# train.steps the same run stopped early (its learning rate does not depend on train.steps).
FLAGS = ["train.schedule=constant", "checkpoint.every=100", "logging.every=1", "eval.batches=1", "eval.loops=[1]",
         "model.loops=4", "loop.sampler=uniform", "loop.curriculum_start=1", "loop.curriculum_steps=6",
         "loop.backprop_loops=2"]


def test_curriculum_is_logged_and_resumes_bit_identically(smoke_data, tmp_path):
    flags = smoke_data + FLAGS
    ref = tmp_path / "ref"
    run_train(1, ref, flags + ["train.steps=8"])
    records = read_records(ref)
    assert [r["loops_max"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 7]
    assert all(1 <= r["loops"] <= r["loops_max"] for r in records)
    assert any(r["loops"] < r["loops_max"] for r in records)  # sampled below the cap
    assert all(r["backprop_loops"] == min(2, r["loops"]) for r in records)

    cut = tmp_path / "cut"
    run_train(1, cut, flags + ["train.steps=4"])  # stops with a checkpoint at step 4, mid-ramp
    out = run_train(1, cut, flags + ["train.steps=8"], "--resume", "auto")
    assert f"resumed from {cut}/checkpoints/4 at step 4" in out.stdout, out.stdout[-2000:]
    assert losses(cut) == losses(ref)  # bit-identical, not approximately
    assert read_records(cut) and [(r["loops"], r["loops_max"]) for r in read_records(cut)] == \
        [(r["loops"], r["loops_max"]) for r in records]


def test_runs_without_a_curriculum_log_no_cap(smoke_data, tmp_path):
    run_train(1, tmp_path / "plain", smoke_data + ["train.steps=2", "logging.every=1", "checkpoint.every=100",
                                                   "eval.batches=1", "eval.loops=[1]"])
    assert all("loops_max" not in r and r["loops"] == 3 for r in read_records(tmp_path / "plain"))


def test_a_curriculum_that_does_not_fit_is_one_line(smoke_data, tmp_path):
    out = run_train(1, tmp_path / "bad", smoke_data + ["train.steps=2", "loop.curriculum_start=5",
                                                       "loop.curriculum_steps=3"], expect=2)
    assert "loop.curriculum_start = 5 is above the curriculum's target 3 (model.loops:" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "bad" / "metrics.jsonl").exists()

"""Per-sequence depth end to end: real `loopstack train` runs log the max and mean depth and resume
bit-identically (the draws are a pure function of seed, step and global sequence index)."""

from __future__ import annotations

from tests.trainer.conftest import losses, run_train
from tests.trainer.conftest import records as read_records

# uniform per-sequence depth (mean 3: draws 1..5), gradient through each sequence's own last 2 loops; a constant
# schedule makes a run with a lower train.steps the same run stopped early
FLAGS = ["train.schedule=constant", "checkpoint.every=100", "logging.every=1", "eval.batches=1", "eval.loops=[1]",
         "loop.per_sequence=true", "loop.sampler=uniform", "loop.backprop_loops=2"]


def test_per_sequence_depth_logs_and_resumes_bit_identically(smoke_data, tmp_path):
    flags = smoke_data + FLAGS
    ref = tmp_path / "ref"
    run_train(1, ref, flags + ["train.steps=8"])
    records = read_records(ref)
    assert len(records) == 8
    assert all(1 <= r["loops_mean"] <= r["loops"] <= 5 for r in records)
    assert any(r["loops_mean"] < r["loops"] for r in records)  # the sequences of a batch differ
    assert all(r["backprop_loops"] == min(2, r["loops"]) for r in records)

    cut = tmp_path / "cut"
    run_train(1, cut, flags + ["train.steps=4"])  # stops with a checkpoint at step 4
    out = run_train(1, cut, flags + ["train.steps=8"], "--resume", "auto")
    assert f"resumed from {cut}/checkpoints/4 at step 4" in out.stdout, out.stdout[-2000:]
    assert losses(cut) == losses(ref)  # bit-identical, not approximately
    depths = [(r["loops"], r["loops_mean"]) for r in records]
    assert [(r["loops"], r["loops_mean"]) for r in read_records(cut)] == depths


def test_per_sequence_depth_with_loss_on_all_is_one_line(smoke_data, tmp_path):
    out = run_train(1, tmp_path / "bad", smoke_data + ["train.steps=2", "loop.per_sequence=true", "loop.loss_on=all"],
                    expect=2)
    assert "loop.per_sequence needs loop.loss_on: last, not 'all'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "bad" / "metrics.jsonl").exists()

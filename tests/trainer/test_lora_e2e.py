"""Per-loop LoRA end to end: a real `loopstack train` run with adapters resumes bit-identically."""

from __future__ import annotations

from tests.trainer.conftest import losses, run_train

# the constant schedule makes a run with a lower train.steps the same run stopped early
FLAGS = ["train.schedule=constant", "checkpoint.every=100", "logging.every=1", "eval.batches=1", "eval.loops=[1]",
         "model.loop_lora_rank=4", "model.loop_lora_alpha=8.0"]


def test_lora_run_resumes_bit_identically(smoke_data, tmp_path):
    flags = smoke_data + FLAGS
    ref = tmp_path / "ref"
    run_train(1, ref, flags + ["train.steps=8"])
    cut = tmp_path / "cut"
    run_train(1, cut, flags + ["train.steps=4"])  # ends with a checkpoint at step 4
    out = run_train(1, cut, flags + ["train.steps=8"], "--resume", "auto")
    assert f"resumed from {cut}/checkpoints/4 at step 4" in out.stdout, out.stdout[-2000:]
    assert len(losses(ref)) == 8 and losses(cut) == losses(ref)  # bit-identical, not approximately

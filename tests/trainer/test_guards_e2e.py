"""The trainer's guards in a real run (Trainer.fit, DeepSpeed engine, checkpoints): a NaN loss is skipped and
counted; repeated loss spikes roll the run back to its last checkpoint and it goes on with the next batches.
The fault is injected by scaling the model's loss on chosen steps: the guard, not the model, is under test."""

from __future__ import annotations

import json
import math

from tests.dist import run_distributed
from tests.trainer.conftest import SMOKE


class _LossFaults:
    """The engine, except that the loss of chosen (0-based) steps is multiplied by a factor, once each."""

    def __init__(self, engine, trainer, faults: dict[int, float]):
        self._engine, self._trainer, self._faults = engine, trainer, faults

    def __call__(self, *args, **kwargs):
        out = self._engine(*args, **kwargs)
        factor = self._faults.pop(self._trainer.state.step, None)
        if factor is not None:
            out.loss = out.loss * factor
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _guarded_run(flags: list[str], run_dir: str) -> dict:
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.distributed import init_distributed
    from pretrain.train import Trainer

    cfg = load_config(SMOKE, flags + ["train.steps=10", "checkpoint.every=4", "logging.every=1", "eval.batches=1",
                                      "eval.loops=[1]", "train.spike_factor=3.0", "train.spike_rollback_after=2"])
    env = init_distributed(tp=1, seed=cfg.seed)
    trainer = Trainer(cfg, Path(run_dir), env)
    trainer.guard.warmup = 2  # trust the moving average early: the run is short
    trainer.engine = _LossFaults(trainer.engine, trainer, {3: float("nan"), 6: 1e3, 7: 1e3})
    rc = trainer.fit("none")
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]  # step records (eval records hold eval/loss@<loops>)
    return {"rc": rc, "records": records, "state": vars(trainer.state)}


def test_nan_skip_and_spike_rollback(smoke_data, tmp_path):
    (out,) = run_distributed(_guarded_run, 1, args=(smoke_data, str(tmp_path / "run")), timeout=300)
    assert out["rc"] == 0
    steps = [(r["step"], r["skipped"]) for r in out["records"]]
    # step 4 (0-based 3): NaN loss, skipped on the step, the run goes on
    assert steps[:4] == [(1, 0), (2, 0), (3, 0), (4, 1)] and math.isnan(float(out["records"][3]["loss"]))
    # steps 7 and 8 spiked 1000x: both skipped, then a rollback to checkpoint 4; steps 5..10 follow
    assert steps[4:8] == [(5, 0), (6, 0), (7, 1), (8, 1)]
    assert [s for s, _ in steps[8:]] == [5, 6, 7, 8, 9, 10] and not any(k for _, k in steps[8:])
    assert out["state"]["rollbacks"] == 1 and out["state"]["skipped_steps"] == 3
    # the batches after the rollback are new ones (the offending ones are skipped), so the losses differ
    assert out["records"][4]["loss"] != out["records"][8]["loss"]

"""The training step without host syncs (docs/performance.md, "Host syncs"): the trainer reads a step's scalars
one step late, or at once at logging / checkpoint / eval / stop / final steps, and agrees on a stop one step late.

On CPU (2 real gloo ranks, ZeRO-0, the smoke model): a run logging every step (every step read at once) and one
logging every third step (the steps between read one step late) log the same records bit for bit, end with the
same weights, and skip the same step when one rank's loss is NaN; a SIGUSR1 on one rank ends the run on every rank
with a checkpoint and the requeue exit, one step after the signal. On CUDA (skipped without one): no
synchronizing CUDA call in the steps between logging steps, in the configuration documented as sync-free.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.dist import run_distributed
from tests.trainer.conftest import SMOKE

TIMING = {"tokens_per_s", "model_flops_per_s", "mfu", "hfu", "memory_gb"}  # wall-clock numbers differ by run


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode() + p.detach().float().numpy().tobytes())
    return h.hexdigest()


def _trainer(flags: list[str], run_dir: str, faults: dict[int, float]):
    """A Trainer on the smoke config whose loss is scaled on the given 0-based steps, and a list that records, for
    every step the trainer settles, (that step, the trainer's step when it was read)."""
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.distributed import init_distributed
    from pretrain.train import Trainer
    from tests.trainer.test_guards_e2e import _LossFaults

    cfg = load_config(SMOKE, flags)
    trainer = Trainer(cfg, Path(run_dir), init_distributed(tp=1, seed=cfg.seed))
    trainer.engine = _LossFaults(trainer.engine, trainer, faults)
    settled: list[tuple[int, int]] = []
    settle = trainer._settle

    def watched(pending):
        settled.append((pending.record["step"], trainer.state.step))
        return settle(pending)

    trainer._settle = watched
    return trainer, settled


def _cpu_runs(data_flags: list[str], root: str) -> dict:
    import json
    import os
    import signal
    from pathlib import Path

    import torch.distributed as dist

    base = data_flags + ["train.steps=6", "parallel.zero_stage=0", "checkpoint.every=3", "eval.batches=1",
                         "eval.loops=[1]", "logging.diagnostics_every=0"]
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    out: dict = {}
    for name, every in (("each", 1), ("late", 3)):  # the NaN: rank 1's loss of step 2 (0-based 1) only
        trainer, settled = _trainer(base + [f"logging.every={every}"], f"{root}/{name}",
                                    {1: float("nan")} if rank == 1 else {})
        rc = trainer.fit("none")
        lines = (Path(root) / name / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
        out[name] = {"rc": rc, "state": dict(vars(trainer.state)), "settled": settled,
                     "weights": _digest(trainer.engine.module),
                     "records": [r for r in map(json.loads, lines) if "loss" in r]}

    class _SignalAt:  # rank 0 gets a real SIGUSR1 while it runs step 5 (0-based 4)
        def __init__(self, engine, trainer):
            self._engine, self._trainer = engine, trainer

        def __call__(self, *args, **kwargs):
            if rank == 0 and self._trainer.state.step == 4:
                os.kill(os.getpid(), signal.SIGUSR1)
            return self._engine(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._engine, name)

    trainer, _ = _trainer(base + ["train.steps=10", "logging.every=4", "checkpoint.every=100"], f"{root}/stop", {})
    trainer.engine = _SignalAt(trainer.engine, trainer)
    rc = trainer.fit("none")
    done = sorted(int(p.parent.name) for p in (Path(root) / "stop" / "checkpoints").glob("*/COMPLETE"))
    out["stop"] = {"rc": rc, "step": trainer.state.step, "checkpoints": done}
    return out


def test_late_reads_equal_reads_at_once_nan_skip_and_stop(smoke_data, tmp_path):
    from loopstack.errors import EXIT_REQUEUE

    ranks = run_distributed(_cpu_runs, 2, args=(smoke_data, str(tmp_path)), timeout=300)
    each, late = ranks[0]["each"], ranks[0]["late"]
    assert each["rc"] == late["rc"] == 0
    # logging every step: each step is read at once; every third: steps 1, 2, 4, 5 are read during the next step
    assert each["settled"] == [(s, s) for s in range(1, 7)]
    assert late["settled"] == [(1, 2), (2, 3), (3, 3), (4, 5), (5, 6), (6, 6)]
    by_step = {r["step"]: r for r in each["records"]}
    assert [r["step"] for r in late["records"]] == [3, 6]
    for r in late["records"]:  # the same values, bit for bit, and the same keys in the same order
        want = {k: v for k, v in by_step[r["step"]].items() if k not in TIMING}
        assert [(k, v) for k, v in r.items() if k not in TIMING] == list(want.items())
    # the NaN on rank 1 alone: step 2 skipped on every rank, in both runs
    assert by_step[2]["skipped"] == 1 and by_step[2]["loss"] == "nan"
    assert [r["skipped_total"] for r in late["records"]] == [1, 1]
    for rank in ranks:
        for run in ("each", "late"):
            assert rank[run]["state"]["skipped_steps"] == 1 and rank[run]["state"]["step"] == 6
            assert rank[run]["weights"] == ranks[0]["each"]["weights"]  # the same update applied everywhere
    # SIGUSR1 on rank 0 during step 5: every rank agrees after step 6, checkpoints it and exits for requeue
    for rank in ranks:
        assert rank["stop"] == {"rc": EXIT_REQUEUE, "step": 6, "checkpoints": [6]}


def _count_syncs(data_flags: list[str], run_dir: str, optimizer: str) -> dict:
    import warnings

    import torch

    flags = data_flags + ["train.steps=8", f"train.optimizer={optimizer}", "parallel.zero_stage=0", "logging.every=4",
                          "checkpoint.every=100", "eval.every=0", "eval.batches=1", "eval.loops=[1]",
                          "logging.diagnostics_every=0", "data.prefetch=2"]
    trainer, _ = _trainer(flags, run_dir, {5: float("nan")})  # step 6 (between logging steps) has a NaN loss
    queue = trainer._queue_step
    syncs: list[str] = []
    quiet: list[int] = []

    def counted():
        step = trainer.state.step + 1  # the step being queued
        if step <= 2 or step % 4 == 0 or step == 8:  # warm-up steps and logging steps may sync
            return queue()
        quiet.append(step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pending = queue()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs.extend(f"step {step}: {w.message}" for w in caught if "synchroniz" in str(w.message).lower())
        return pending

    trainer._queue_step = counted
    rc = trainer.fit("none")
    return {"rc": rc, "device": str(trainer.env.device), "quiet": quiet, "syncs": syncs,
            "skipped": trainer.state.skipped_steps}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host syncs")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_no_host_sync_between_logging_steps_on_cuda(smoke_data, tmp_path, optimizer):
    (out,) = run_distributed(_count_syncs, 1, args=(smoke_data, str(tmp_path / "run"), optimizer), timeout=300)
    assert out["rc"] == 0 and out["device"].startswith("cuda")
    assert out["quiet"] == [3, 5, 6, 7] and out["skipped"] == 1  # the NaN step skipped on the device
    assert out["syncs"] == [], "\n".join(out["syncs"][:20])

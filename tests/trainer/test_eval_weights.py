"""`loopstack eval` without a DeepSpeed engine, an optimizer or wandb (`pretrain.weights`): real `loopstack train`
runs on CPU, then `loopstack eval` on their checkpoints.

- ZeRO-0, ZeRO-1 (with and without the whole-tensor state) and ZeRO-3 runs evaluate to exactly the numbers the
  trainer's own end-of-run eval wrote (fp32: the same weights, the same forward);
- a bf16 run's eval equals the trainer's, and the whole-tensor state cast to bf16 is exactly the bf16 weights
  DeepSpeed held (ZeRO-1: its module file; ZeRO-3: the elastic fp32 masters, cast);
- a ZeRO-3 checkpoint without the whole-tensor state is read from DeepSpeed's flat fp32 partitions;
- none of it constructs a DeepSpeed engine or an optimizer, or starts a wandb run (the CLI runs in a process
  that records any call of `deepspeed.initialize`, `DeepSpeedEngine.__init__`, `pretrain.engine.build_engine`,
  `HybridOptimizer.__init__`, `pretrain.metrics._start_wandb`, and checks `wandb.run`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, train_cmd

QUICK = ["train.steps=3", "checkpoint.every=100", "logging.every=1", "eval.batches=1", "eval.loops=[1,2]"]

# runs `loopstack eval` in this process for each run directory in argv[1] (JSON), and prints what it saw
EVAL_WATCHED = r"""
import json, sys
import deepspeed, deepspeed.runtime.engine as ds_engine
import pretrain.engine, pretrain.metrics, pretrain.optim
used = []
def watch(owner, name):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        used.append(f"{owner.__name__}.{name}")
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)
watch(deepspeed, "initialize")
watch(ds_engine.DeepSpeedEngine, "__init__")
watch(pretrain.optim.HybridOptimizer, "__init__")
watch(pretrain.engine, "build_engine")
watch(pretrain.metrics, "_start_wandb")
from loopstack.cli import main
runs, sets = json.loads(sys.argv[1]), sys.argv[2:]
codes = [main(["eval", run, *sets]) for run in runs]
# megatron.core imports wandb itself (megatron.core.inference); what matters is that no run was started
wandb_run = getattr(sys.modules.get("wandb"), "run", None)
print("WATCHED " + json.dumps({"codes": codes, "used": used, "wandb": wandb_run is not None}))
"""


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _train_all(runs: dict[Path, list[str]], smoke_data: list[str]) -> None:
    """`loopstack train` (one process each), two at a time."""
    pending = list(runs.items())
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = [(run, subprocess.Popen(train_cmd(1, run, smoke_data + QUICK + flags), cwd=ROOT, env=_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for run, flags in batch]
        for run, proc in procs:
            out, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, f"{run.name}: exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"


def _eval_watched(runs: list[Path], smoke_data: list[str]) -> tuple[dict, subprocess.CompletedProcess]:
    sets = [a for f in smoke_data for a in ("--set", f)]
    out = subprocess.run([sys.executable, "-c", EVAL_WATCHED, json.dumps([str(r) for r in runs]), *sets],
                         capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=400)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    line = next(x for x in out.stdout.splitlines() if x.startswith("WATCHED "))
    return json.loads(line.removeprefix("WATCHED ")), out


def _trainer_evals(runs: list[Path]) -> dict[Path, dict]:
    """What each trainer's own final eval wrote (with the engine's weights); eval/ is removed for the re-run."""
    got = {}
    for run in runs:
        got[run] = json.loads((run / "eval" / "step_3.json").read_text())
        for f in (run / "eval").iterdir():
            f.unlink()
    return got


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("loopstack: error:")]


def test_eval_loads_weights_without_an_engine_and_matches_the_trainers_eval(smoke_data, tmp_path):
    from pretrain.checkpoint import list_complete
    from pretrain.weights import weight_source

    runs = {tmp_path / "z0": ["parallel.zero_stage=0"],
            tmp_path / "z1": ["parallel.zero_stage=1"],
            tmp_path / "z1-plain": ["parallel.zero_stage=1", "checkpoint.elastic=false"],
            tmp_path / "z3": ["parallel.zero_stage=3"],
            tmp_path / "z3-plain": ["parallel.zero_stage=3", "checkpoint.elastic=false"]}
    _train_all(runs, smoke_data)
    want = _trainer_evals(list(runs))
    config = {r: (r / "config.yaml").read_bytes() for r in runs}
    seen, out = _eval_watched(list(runs), smoke_data)
    assert seen["used"] == [] and not seen["wandb"], seen  # no engine, no optimizer, no wandb run
    assert seen["codes"] == [0, 0, 0, 0, 0], (seen, out.stderr[-3000:])
    sources = {r.name: weight_source(list_complete(r / "checkpoints")[-1], 1) for r in runs}
    assert sources == {"z0": "module", "z1": "module", "z1-plain": "module", "z3": "elastic",
                       "z3-plain": "zero3"}, sources  # ZeRO-3 without the whole-tensor state: its flat partitions
    for run in runs:
        got = json.loads((run / "eval" / "step_3.json").read_text())
        assert got == want[run], (run.name, got, want[run])  # exactly: the same fp32 weights and forward
        assert (run / "plots").is_dir() and (run / "config.yaml").read_bytes() == config[run]
        assert not (run / "wandb").exists()


def test_bf16_eval_uses_the_weights_the_engine_held(smoke_data, tmp_path):
    """bf16: the whole-tensor fp32 masters cast to bf16 (what eval does without the module file: ZeRO-3, a TP
    change) are bit for bit the bf16 weights the engine held, and eval's numbers equal the trainer's exactly
    (tolerance 0: the same bf16 weights through the same forward)."""
    import torch

    from pretrain.checkpoint import list_complete
    from pretrain.weights import _elastic_tensors, _module_tensors

    runs = {tmp_path / "z1": ["parallel.zero_stage=1", "train.dtype=bf16"],
            tmp_path / "z3": ["parallel.zero_stage=3", "train.dtype=bf16"]}
    _train_all(runs, smoke_data)
    want = _trainer_evals(list(runs))
    info = list_complete(tmp_path / "z1" / "checkpoints")[-1]
    _, held = _module_tensors(None, info, 0, 1)  # the bf16 weights DeepSpeed's ZeRO-1 engine held
    _, masters = _elastic_tensors(None, info, 0, 1)
    assert set(held) == set(masters) and all(held[n].dtype == torch.bfloat16 for n in held)
    for name in held:
        assert torch.equal(masters[name].to(torch.bfloat16), held[name]), name
    seen, _ = _eval_watched(list(runs), smoke_data)
    assert seen["codes"] == [0, 0] and seen["used"] == [], seen
    for run in runs:  # ZeRO-1: the module file's bf16 weights; ZeRO-3: the fp32 masters cast to bf16
        got = json.loads((run / "eval" / "step_3.json").read_text())
        assert got == want[run], (run.name, got, want[run])


def test_weight_sources_at_another_tensor_parallel_size(tmp_path):
    """Module files (ZeRO 0-2) serve any TP size (merged along each tensor's split dim); whole weights
    (model.safetensors) come first; a checkpoint with no weights file at all is one line naming what it looked for."""
    from loopstack.errors import UserError
    from pretrain.checkpoint import CheckpointInfo
    from pretrain.weights import weight_source

    ckpt = tmp_path / "8"
    ckpt.mkdir()
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / "mp_rank_01_model_states.pt").write_bytes(b"")
    info = CheckpointInfo(ckpt, 8, {"tp": 2, "config": {"parallel": {"zero_stage": 0, "tp": 2}}})
    assert weight_source(info, 2) == "module" and weight_source(info, 1) == "module"
    z3 = CheckpointInfo(ckpt, 8, {"tp": 2, "config": {"parallel": {"zero_stage": 3, "tp": 2}}})
    with pytest.raises(UserError) as err:
        weight_source(z3, 1)
    assert str(err.value).startswith(f"{ckpt}: no weights loopstack can read: none of model.safetensors")
    assert "\n" not in str(err.value)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert weight_source(z3, 1) == "zero3"
    (ckpt / "elastic_state_tp0_part0of1.pt").write_bytes(b"")
    assert weight_source(z3, 1) == "elastic"
    (ckpt / "model.safetensors").write_bytes(b"")
    assert weight_source(z3, 1) == "whole"


def test_eval_under_torchrun_loads_each_tensor_parallel_rank_and_averages_over_data_parallel(smoke_data, tmp_path):
    """Two processes: TP=2 (ZeRO-0, each rank its own `mp_rank_0<r>` module file) and DP=2 (ZeRO-2, ranks average)
    evaluate to exactly the trainer's numbers of the same layout."""
    runs = {tmp_path / "tp2-z0": ["parallel.tp=2", "parallel.zero_stage=0"],
            tmp_path / "dp2-z2": ["parallel.zero_stage=2"]}
    for run, flags in runs.items():
        out = subprocess.run(train_cmd(2, run, smoke_data + QUICK + flags), capture_output=True, text=True, cwd=ROOT,
                             env=_env(), timeout=400)
        assert out.returncode == 0, f"{run.name}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    want = _trainer_evals(list(runs))
    sets = [a for f in smoke_data for a in ("--set", f)]
    for run in runs:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "-m", "loopstack.cli", "eval", str(run), *sets], capture_output=True, text=True,
                             cwd=ROOT, env=_env(), timeout=400)
        assert out.returncode == 0, f"{run.name}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        got = json.loads((run / "eval" / "step_3.json").read_text())
        assert got == want[run], (run.name, got, want[run])
    # one process reads both TP ranks' module files of the TP=2 ZeRO-0 run (`loopstack eval` falls back to tp = 1)
    run = tmp_path / "tp2-z0"
    out = subprocess.run([sys.executable, "-m", "loopstack.cli", "eval", str(run), *sets], capture_output=True,
                         text=True, cwd=ROOT, env=_env(), timeout=400)
    assert out.returncode == 0 and "evaluating with tp = 1" in out.stdout, out.stderr[-3000:]
    got = json.loads((run / "eval" / "step_3.json").read_text())["loss_vs_loops"]
    for loops, loss in want[run]["loss_vs_loops"].items():  # TP=1 sums in another order: fp32 rounding only
        assert got[loops] == pytest.approx(loss, rel=1e-5), (loops, got, want[run])

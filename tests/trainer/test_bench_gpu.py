"""`python -m benchmarks.gpu --tiny`: the GPU benchmark's one command, end to end on CPU.

The tiny mode runs the code paths of the H200 run with tiny models: the smoke phase (bf16 steps of a variant
through `pretrain.train.run`, a checkpoint, a resumed run in another directory), the throughput rows (trainer steps
of both presets with per-loop checkpointing, the bare PyTorch loop, the shared-vs-unrolled pair) in child processes,
and the results file. The file must be well formed: device and versions, every row measured, FLOPs and the
shared/unrolled shape check consistent, the three targets computed (not judged: tiny models on a CPU say nothing
about them). Dynamo stays disabled as in the rest of the suite (tests/conftest.py), so the compile is a no-op here.
A second, in-process check: a budget too small for anything still writes the file, every item skipped with a note,
and a tiny run may not write the committed GPU results file. A third: the verdicts a GPU run writes, from rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu
from loopstack.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _data_dir(smoke_data: list[str]) -> Path:
    return Path(smoke_data[0].split("=", 1)[1]).parent  # tokenizer.dir=<data>/tokenizer


def test_tiny_benchmark_writes_a_complete_results_file(smoke_data, tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--tiny", "--out", str(out), "--data", str(_data_dir(smoke_data)),
           "--budget-s", "400", "--variants", "parcae"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"wrote {out}" in proc.stdout
    record = json.loads(out.read_text())
    assert record["benchmark"] == "gpu" and record["commit"] not in ("", "unknown")
    res = record["results"]
    assert res["mode"] == "tiny" and res["ok"] and res["elapsed_s"] < res["budget_s"]
    device = res["device"]
    assert device["name"] == "cpu" and device["backend"] == "gloo (ok)" and device["peak_bf16_flops"] is None
    assert {"torch", "deepspeed", "megatron-core", "python"} <= set(device["versions"])

    # smoke (one variant here; the GPU run takes all): 4 steps, and the run resumed from step 2 repeated steps 3 and 4
    # exactly (CPU)
    smoke = res["smoke"]["variants"]
    assert sorted(smoke) == ["parcae"]
    for variant, s in smoke.items():
        assert s["status"] == "ok", (variant, s)
        assert len(s["losses"]) == 4 and s["resumed_losses"] == s["losses"][2:] and s["max_rel_diff"] == 0.0

    rows = {r["name"]: r for r in res["throughput"]}
    assert all(r["status"] == "ok" for r in rows.values()), [(n, r.get("error")) for n, r in rows.items()]
    assert {r["kind"] for r in rows.values()} == {"loopstack", "bare"}
    for r in rows.values():
        assert r["steps_measured"] == 2 and r["warmup_steps"] == 1 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s_median"])
        assert r["model_tflops"] == pytest.approx(r["tokens_per_s"] * r["model_flops_per_token"] / 1e12)
        assert r["mfu"] is None and r["hfu"] is None  # no peak FLOP/s on a CPU
        recomputed = r["hardware_flops_per_token"] > r["model_flops_per_token"]
        assert recomputed == (r["activation_checkpointing"] == "loop"), r["name"]
    bare = next(r for r in rows.values() if r["kind"] == "bare")
    ref = next(r for r in rows.values() if "bare_ref" in r["tags"])
    assert bare["model_flops_per_token"] == ref["model_flops_per_token"] and bare["params"] == ref["params"]
    assert ref["variant"] == "parcae" and ref["layers"] == [1, 2, 1]  # the ~1B preset's shape, shrunk

    targets = res["targets"]
    assert set(targets) == {"mfu_1b", "looped_over_unrolled_tokens_per_s", "loopstack_over_bare_step_time"}
    assert targets["mfu_1b"]["value"] is None
    assert targets["loopstack_over_bare_step_time"]["value"] == pytest.approx(
        ref["step_s_median"] / bare["step_s_median"])
    (pair,) = targets["looped_over_unrolled_tokens_per_s"]["pairs"]
    assert pair["flops_equal"] and pair["layer_shapes_equal"] and pair["params_unexplained"] == 0
    assert pair["layers"] == [4, 4]  # 2 loops x 2 layers, shared, against 4 layers of their own
    assert all(t["met"] is None for t in targets.values())  # tiny: computed, not judged
    assert res["docmask_flex_over_sdpa"]["value"] > 0  # both packed-document rows ran (flex and the dense mask)


def test_budget_and_results_file_guards(smoke_data, tmp_path, capsys):
    with pytest.raises(UserError, match="holds full GPU results only"):
        gpu.main(["--tiny", "--out", str(gpu.RESULT)])
    with pytest.raises(UserError, match="unknown variant 'flat'"):
        gpu.main(["--tiny", "--variants", "flt,flat"])
    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--out", str(out), "--data", str(_data_dir(smoke_data)), "--budget-s", "0.5"]) == 1
    res = json.loads(out.read_text())["results"]
    assert not res["ok"]
    rows = res["throughput"] + list(res["smoke"]["variants"].values())
    assert rows and all(r["status"] == "skipped" and "budget" in r["note"] for r in rows)


def test_targets_are_judged_from_the_tagged_rows():
    """The three verdicts a GPU run writes (tiny runs never judge): from the rows tagged for them, skipped rows
    giving no value; the unrolled pair's shape check counts the parameters the unrolled copies add."""
    layer = ["attn.wq.weight 8x8", "mlp_norm.weight 8"]  # 72 parameters per layer

    def row(name, kind="loopstack", tags=(), **kw):
        return {"name": name, "kind": kind, "tags": list(tags), "status": "ok", "mfu": None, **kw}

    rows = [row("gpu-1b loops=8 ckpt=loop", tags=("mfu_1b", "bare_ref"), mfu=0.52, step_s_median=1.05),
            row("gpu-1b loops=8 ckpt=loop [bare]", "bare", ("bare",), step_s_median=1.0),
            row("gpu-1b loops=4 ckpt=none", mfu=0.55),
            row("looped", tags=("looped_pair:125m",), tokens_per_s=90.0, model_flops_per_token=5.0, loops=4,
                layers=[0, 2, 0], params=1000, core_layer_shapes=[layer]),
            row("unrolled", tags=("unrolled_pair:125m",), tokens_per_s=100.0, model_flops_per_token=5.0, loops=1,
                layers=[0, 8, 0], params=1000 + 6 * 72, core_layer_shapes=[layer])]
    t = gpu.compute_targets(rows)
    assert t["mfu_1b"]["value"] == 0.52 and t["mfu_1b"]["met"] is True
    assert t["mfu_1b"]["best"] == {"row": "gpu-1b loops=4 ckpt=none", "mfu": 0.55}
    assert t["loopstack_over_bare_step_time"]["value"] == pytest.approx(1.05)
    assert t["loopstack_over_bare_step_time"]["met"] is True
    lo = t["looped_over_unrolled_tokens_per_s"]
    assert lo["value"] == pytest.approx(0.9) and lo["met"] is False
    assert lo["pairs"][0]["flops_equal"] and lo["pairs"][0]["params_unexplained"] == 0
    assert lo["pairs"][0]["layers"] == [8, 8]

    rows[1]["status"] = "skipped"  # no bare row: no ratio, no verdict
    t = gpu.compute_targets(rows, judged=False)
    assert t["loopstack_over_bare_step_time"]["value"] is None
    assert all(v["met"] is None for v in t.values())

"""The one-process checkpoint loader (`pretrain.inference.load_run`) and `loopstack generate` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer.conftest import ROOT


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "loopstack.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny random-weight runs (FLT; Parcae with a random h_0), made in this process."""
    from pretrain.distributed import shutdown
    from tests.use_helpers import make_run

    base = tmp_path_factory.mktemp("inference")
    made = {v: make_run(base, v) for v in ("flt", "parcae")}
    yield made
    shutdown()


def test_load_run_gives_the_saved_model(runs, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from loopstack.errors import UserError
    from pretrain.inference import load_run
    from pretrain.weights import save_whole_checkpoint

    run = runs["parcae"]
    saved = load_file(run / "checkpoints" / "0" / "model.safetensors")
    meta = json.loads((run / "checkpoints" / "0" / "COMPLETE").read_text())
    for source in (run, run / "checkpoints" / "0"):
        loaded = load_run(source)
        state = loaded.model.state_dict()
        assert set(saved) <= set(state) and all(torch.equal(state[k], v) for k, v in saved.items())
        assert loaded.step == 0 and not loaded.model.training and loaded.run_dir == run
        assert loaded.model._noise_seed == meta["noise_seed"]  # the random h_0 the weights were made with
    bf16 = load_run(run, dtype="bf16").model
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    save_whole_checkpoint(copy, {k: v + 1 for k, v in saved.items()}, meta["config"], meta["tokenizer_sha256"],
                          step=5, noise_seed=meta["noise_seed"])
    assert load_run(copy).step == 5 and load_run(copy, step=0).step == 0
    with pytest.raises(UserError, match=r"no complete checkpoint of step 7 \(there are: 0, 5\)"):
        load_run(copy, step=7)
    # a byte flipped in place in the newest: skipped with a message; asked for by step: refused in one line
    path = copy / "checkpoints" / "5" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    seen = []
    assert load_run(copy, warn=seen.append).step == 0 and "skipping damaged checkpoint" in seen[0]
    with pytest.raises(UserError, match="damaged checkpoint: .*content differs"):
        load_run(copy, step=5)
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path)


def test_generate_cli(runs, tmp_path):
    """Greedy generation through the CLI equals `generate_batch` on the loaded model; --json records; prompt files;
    bad flags are one line."""
    from pretrain.inference import load_run
    from pretrain.models.generate import generate_batch

    run = runs["flt"]
    prompts = ["ab,cd;a1=", "abcdef,gh;b2="]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[1:]))
    out = _cli("generate", str(run), "--prompt", prompts[0], "--prompt-file", str(tmp_path / "p.jsonl"),
               "--max-new-tokens", "6", "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    loaded = load_run(run)
    tok = loaded.tokenizer
    want = generate_batch(loaded.model, [tok.encode(p) for p in prompts], 6, eos_id=tok.eos_id)
    assert [r["prompt"] for r in records] == prompts
    assert [r["tokens"] for r in records] == want.tokens
    assert [r["completion"] for r in records] == [tok.decode(t) for t in want.tokens]
    assert all(r["loops"] == [3] * len(r["tokens"]) for r in records)
    assert "tokens/s" in out.stderr and "loops per token" in out.stderr
    text = _cli("generate", str(run), "--prompt", prompts[0], "--max-new-tokens", "6", "--temperature", "0")
    assert text.returncode == 0 and text.stdout.startswith(prompts[0] + records[0]["completion"])
    for bad, msg in ((["--top-p", "0"], "--top-p 0.0: out of range"),
                     (["--prompt-file", str(tmp_path / "none.txt")], "cannot read"),
                     (["--step", "9"], "no complete checkpoint of step 9")):
        out = _cli("generate", str(run), "--prompt", "a", *bad)
        assert out.returncode == 2 and msg in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": 1}\n')
    out = _cli("generate", str(run), "--prompt-file", str(tmp_path / "bad.jsonl"))
    assert out.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:2: expected an object" in out.stderr


def test_init_from_starts_a_run_from_another_runs_weights(smoke_data, tmp_path):
    """`train.init_from`: a TP=2 ZeRO-1 run on 2 processes starts from a 1-process run's weights (resplit for
    TP=2); with lr 0 its first checkpoint's whole fp32 masters are the source's weights exactly. A source whose
    model does not fit is refused in one line naming the config difference."""
    from pretrain.distributed import shutdown
    from pretrain.inference import load_run
    from tests.trainer.conftest import run_train

    src, dst = tmp_path / "src", tmp_path / "dst"
    run_train(1, src, smoke_data + ["train.steps=2", "checkpoint.every=2"])
    out = run_train(2, dst, smoke_data + ["train.steps=1", "checkpoint.every=1", "train.lr=0", "train.muon_lr=0",
                                          "parallel.tp=2",
                                          "parallel.zero_stage=1", f"train.init_from={src}"])
    assert f"init_from: weights of {src / 'checkpoints' / '2'} (step 2)" in out.stdout
    try:
        want = load_run(src).model.state_dict()
        got = load_run(dst).model.state_dict()  # its two TP ranks' module files, merged
    finally:
        shutdown()
    assert set(got) == set(want)
    for name, value in want.items():
        assert value is None or torch.equal(got[name], value), name
    bad = run_train(1, tmp_path / "bad", smoke_data + ["train.steps=1", "model.d_model=128",
                                                       f"train.init_from={src}"], expect=2)
    assert "model.d_model: 64 -> 128" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_generate_cli_with_adaptive_depth(tmp_path):
    """`generate --exit-threshold` (learned exit gate) and `--kv-sharing` (Mixture-of-Recursions) through the CLI equal
    `generate_batch` on the loaded model, loops per token included; each flag on the wrong model is one line."""
    from pretrain.inference import load_run
    from pretrain.models.generate import generate_batch
    from tests.use_helpers import make_run

    gate = make_run(tmp_path, "flt", name="gate", exit_gate=True)
    routed = make_run(tmp_path, "flt", name="routed", router="expert_choice", n_prelude=1, n_coda=1)
    prompt = "ab,cd;a1="
    for run, flags, kw in ((gate, ["--exit-threshold", "0.5"], dict(exit_threshold=0.5)),
                           (routed, ["--kv-sharing"], dict(kv_sharing=True))):
        out = _cli("generate", str(run), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0", "--json",
                   *flags)
        assert out.returncode == 0, out.stderr[-2000:]
        record = json.loads(out.stdout)
        loaded = load_run(run)
        want = generate_batch(loaded.model, [loaded.tokenizer.encode(prompt)], 6, eos_id=loaded.tokenizer.eos_id,
                              **kw)
        assert record["tokens"] == want.tokens[0] and record["loops"] == want.loops_used[0]
    for run, flag, msg in ((gate, "--kv-sharing", "no router"),
                           (routed, "--exit-threshold=0.5", "without the learned exit gate")):
        out = _cli("generate", str(run), "--prompt", prompt, flag)
        assert out.returncode == 2 and msg in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr

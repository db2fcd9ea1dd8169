"""`loopstack harness`: the lm-evaluation-harness adapter scores what the model's own logits say, and the command
runs local tasks (tests/data/harness: k-hop lookups in the synthetic character alphabet) at several loop counts.

The adapter's numbers are checked against log-probabilities computed here directly from `model(tokens).logits`
(one sequence at a time, no padding), on tiny random-weight runs (`tests.use_helpers.make_run`) of a deterministic
variant and of the two random-h_0 variants (Huginn, Parcae), whose eval-mode noise must make right padding harmless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loopstack.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "data" / "harness"
PROMPTS = [json.loads(line)["query"] for line in (TASKS / "khop.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One loaded tiny run per variant (window: data.seq_len = 32 tokens); a one-process TP=1 setup for the
    module, torn down after it. One intra-op thread: models this small only lose time synchronising threads (seconds
    per test on a busy machine)."""
    from pretrain.distributed import shutdown
    from pretrain.inference import load_run
    from tests.use_helpers import make_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("harness-runs")
    try:
        yield {v: load_run(make_run(base, v), dtype="fp32", device="cpu") for v in ("flt", "huginn", "parcae")}
    finally:
        torch.set_num_threads(threads)
        shutdown()


def adapter(loaded, loops: int, batch_size: int = 8, max_length: int | None = None):
    from pretrain.harness import LoopstackLM

    return LoopstackLM(loaded.model, loaded.tokenizer, loops=loops, batch_size=batch_size,
                       max_length=max_length or loaded.cfg.data.seq_len)


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@torch.no_grad()
def direct_logprobs(model, ids: list[int], loops: int) -> torch.Tensor:
    """[len(ids) - 1, V] log-probabilities of each next token, from one unpadded forward."""
    logits = model(torch.tensor([ids[:-1]]), loops=loops).logits[0, :, :model.vocab_size]
    return F.log_softmax(logits.float(), dim=-1)


def direct_score(model, ctx: list[int], cont: list[int], loops: int, window: int) -> tuple[float, bool]:
    ids = (ctx + cont)[-(window + 1):]  # the window's worth of context before the continuation, as lm-eval cuts
    lp = direct_logprobs(model, ids, loops)[-len(cont):]
    target = torch.tensor(cont)
    return float(lp[torch.arange(len(cont)), target].sum()), bool((lp.argmax(-1) == target).all())


def mc_requests() -> list[tuple[str, str]]:
    """(context, continuation) pairs of many lengths: short and long prompts (some longer than the 32-token window,
    so they are cut from the left), one- and multi-token continuations, and an empty context."""
    pairs = []
    for i, prompt in enumerate(PROMPTS[:4]):
        ctx = prompt[-(4 + 11 * i):]  # 4 .. 37 characters (= tokens: the tokenizer is per character)
        pairs += [(ctx, "a"), (ctx, "k"), (ctx, "b,c")]
    pairs.append(("", "ab,cd"))
    return pairs


@pytest.mark.parametrize("variant", ["flt", "huginn", "parcae"])
def test_loglikelihood_equals_direct_logprobs(runs, variant):
    """Every (context, continuation): the adapter's log-likelihood is the sum of the model's log-probabilities of the
    continuation's tokens (an empty context is conditioned on EOS), is_greedy is whether each is the argmax; batched
    (right-padded, mixed lengths) equals one request at a time; the loop count reaches the model."""
    loaded = runs[variant]
    tok, model, window = loaded.tokenizer, loaded.model, loaded.cfg.data.seq_len
    pairs = mc_requests()
    reqs = instances("loglikelihood", pairs)
    batched = adapter(loaded, 3, batch_size=8).loglikelihood(reqs, disable_tqdm=True)
    single = adapter(loaded, 3, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), got, one in zip(pairs, batched, single, strict=True):
        ctx_ids = tok.encode(ctx) if ctx else [tok.eos_id]
        want = direct_score(model, ctx_ids, tok.encode(cont), 3, window)
        assert got[0] == pytest.approx(want[0], abs=1e-4), (ctx, cont)
        assert got[1] == want[1], (ctx, cont)
        assert got[0] == pytest.approx(one[0], abs=1e-4) and got[1] == one[1], (ctx, cont)
    at_one = adapter(loaded, 1).loglikelihood(reqs, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(at_one, batched, strict=True)) > 1e-3


def test_is_greedy_true_for_the_models_own_continuation(runs):
    """A continuation made of the model's own argmax tokens is greedy; changing its last token makes it not."""
    loaded = runs["huginn"]
    tok, model = loaded.tokenizer, loaded.model
    ctx = tok.encode(PROMPTS[0][-20:])
    ids = list(ctx)
    for _ in range(3):  # greedy continuation, computed without the adapter
        ids.append(int(direct_logprobs(model, ids + [0], 2)[-1].argmax()))
    greedy = tok.decode(ids[len(ctx):])
    other = greedy[:-1] + next(c for c in "abcdefgh" if c != greedy[-1])
    results = adapter(loaded, 2).loglikelihood(instances("loglikelihood", [(tok.decode(ctx), greedy),
                                                                           (tok.decode(ctx), other)]),
                                               disable_tqdm=True)
    assert [r[1] for r in results] == [True, False]
    assert results[0][0] > results[1][0]


@pytest.mark.parametrize("variant", ["flt", "parcae"])
def test_rolling_equals_direct_windows(runs, variant):
    """loglikelihood_rolling of texts longer than the 32-token window = the sum over lm-eval's rolling windows (first:
    EOS + tokens[0:31] predicting tokens[0:32]; then each window predicts the next up-to-32 tokens with the 32 tokens
    before them as input), computed here one window at a time."""
    loaded = runs[variant]
    tok, model, L = loaded.tokenizer, loaded.model, loaded.cfg.data.seq_len
    texts = [PROMPTS[0] + PROMPTS[1] + "k", PROMPTS[2][:20], PROMPTS[3] * 2]  # 81, 20 and 78 tokens

    def windowed(toks: list[int]) -> float:
        total = float(direct_logprobs(model, [tok.eos_id] + toks[:L], 3)[torch.arange(min(L, len(toks))),
                                                                          torch.tensor(toks[:L])].sum())
        done = min(L, len(toks))
        while done < len(toks):
            n = min(L, len(toks) - done)
            end = done + n
            lp = direct_logprobs(model, toks[end - L - 1:end], 3)[-n:]
            total += float(lp[torch.arange(n), torch.tensor(toks[end - n:end])].sum())
            done = end
        return total

    got = adapter(loaded, 3).loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]),
                                                   disable_tqdm=True)
    assert len(tok.encode(texts[0])) > 2 * L
    for text, value in zip(texts, got, strict=True):
        assert value == pytest.approx(windowed(tok.encode(text)), abs=1e-3)


@pytest.mark.parametrize("variant", ["flt", "huginn"])
def test_generate_until_is_greedy_and_stops(runs, variant):
    """generate_until = the greedy tokens of an uncached forward per step, ended at EOS or max_gen_toks and cut at
    the first stop string; prompts of different lengths in one batch."""
    loaded = runs[variant]
    tok, model = loaded.tokenizer, loaded.model
    prompts = [PROMPTS[0][-10:], PROMPTS[1][-14:], PROMPTS[2][-6:]]

    def greedy(prompt: str, n: int) -> str:
        ids = tok.encode(prompt)
        new = []
        for _ in range(n):
            nxt = int(direct_logprobs(model, ids + [0], 2)[-1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
            new.append(nxt)
        return tok.decode(new)

    full = [greedy(p, 6) for p in prompts]
    stop = full[0][2] if len(full[0]) > 2 else ","  # a character the first prompt generates: its text is cut there
    gen_kwargs = {"until": [stop], "max_gen_toks": 6, "do_sample": False}
    got = adapter(loaded, 2).generate_until(instances("generate_until", [(p, dict(gen_kwargs)) for p in prompts]),
                                           disable_tqdm=True)
    assert got == [f.split(stop)[0] for f in full]
    assert len(got[0]) < len(full[0]) or stop == ","


def test_merge_and_table():
    """Results of a step merge across runs with the same --limit (other loop counts and tasks are added, a recomputed
    one replaced); another --limit starts over. The table has one line per task and metric, values @ loops."""
    from pretrain.harness import format_table, main_metric, merge_record

    old = {"limit": 8, "lm_eval_version": "x", "tasks": ["a"], "command": "c1", "samples": {"a": 8},
           "loops": {"1": {"a": {"acc": 0.1, "acc_stderr": 0.01}}, "4": {"a": {"acc": 0.4}}}}
    new = {"limit": 8, "lm_eval_version": "x", "tasks": ["b"], "command": "c2", "samples": {"b": 8},
           "loops": {"1": {"b": {"acc_norm": 0.2}}, "4": {"a": {"acc": 0.5}}, "2": {"b": {"acc_norm": 0.3}}}}
    merged = merge_record(old, new)
    assert merged["loops"] == {"1": {"a": {"acc": 0.1, "acc_stderr": 0.01}, "b": {"acc_norm": 0.2}},
                               "2": {"b": {"acc_norm": 0.3}}, "4": {"a": {"acc": 0.5}}}
    assert list(merged["loops"]) == ["1", "2", "4"] and merged["tasks"] == ["a", "b"]
    assert merged["commands"] == ["c1", "c2"]
    assert merge_record(old, {**new, "limit": None}) == {**new, "limit": None}
    table = format_table(merged).splitlines()
    assert table[0].split() == ["a", "acc", "0.1000", "@1", "-", "@2", "0.5000", "@4"]
    assert len(table) == 2 and table[1].split()[:2] == ["b", "acc_norm"]
    assert main_metric({"acc_stderr": 0.1, "word_perplexity": 3.0, "bits_per_byte": 1.0}) == "bits_per_byte"


def test_missing_lm_eval_is_one_line(monkeypatch):
    from pretrain.harness import run_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    args = Namespace(run="x", step=None, tasks="t", include_path=None, loops=None, limit=None, batch_size=8,
                     out=None, dtype=None)
    with pytest.raises(UserError, match="pip install lm-eval"):
        run_harness(args)


def test_local_task_with_a_missing_file_is_one_line(tmp_path):
    """A task YAML whose data file is missing (relative names resolve against the include directory) is refused in
    one line naming the task and the file, before any model is loaded."""
    from pretrain.harness import _lm_eval_context, resolve_tasks

    text = (TASKS / "khop_mc.yaml").read_text().replace("task: khop_mc", "task: lost_mc")
    (tmp_path / "lost_mc.yaml").write_text(text.replace("test: khop.jsonl", "test: lost.jsonl"))
    with _lm_eval_context(tmp_path), pytest.raises(UserError, match=r"--tasks lost_mc: .*lost\.jsonl") as err:
        resolve_tasks(["lost_mc"], tmp_path, verbose=False)
    assert str(tmp_path / "lost.jsonl") in str(err.value) and "\n" not in str(err.value)
    assert Path.cwd() != tmp_path  # the working directory is restored


def harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loopstack.cli", "harness", *args]


def harness_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_cli_runs_local_tasks_at_each_loop_count(tmp_path):
    """End to end in a subprocess, from another working directory (the task YAMLs name their jsonl relative to the
    include path): multiple-choice, rolling and generation tasks at loops 1 and 3; the JSON has each task's metrics
    at each loop count, latest.json the same, the plot exists; an unknown task is one line (exit 2)."""
    from tests.use_helpers import make_run

    run = make_run(tmp_path, "huginn")
    env = harness_env(tmp_path)
    # the unknown-task check indexes lm-eval's own tasks (~15 s): run it alongside
    unknown = subprocess.Popen(harness_cmd(str(run), "--tasks", "nonexistent", "--include-path", str(TASKS)),
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(harness_cmd(str(run), "--tasks", "khop_mc,khop_ppl,khop_gen", "--include-path", str(TASKS),
                                      "--loops", "1,3", "--limit", "8"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "harness" / "step_0.json").read_text())
    assert sorted(record["loops"]) == ["1", "3"]
    for count in ("1", "3"):
        tasks = record["loops"][count]
        assert 0.0 <= tasks["khop_mc"]["acc"] <= 1.0
        assert tasks["khop_ppl"]["bits_per_byte"] > 0
        assert 0.0 <= tasks["khop_gen"]["exact_match"] <= 1.0
    assert record["loops"]["1"]["khop_ppl"] != record["loops"]["3"]["khop_ppl"]  # the loop count reaches the model
    assert record["step"] == 0 and record["limit"] == 8 and record["trained_loops"] == 3
    assert record["samples"] == {"khop_mc": 8, "khop_ppl": 8, "khop_gen": 8}
    assert record["lm_eval_version"] and "--loops 1,3" in record["command"]
    assert json.loads((run / "harness" / "latest.json").read_text()) == record
    assert (run / "harness" / "step_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("khop_mc") and "@1" in line and "@3" in line for line in proc.stdout.splitlines())
    assert str(run / "harness" / "step_0.json") in proc.stdout

    out, err = unknown.communicate(timeout=300)
    assert unknown.returncode == 2, err[-3000:]
    assert err.strip().count("\n") == 0 and "unknown task nonexistent" in err and "Traceback" not in err

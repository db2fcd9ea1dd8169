"""`loopstack eval RUN --task ...`: answer accuracy by depth on the synthetic tasks.

End to end: `data synth --task parity`, a real 30-step training of a tiny model, then the eval through the CLI
(table, JSON, plot; the trained depth read from the run's manifests). The measurement itself is checked against a
direct computation (one unpadded problem at a time, argmax of the logits at `=`), on random-weight runs
(`tests.use_helpers.make_run`) including a Huginn model, whose random h_0 depends on position.
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

from tests.trainer.conftest import ROOT, run_train

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
PARITY_FLAGS = ["data.sources=[]", "model.d_model=32", "data.seq_len=32", "train.steps=30", "checkpoint.every=100",
                "eval.batches=1", "eval.loops=[1]", "parallel.zero_stage=0", "logging.diagnostics_every=0"]


def eval_cli(run: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "loopstack.cli", "eval", str(run), *args], capture_output=True,
                         text=True, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode == expect, f"exit {out.returncode}, want {expect}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one `loopstack: error:` line of a refused command (library warnings aside), and no traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("loopstack: error: "), out.stderr
    return errors[0]


@pytest.fixture(scope="module")
def group():
    """make_run / load_run start a one-process group here; torn down so later test modules start clean."""
    from pretrain.distributed import shutdown

    yield
    shutdown()


def direct_correct(model, tokenizer, pairs, loops: int, context: list[int]) -> list[bool]:
    """Per problem, alone and unpadded: is the argmax of the logits at the `=` position the answer token?"""
    result = []
    with torch.no_grad():
        for prompt, answer in pairs:
            ids = torch.tensor([[*context, *tokenizer.encode(prompt)]])
            (answer_id,) = tokenizer.encode(answer)
            logits = model(ids, loops=loops).logits
            result.append(int(logits[0, -1].argmax()) == answer_id)
    return result


@pytest.mark.parametrize("variant", ["flt", "huginn"])
def test_accuracy_is_the_argmax_at_the_equals_sign(group, tmp_path, variant):
    from data_pipeline.synth import problems
    from pretrain.inference import load_run
    from pretrain.taskeval import accuracy_table, answer_correct, encode_problems
    from tests.use_helpers import make_run

    loaded = load_run(make_run(tmp_path, variant, scale=0.3), warn=lambda m: None)
    model, tok = loaded.model, loaded.tokenizer
    context = [tok.eos_id]
    table = accuracy_table(model, tok, "khop", [1, 10], [1, 3], 10, seed=5, size=6, batch_size=4, context=context)
    for depth in (1, 10):  # depth 10: a two-digit hop count, a longer prompt
        pairs = problems("khop", depth, 10, seed=5, size=6)
        for loops in (1, 3):
            assert table[depth][loops] == sum(direct_correct(model, tok, pairs, loops, context)) / 10

    # problems of different lengths in one right-padded batch: each problem's verdict is its unpadded one
    pairs = [p for d in (1, 10, 2, 12) for p in problems("khop", d, 4, seed=1, size=6)]
    encoded = encode_problems(tok, pairs, context)
    assert len({len(p) for p, _ in encoded}) == 2
    got = answer_correct(model, encoded, 2, batch_size=16).tolist()
    assert got == direct_correct(model, tok, pairs, 2, context)
    # the comparison can fail: with every answer replaced by the model's own argmax, all count as correct, and
    # with it replaced by any other token, none do
    with torch.no_grad():
        own = [int(model(torch.tensor([p]), loops=2).logits[0, -1].argmax()) for p, _ in encoded]
    assert answer_correct(model, [(p, [a]) for (p, _), a in zip(encoded, own, strict=True)], 2).all()
    assert not answer_correct(model, [(p, [(a + 1) % tok.vocab_size]) for (p, _), a in
                                      zip(encoded, own, strict=True)], 2).any()


def test_multi_token_answers_are_exact_match(group, tmp_path):
    """A longer answer counts only when the greedy continuation reproduces every token of it."""
    from pretrain.inference import load_run
    from pretrain.taskeval import answer_correct
    from tests.use_helpers import make_run

    model = load_run(make_run(tmp_path, scale=0.3), warn=lambda m: None).model
    prompt = [2, 10, 11, 12]
    greedy = model.generate(torch.tensor([prompt]), 3, loops=2)[0, len(prompt):].tolist()
    assert answer_correct(model, [(prompt, greedy)], 2).item()
    wrong_last = [*greedy[:2], (greedy[2] + 1) % 43]
    assert not answer_correct(model, [(prompt, wrong_last)], 2).item()


def test_synth_problems_are_the_held_out_documents(tmp_path):
    """`synth.problems` gives back, split at `=`, exactly what `data synth` wrote into its eval split."""
    from data_pipeline.synth import problems, synthesize
    from data_pipeline.tokenizer import load_tokenizer
    from tests.data_pipeline.test_prepare import shard_documents

    synthesize("prefix_sum", tmp_path, train_depth=2, eval_depth=4, train_docs=20, eval_docs=6, size=0, seed=3,
               verbose=False)
    tok = load_tokenizer(tmp_path / "tokenizer")
    docs = [tok.decode(d[:-1]) for d in shard_documents(tmp_path / "eval")]
    pairs = [p for d in (3, 4) for p in problems("prefix_sum", d, 6, seed=3, size=16)]
    assert sorted(docs) == sorted(a + b for a, b in pairs)
    assert all(a.endswith("=") and len(b) == 1 for a, b in pairs)


def test_eval_task_end_to_end_on_a_trained_parity_run(tmp_path):
    from data_pipeline.synth import synthesize

    data = tmp_path / "parity"
    synthesize("parity", data, train_depth=3, eval_depth=6, train_docs=600, eval_docs=20, verbose=False)
    run = tmp_path / "run"
    run_train(1, run, [f"tokenizer.dir={data}/tokenizer", f"data.train=[{data}/train]",
                       f"data.eval=[{data}/eval]", *PARITY_FLAGS])
    out = eval_cli(run, "--task", "parity", "--loops", "3,1", "--batches", "2", "--set", "task.batch_size=25")
    record = json.loads((run / "eval" / "task_parity_step_30.json").read_text())
    assert record["task"] == "parity" and record["step"] == 30 and record["n"] == 50
    assert record["train_depth"] == 3 and record["depths"] == [1, 2, 3, 4, 5, 6]  # 1..2 x the manifests' depth
    assert record["loops"] == [1, 3] and record["chance"] == 0.5
    acc = record["accuracy"]
    assert set(acc) == {str(d) for d in range(1, 7)} and all(set(row) == {"1", "3"} for row in acc.values())
    assert all(0 <= v <= 1 and abs(v * 50 - round(v * 50)) < 1e-9 for row in acc.values() for v in row.values())
    lines = out.stdout.splitlines()
    assert any(line.split()[:2] == ["3", "trained"] for line in lines)
    assert any(line.split()[:2] == ["4", "beyond"] for line in lines)
    assert f"{run}/eval/task_parity_step_30.json" in out.stdout and f"{run}/plots/task_parity.png" in out.stdout
    assert (run / "plots" / "task_parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the loss eval's files are left alone; the same command gives the same numbers (seeded problems)
    eval_cli(run, "--task", "parity", "--loops", "1,3", "--batches", "2", "--set", "task.batch_size=25")
    assert json.loads((run / "eval" / "task_parity_step_30.json").read_text())["accuracy"] == acc
    assert (run / "eval" / "step_30.json").exists()


def test_a_run_with_another_tokenizer_is_refused_in_one_line(group, tmp_path):
    from data_pipeline.tokenizer import save_tokenizer, train_sentencepiece
    from loopstack.typed_config import to_dict
    from pretrain.config import config_from_dict, save_config
    from pretrain.inference import init_single_process
    from pretrain.models import build_model
    from pretrain.weights import save_whole_checkpoint

    run = tmp_path / "other"
    other = train_sentencepiece(iter(["the quick brown fox jumps over the lazy dog 0123456789"]), model_type="char",
                                vocab_size=40, character_coverage=1.0, add_dummy_prefix=False, num_threads=1)
    tok = save_tokenizer(other, run / "tokenizer")
    cfg = config_from_dict({"name": "other", "tokenizer": {"dir": str(run / "tokenizer")}, "data": {"seq_len": 32},
                            "model": {"variant": "flt", "loops": 2, "d_model": 32, "n_heads": 2, "n_core": 1}}, "t")
    init_single_process(0)
    model = build_model(cfg.model, cfg.loop, tok.vocab_size, device="cpu")
    save_config(cfg, run / "config.yaml")
    save_whole_checkpoint(run, model.state_dict(), to_dict(cfg), tok.sha256, step=7)
    line = error_line(eval_cli(run, "--task", "khop", expect=2))
    assert f"{run}/checkpoints/7: trained with tokenizer {tok.sha256[:12]}" in line
    assert "not the synth tasks' character tokenizer" in line and "--task khop" in line


def test_trained_depth_from_flags_and_bad_settings(group, tmp_path, capsys):
    """A run whose data manifests say nothing of the task needs --set task.train_depth; wrong settings are one
    line."""
    from loopstack.errors import UserError
    from pretrain.taskeval import run_task_eval
    from tests.use_helpers import make_run

    run = make_run(tmp_path, scale=0.3)

    def args(*sets: str, loops: str = "1,2", task: str = "prefix_sum") -> Namespace:
        return Namespace(run_dir=str(run), checkpoint="auto", loops=loops, task=task, batches=1,
                         overrides=["task.batch_size=8", *sets])

    with pytest.raises(UserError, match=r"holds no `data synth --task prefix_sum` manifest.*task.train_depth=N"):
        run_task_eval(args())
    with pytest.raises(UserError, match=r"only task\.\* settings apply"):
        run_task_eval(args("model.loops=4"))
    with pytest.raises(UserError, match=r"unknown key 'task.depth'"):
        run_task_eval(args("task.depth=3"))
    with pytest.raises(UserError, match=r"--loops 1,x"):
        run_task_eval(args("task.train_depth=2", loops="1,x"))
    with pytest.raises(UserError, match=r"task.max_depth=20: prefix_sum problems have 8 digits"):
        run_task_eval(args("task.train_depth=2", "task.size=8", "task.max_depth=20"))

    assert run_task_eval(args("task.train_depth=2", "task.max_depth=5")) == 0
    record = json.loads((run / "eval" / "task_prefix_sum_step_0.json").read_text())
    assert record["depths"] == [1, 2, 3, 4, 5] and record["size"] == 16 and record["n"] == 8
    assert record["chance"] == 0.1 and record["loops"] == [1, 2]
    assert "1..5 (trained 1..2)" in capsys.readouterr().out


def test_chain_depths_follow_the_datas_size():
    """chain: the data's size bounds (its depth + 5 letters at most) the depths evaluated; unknown, synth's default is
    used for the depths asked; chance is 1/3 (the end of one of the three chains)."""
    from loopstack.errors import UserError
    from pretrain.taskeval import TaskData, chance, parse_task_settings, resolve_depths

    def resolve(data: TaskData, *sets: str):
        return resolve_depths("chain", parse_task_settings(sets), data, Path("run"))

    assert resolve(TaskData(4, 17, 2)) == (4, list(range(1, 9)), 17, 2)  # data synth --eval-depth 12
    assert resolve(TaskData(4, 11, 0))[1] == list(range(1, 7))  # 2 x 4 = 8 > 11 - 5: clipped to 6
    with pytest.raises(UserError, match=r"^--set task.max_depth=8: chain problems have 11 letters.*at most 6$"):
        resolve(TaskData(4, 11, 0), "task.max_depth=8")
    assert resolve(TaskData(None, None, None), "task.train_depth=3")[1:3] == (list(range(1, 7)), 15)
    with pytest.raises(UserError, match=r"^--set task.max_depth=30: chain needs .* at most 21$"):
        resolve(TaskData(None, None, None), "task.train_depth=3", "task.max_depth=30")
    with pytest.raises(UserError, match=r"^--set task.size=27: chain needs 5..26 letters"):
        resolve(TaskData(4, 17, 0), "task.size=27")
    assert chance("chain", 17) == 1 / 3

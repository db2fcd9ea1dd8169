import re

import pytest

from data_pipeline.loader import PackedDataset
from data_pipeline.shards import read_manifest, verify
from data_pipeline.synth import synthesize
from data_pipeline.tokenizer import load_tokenizer
from loopstack.errors import UserError
from tests.data_pipeline.conftest import cli, files_of
from tests.data_pipeline.test_prepare import shard_documents


def solve(task: str, doc: str) -> tuple[int, str]:
    """(depth, answer) recomputed from the problem text alone."""
    if task == "khop":
        pairs, query = doc.split(";")
        f = {p[0]: p[1] for p in pairs.split(",")}
        start, k, _ = re.fullmatch(r"([a-z])(\d+)=([a-z])", query).groups()
        x = start
        for _ in range(int(k)):
            x = f[x]
        return int(k), x
    if task == "prefix_sum":
        digits, query = doc.split(";")
        j = int(query.split("=")[0])
        return j, str(sum(map(int, digits[:j])) % 10)
    bits = doc.split("=")[0]
    return len(bits), str(bits.count("1") % 2)


@pytest.mark.parametrize("task", ["khop", "prefix_sum", "parity"])
def test_synth_tasks_format_depth_split_and_answers(task, tmp_path):
    out = tmp_path / task
    cli("synth", "--task", task, "--out", out, "--train-depth", 3, "--eval-depth", 6, "--train-docs", 300,
        "--eval-docs", 40)
    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == 43 and tok.eos_id == 2
    for split, depths in (("train", {1, 2, 3}), ("eval", {4, 5, 6})):
        m = verify(out / split)
        assert m["tokenizer"]["sha256"] == tok.sha256
        assert {s["name"] for s in m["sources"]} == {f"depth-{d}" for d in depths}
        assert m["documents"] == (300 if split == "train" else 120)
        seen = set()
        for doc in shard_documents(out / split):
            text = tok.decode(doc[:-1])
            depth, answer = solve(task, text)
            assert text.endswith("=" + answer), text
            seen.add(depth)
        assert seen == depths
        ds = PackedDataset([out / split], 16, micro_batch=2, tokenizer_sha256=tok.sha256)
        assert ds.next_batch()["tokens"].max() < tok.vocab_size


def test_synth_is_deterministic_and_validates(tmp_path):
    a = synthesize("khop", tmp_path / "a", train_docs=50, eval_docs=5, verbose=False)
    synthesize("khop", tmp_path / "b", train_docs=50, eval_docs=5, verbose=False)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert a["train"]["tokenizer"]["sha256"] == read_manifest(tmp_path / "b" / "eval")["tokenizer"]["sha256"]
    with pytest.raises(UserError, match="train-depth"):
        synthesize("parity", tmp_path / "c", train_depth=5, eval_depth=5, verbose=False)

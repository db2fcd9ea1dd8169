import hashlib
import re
import string

import pytest

from data_pipeline.loader import PackedDataset
from data_pipeline.shards import read_manifest, verify
from data_pipeline.synth import generate, synthesize
from data_pipeline.tokenizer import load_tokenizer
from loopstack.errors import UserError
from tests.data_pipeline.conftest import cli, files_of, one_line_error
from tests.data_pipeline.test_prepare import shard_documents


def parse_chains(doc: str) -> tuple[list[list[str]], str, str]:
    """(chains as letter lists, query start, answer) of a chain document, checking that its edges form disjoint
    chains: no letter points to two letters or is pointed to twice, and every chain ends (no cycle)."""
    edges, query = doc.split(";")
    start, answer = re.fullmatch(r"([a-z])=([a-z])", query).groups()
    pairs = edges.split(",")
    assert all(len(p) == 2 and p[0] != p[1] for p in pairs), doc
    nxt = {p[0]: p[1] for p in pairs}
    assert len(nxt) == len(pairs) == len({p[1] for p in pairs}), doc
    chains = []
    for head in sorted(set(nxt) - set(nxt.values())):
        chain = [head]
        while chain[-1] in nxt and len(chain) <= len(pairs):
            chain.append(nxt[chain[-1]])
        chains.append(chain)
    assert sum(len(c) for c in chains) == len(set("".join(pairs))), doc  # every letter on exactly one chain
    return chains, start, answer


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
    if task == "chain":
        chains, start, _ = parse_chains(doc)
        (query,) = [c for c in chains if c[0] == start]
        return len(query) - 1, query[-1]
    bits = doc.split("=")[0]
    return len(bits), str(bits.count("1") % 2)


@pytest.mark.parametrize("task", ["khop", "prefix_sum", "parity", "chain"])
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


def test_chain_is_deeper_with_the_same_tokens_and_length(tmp_path):
    """chain at size 17 (the default for --eval-depth 12): three disjoint chains over a..q, the query chain as deep
    as asked and its end the answer, and 14 edges (the same document length) at every depth."""
    lengths = set()
    for depth in (1, 2, 6, 12):
        for doc in generate("chain", depth, 30, seed=4, split="eval", size=17):
            chains, start, answer = parse_chains(doc)
            assert len(chains) == 3 and min(map(len, chains)) >= 2, doc
            assert set(sum(chains, [])) == set(string.ascii_lowercase[:17]), doc
            (query,) = [c for c in chains if c[0] == start]
            assert len(query) == depth + 1 and answer == query[-1], doc
            lengths.add(len(doc))
    assert lengths == {14 * 3 - 1 + 4}  # 14 edges "xy," less the last comma, then ";s=a"
    assert generate("chain", 5, 20, seed=4, split="train", size=17) == \
        generate("chain", 5, 20, seed=4, split="train", size=17)
    assert generate("chain", 5, 20, seed=4, split="train", size=17) != \
        generate("chain", 5, 20, seed=5, split="train", size=17)
    # adding chain left the other tasks' problems as they were (sha256 computed before chain existed)
    khop = "\n".join(generate("khop", 3, 5, seed=1, split="train", size=16))
    assert hashlib.sha256(khop.encode()).hexdigest() == \
        "63bdba8d9645b8937055465b348e56c7087cdf41f332cbb3d9f4c19c65aeba98"
    m = synthesize("chain", tmp_path / "c", train_depth=2, eval_depth=6, train_docs=4, eval_docs=2, verbose=False)
    assert m["train"]["settings"]["size"] == m["eval"]["settings"]["size"] == 15  # default: eval depth + 9
    line = one_line_error(cli("synth", "--task", "chain", "--out", tmp_path / "bad", "--eval-depth", 12, "--size", 10,
                              expect=2))
    assert "--size 10: chain needs 17..26 letters for --eval-depth 12" in line
    with pytest.raises(UserError, match=r"--eval-depth 22: chain .* at most 21"):
        synthesize("chain", tmp_path / "d", train_depth=2, eval_depth=22, verbose=False)

"""Synthetic reasoning tasks where loop depth matters, written in the normal shard format.

Each task has a difficulty `depth`; train holds depths 1..train_depth, eval holds
train_depth+1..eval_depth (generalisation to more steps than seen in training). One document is one
problem, its answer last:

    khop        `ab,bc,...;a3=x`   a permutation of `size` letters as pairs (x maps to y), then start
                                   letter, hop count k = depth, answer f^k(start)
    prefix_sum  `31415926;5=4`     `size` digits, query j = depth, answer sum of the first j mod 10
    parity      `10110=1`          depth bits, answer their parity (length generalisation)
    chain       `ca,fd,bf,ge,eh;b=d`  `size` letters as 3 disjoint pointer chains (xy: x points to y): the
                                   query chain of depth edges (b-f-d) and two distractors of >= 2 letters
                                   (c-a, g-e-h); all edges in random order, then the query chain's start,
                                   answer its last letter

chain exists because khop and prefix_sum name the difficulty in the query (`a3=`, `;5=`), so their held-out
depths carry numbers never seen there in training (and `10`.. as two digits), and parity's difficulty is its
length: none of them asks for more steps with nothing else new. A chain document always has `size - 3` edges,
the same letters and the same length at every depth; only the number of pointers to follow from the start
letter grows. The default size is eval_depth + 9, at most 26 (the deepest query chain plus two distractor chains
of 8 letters together), so all depths of one `data synth` call share one size; at least eval_depth + 5 (two
distractor chains of two letters). A model that only learned to answer with some chain's end (a letter that points
nowhere) is right 1 time in 3. Caveat: at the deepest depth a size allows (size - 5) both distractors are single
edges, so the answer is also "the one end whose chain has two or more edges", two look-ups back from each end; the
default size keeps the distractors longer than that wherever 26 letters allow (eval depths up to 17).

All tasks share one character-level sentencepiece tokenizer over `a-z 0-9 , ; =` (a fixed vocabulary
of 43 ids, ids 0-3 the usual pad/bos/eos/unk), so its sha256 is fixed and tasks can be mixed.
`loopstack data synth --task khop --out DIR` writes DIR/tokenizer, DIR/train and DIR/eval; point
`tokenizer.dir` at DIR/tokenizer and `data.train` / `data.eval` at the splits. Each depth is its own
shard and source (`depth-K`), so the manifests show the split and losses can be read per depth.
Generation is seeded by (seed, task, split, depth): the same command writes the same bytes.
`problems` hands out the same problems as (prompt up to `=`, answer) pairs for the answer-accuracy eval
(`loopstack eval RUN --task TASK`, pretrain/taskeval.py).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np

from data_pipeline import SYNTH_TASKS
from data_pipeline.encode import encode_documents
from data_pipeline.prepare import build_manifest
from data_pipeline.shards import FORMAT, MANIFEST, ShardWriter, manifest_sha, write_stamp
from data_pipeline.tokenizer import Tokenizer, save_tokenizer, train_sentencepiece
from loopstack.errors import UserError
from loopstack.fileio import atomic_write_json

ALPHABET = string.ascii_lowercase + string.digits + ",;="
TASKS = SYNTH_TASKS  # append only: the index seeds each task's generator


def synth_tokenizer() -> bytes:
    """The fixed character-level model (deterministic: same bytes on every call)."""
    return train_sentencepiece(iter([ALPHABET]), model_type="char", vocab_size=len(ALPHABET) + 4,
                               character_coverage=1.0, normalization_rule_name="identity",
                               add_dummy_prefix=False, remove_extra_whitespaces=False, num_threads=1)


def _khop(rng: np.random.Generator, depth: int, size: int) -> str:
    letters = np.array(list(string.ascii_lowercase[:size]))
    perm = rng.permutation(size)
    order = rng.permutation(size)
    pairs = ",".join(letters[i] + letters[perm[i]] for i in order)
    start = x = int(rng.integers(size))
    for _ in range(depth):
        x = int(perm[x])
    return f"{pairs};{letters[start]}{depth}={letters[x]}"


def _prefix_sum(rng: np.random.Generator, depth: int, size: int) -> str:
    digits = rng.integers(0, 10, size)
    return f"{''.join(map(str, digits))};{depth}={int(digits[:depth].sum()) % 10}"


def _parity(rng: np.random.Generator, depth: int, size: int) -> str:
    bits = rng.integers(0, 2, depth)
    return f"{''.join(map(str, bits))}={int(bits.sum()) % 2}"


def _chain(rng: np.random.Generator, depth: int, size: int) -> str:
    """Letters a.. of `size` in random order, cut into the query chain (depth + 1 letters) and two distractor chains
    (the rest, cut at a random point, >= 2 letters each); every edge once, shuffled; answer the query chain's end."""
    if not 1 <= depth <= size - 5:
        raise UserError(f"chain depth {depth} with {size} letters: needs 1 <= depth <= size - 5")
    letters = np.array(list(string.ascii_lowercase[:size]))[rng.permutation(size)]
    rest = size - depth - 1
    cut = depth + 1 + int(rng.integers(2, rest - 1))  # distractors: rest letters as 2..rest-2 and the remainder
    chains = (letters[:depth + 1], letters[depth + 1:cut], letters[cut:])
    edges = [c[i] + c[i + 1] for c in chains for i in range(len(c) - 1)]
    pairs = ",".join(edges[i] for i in rng.permutation(len(edges)))
    return f"{pairs};{chains[0][0]}={chains[0][-1]}"


GENERATORS = {"khop": _khop, "prefix_sum": _prefix_sum, "parity": _parity, "chain": _chain}


def generate(task: str, depth: int, n: int, *, seed: int, split: str, size: int) -> list[str]:
    """`n` problems of one task and depth."""
    rng = np.random.default_rng([seed, TASKS.index(task), 0 if split == "train" else 1, depth])
    return [GENERATORS[task](rng, depth, size) for _ in range(n)]


def problems(task: str, depth: int, n: int, *, seed: int, size: int, split: str = "eval") -> list[tuple[str, str]]:
    """`n` problems of one task and depth as (prompt, answer) pairs: the prompt ends with `=`, the answer is what
    follows it. The same problems `generate` writes into that split (seeded by seed, task, split, depth), so the
    eval split's problems beyond the trained depth are the ones `data synth` held out; `size` as resolved by
    `task_size` (what the data's manifest records under settings.size)."""
    if task not in TASKS:
        raise UserError(f"task {task}: expected one of {', '.join(TASKS)}")
    pairs = []
    for doc in generate(task, depth, n, seed=seed, split=split, size=size):
        cut = doc.rindex("=") + 1
        pairs.append((doc[:cut], doc[cut:]))
    return pairs


def task_size(task: str, size: int, eval_depth: int) -> int:
    """The problem size `synthesize` uses for `--size` (0 = default): khop letters (16, 2..26), prefix_sum
    digits (16, at least `eval_depth`), chain letters (eval_depth + 9 at most 26; eval_depth + 5 to 26 allowed:
    every depth up to eval_depth fits the one size), parity none (depth is the length)."""
    if task == "chain":
        least = eval_depth + 5
        if not size and least > 26:
            raise UserError(f"--eval-depth {eval_depth}: chain needs depth + 5 <= 26 letters: at most 21")
        size = size or min(26, eval_depth + 9)  # >= 8 distractor letters at the deepest depth, when 26 allow it
        if not least <= size <= 26:
            raise UserError(f"--size {size}: chain needs {least}..26 letters"
                            + (f" for --eval-depth {eval_depth}" if eval_depth else "")
                            + " (the query chain's depth + 1 and two distractor chains of at least 2 letters)")
    elif task == "khop":
        size = size or 16
        if not 2 <= size <= 26:
            raise UserError(f"--size {size}: khop needs 2..26 letters")
    elif task == "prefix_sum":
        size = max(size or 16, eval_depth)
    return size


def _write_split(out: Path, tok: Tokenizer, task: str, depths: list[int], counts: list[int], *, seed: int,
                 split: str, size: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok.model_bytes, out / "tokenizer")
    sources = [{"spec": f"synth:{task}:depth={d}", "name": f"depth-{d}", "text_field": ""} for d in depths]
    header = {"format": FORMAT, "tokenizer": tok.meta(), "dtype": tok.dtype,
              "settings": {"sources": sources, "task": task, "split": split, "seed": seed, "size": size,
                           "depths": depths, "documents_per_depth": counts},
              "inputs": {"files": 0, "bytes": 0, "units": len(depths), "plan_sha256": ""}}
    receipts = []
    for unit, (depth, n) in enumerate(zip(depths, counts, strict=True)):
        docs = generate(task, depth, n, seed=seed, split=split, size=size)
        lengths, values = encode_documents(tok, docs, tok.dtype)
        writer = ShardWriter(out, unit, f"depth-{depth}", tok.dtype, 1 << 40, tok.sha256)
        writer.add(lengths, values)
        receipts.append({"unit": unit, "source": f"depth-{depth}", "documents": len(docs), "tokens": len(values),
                         "skipped": {}, "skipped_examples": [], "shards": writer.close()})
    manifest = build_manifest(header, receipts)
    atomic_write_json(out / MANIFEST, manifest)
    write_stamp(out, manifest_sha(out), [s["file"] for s in manifest["shards"]])
    return manifest


def synthesize(task: str, out: str | os.PathLike, *, train_depth: int = 4, eval_depth: int = 8,
               train_docs: int = 20000, eval_docs: int = 500, size: int = 0, seed: int = 0,
               verbose: bool = True) -> dict[str, dict]:
    """Write tokenizer/, train/ (depths 1..train_depth) and eval/ (beyond) under `out`."""
    if task not in TASKS:
        raise UserError(f"--task {task}: expected one of {', '.join(TASKS)}")
    if not 1 <= train_depth < eval_depth:
        raise UserError(f"need 1 <= --train-depth < --eval-depth (got {train_depth}, {eval_depth})")
    size = task_size(task, size, eval_depth)
    out = Path(out)
    tok = save_tokenizer(synth_tokenizer(), out / "tokenizer", {"model_type": "char", "alphabet": ALPHABET})
    train_depths = list(range(1, train_depth + 1))
    per, extra = divmod(train_docs, len(train_depths))
    result = {
        "train": _write_split(out / "train", tok, task, train_depths,
                              [per + (i < extra) for i in range(len(train_depths))], seed=seed, split="train",
                              size=size),
        "eval": _write_split(out / "eval", tok, task, list(range(train_depth + 1, eval_depth + 1)),
                             [eval_docs] * (eval_depth - train_depth), seed=seed, split="eval", size=size),
    }
    if verbose:
        for split, m in result.items():
            print(f"synth {task}: {split} {m['documents']:,} documents, {m['tokens']:,} tokens, depths "
                  f"{m['settings']['depths'][0]}..{m['settings']['depths'][-1]} -> {out / split}", flush=True)
        print(f"synth {task}: set tokenizer.dir={out / 'tokenizer'} data.train=[{out / 'train'}] "
              f"data.eval=[{out / 'eval'}] data.sources=[]", flush=True)
    return result

"""What a `prepare` worker does with one unit: read, encode, append EOS, write its shard and receipt.

Forked workers find everything in the module-level context `_CTX` (set by the parent before forking:
nothing is pickled per task). A unit's output depends on the unit alone, never on which worker or
how many workers build it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.shards import ShardWriter
from data_pipeline.sources import MiB, Source, Unit, read_unit
from data_pipeline.tokenizer import Tokenizer
from loopstack.errors import UserError

BATCH_CHARS = 1 << 20  # characters per encode call (and per Arrow record batch, roughly)
SEGMENT_CHARS = 1 << 20  # longer documents are encoded piecewise, cut at line ends
WORK = ".work"  # receipts of finished units, until the manifest is written
REASONS = {"empty": "empty document", "not_utf8": "not valid UTF-8", "invalid_json": "invalid JSON",
           "not_text": "text field is not a string", "too_large": "document larger than data.max_doc_mb"}


class Context:
    """What workers need; set before forking so nothing is pickled per task."""

    def __init__(self, tok: Tokenizer, sources: list[Source], units: list[Unit], out: Path, header: dict,
                 budget: int, max_doc_bytes: int, bad_documents: str, keys: dict[int, str]):
        self.tok, self.sources, self.units, self.out, self.header = tok, sources, units, out, header
        self.budget, self.max_doc_bytes, self.bad_documents, self.keys = budget, max_doc_bytes, bad_documents, keys
        self.progress = None  # shared counters: documents, tokens, input bytes


_CTX: Context | None = None  # set by the parent, inherited by forked workers


def _segments(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(start + SEGMENT_CHARS, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def encode_documents(tok: Tokenizer, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, tokens): every document encoded and EOS-terminated, concatenated into one array.

    One batched encode call for the documents of a batch; each document's ids (int32 arrays from sentencepiece)
    are copied once, cast on the way, into their slot of the preallocated token array.
    """
    ids = tok.encode_ids([t if len(t) <= SEGMENT_CHARS else "" for t in texts])
    for i, text in enumerate(texts):
        if len(text) > SEGMENT_CHARS:  # bounded work and memory per encode call
            ids[i] = np.concatenate([np.asarray(x, np.int64) for seg in _segments(text) for x in tok.encode_ids([seg])])
    lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    values = np.empty(int(ends[-1]) if len(ends) else 0, np.dtype(dtype))
    values[ends - 1] = tok.eos_id
    for x, end in zip(ids, ends.tolist(), strict=True):
        values[end - 1 - len(x):end - 1] = x
    return lengths, values


def build_unit(index: int) -> dict:
    """Build unit `index` of the context's plan: its shard part(s), then its receipt; returns the receipt."""
    ctx = _CTX
    unit = ctx.units[index]
    src = ctx.sources[unit.source]
    tok, dtype = ctx.tok, ctx.header["dtype"]
    writer = ShardWriter(ctx.out, index, src.name, dtype, ctx.budget, tok.sha256)
    skipped: dict[str, int] = {}
    examples: list[str] = []
    docs = tokens = 0
    batch: list[str] = []
    chars = 0

    def flush() -> None:
        nonlocal docs, tokens, chars
        lengths, values = encode_documents(tok, batch, dtype)
        writer.add(lengths, values)
        docs, tokens = docs + len(lengths), tokens + len(values)
        if ctx.progress is not None:
            with ctx.progress.get_lock():
                ctx.progress[0] += len(lengths)
                ctx.progress[1] += len(values)
                ctx.progress[2] += sum(len(t) for t in batch)
        batch.clear()
        chars = 0

    try:
        for doc in read_unit(unit, src, ctx.max_doc_bytes):
            if doc.bad:
                what = f"{doc.where}: {doc.detail or REASONS[doc.bad]}"
                if ctx.bad_documents == "error":
                    hint = f" = {ctx.max_doc_bytes / MiB:g} (raise it" if doc.bad == "too_large" else " (set"
                    raise UserError(f"{what}{hint} data.bad_documents=skip to skip such documents)")
                skipped[doc.bad] = skipped.get(doc.bad, 0) + 1
                if len(examples) < 10:
                    examples.append(what)
                continue
            batch.append(doc.text)
            chars += len(doc.text)
            if chars >= BATCH_CHARS:
                flush()
        if batch:
            flush()
        parts = writer.close()
    except BaseException:
        writer.abort()
        raise
    receipt = {"unit": index, "source": src.name, "documents": docs, "tokens": tokens,
               "skipped": dict(sorted(skipped.items())), "skipped_examples": examples, "shards": parts}
    _write_receipt(ctx.out / WORK / f"unit-{index:06d}.json", {"key": ctx.keys[index], **receipt})
    return receipt


def _write_receipt(path: Path, receipt: dict) -> None:
    """Write a receipt atomically (temp name + rename) but without fsync: a receipt is only a claim that a resumed
    run checks (every shard it names is hashed again), so one lost or torn by a crash just rebuilds its unit, and
    the shards themselves were fsynced before. Two fsyncs less per unit (of three)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(receipt, indent=1) + "\n")
    os.replace(tmp, path)


def worker_init() -> None:
    """Die with the parent (a killed prepare leaves no orphan writing shards) and ignore Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

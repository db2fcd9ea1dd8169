"""Sentencepiece tokenizers: training from any source, loading, and the sha256 that names them.

A tokenizer directory holds `tokenizer.model` (the sentencepiece proto) and `tokenizer.json` (vocab
size, special ids, sha256 of the .model file, how it was trained). The sidecar is written last, so a
directory with both files is complete. Runs, manifests and checkpoints refer to a tokenizer by that
sha256 only: two files with the same bytes are the same tokenizer wherever they live.

Settings chosen so that `decode(encode(doc)) == doc` for code and prose: identity normalisation, no
whitespace collapsing, no dummy prefix, byte fallback for anything outside the vocabulary, and
whitespace-only pieces (indentation becomes one or two tokens). Newlines stay ordinary characters
(pieces like `):\\n` form), so no user-defined symbols are needed. One sentencepiece limit remains: a
literal U+2581 (the piece-space mark) in the input decodes as a space.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from loopstack.errors import UserError
from loopstack.fileio import atomic_write

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
SENTENCE_CHARS = 1024  # training sentences: documents cut at line ends into pieces this long


class Tokenizer:
    """A loaded sentencepiece model with its identity (sha256) and special ids."""

    def __init__(self, model_bytes: bytes, path: str | None = None):
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.bos_id = self.sp.pad_id(), self.sp.bos_id()
        self.eos_id, self.unk_id = self.sp.eos_id(), self.sp.unk_id()
        self.model_bytes = model_bytes

    @property
    def dtype(self) -> str:
        """Token dtype of the shards: uint16 when every id fits."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def meta(self) -> dict:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "unk_id": self.unk_id}


def tokenizer_exists(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / MODEL_FILE).is_file() and (d / META_FILE).is_file()


def save_tokenizer(model_bytes: bytes, directory: str | os.PathLike, info: dict | None = None) -> Tokenizer:
    """Write model then sidecar (both atomically); the sidecar's presence marks the directory complete."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(model_bytes, str(d))
    atomic_write(d / MODEL_FILE, model_bytes)
    meta = {**tok.meta(), **(info or {})}
    atomic_write(d / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return tok


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer in `directory`; a missing, partial or mismatched one is a UserError."""
    d = Path(directory)
    if not tokenizer_exists(d):
        raise UserError(f"{d}: no tokenizer ({MODEL_FILE} + {META_FILE}); run `loopstack data train-tokenizer`")
    try:
        model_bytes = (d / MODEL_FILE).read_bytes()
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{d}: cannot read tokenizer ({err})") from None
    try:
        tok = Tokenizer(model_bytes, str(d))
    except RuntimeError as err:
        raise UserError(f"{d / MODEL_FILE}: not a sentencepiece model ({err})") from None
    if meta.get("sha256") != tok.sha256:
        raise UserError(f"{d / MODEL_FILE}: sha256 {tok.sha256[:12]} differs from {META_FILE} "
                        f"({str(meta.get('sha256'))[:12]}): the model was replaced or is corrupt")
    return tok


def train_sentencepiece(sentences: Iterator[str], **options) -> bytes:
    """Run the sentencepiece trainer in memory; its errors become one-line UserErrors."""
    model = io.BytesIO()
    opts = dict(minloglevel=2, **SPECIAL_IDS)
    opts.update(options)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, **opts)
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1]
        raise UserError(f"tokenizer training failed: {msg.rpartition('] ')[2] or msg}") from None
    return model.getvalue()


def _sentences(text: str) -> Iterator[str]:
    """Cut a document at line ends into pieces of at most SENTENCE_CHARS (long lines are cut hard)."""
    start, n = 0, len(text)
    while start < n:
        end = min(start + SENTENCE_CHARS, n)
        if end < n:
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def sample_sentences(specs: list[str], text_field: str, max_sentences: int, seed: int = 0) -> list[str]:
    """Up to `max_sentences` training sentences: whole units of the corpus in a seeded random order.

    Reading units (about a shard each) in random order spreads the sample over all files and sources
    without reading a corpus larger than the cap needs.
    """
    from data_pipeline.sources import MiB, parse_source, plan_units, read_unit

    sources = [parse_source(s, text_field) for s in specs]
    units, _ = plan_units(sources, 64 * MiB)
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    out: list[str] = []
    for u in order:
        unit = units[u]
        for doc in read_unit(unit, sources[unit.source], 64 * MiB):
            if doc.text:
                out.extend(_sentences(doc.text))
            if len(out) >= max_sentences:
                return out[:max_sentences]
    return out


def train_tokenizer(specs: list[str], out_dir: str | os.PathLike, *, vocab_size: int, text_field: str = "text",
                    model_type: str = "bpe", max_sentences: int = 2_000_000, byte_fallback: bool = True,
                    split_digits: bool = True, verbose: bool = True) -> Tokenizer:
    """Train a sentencepiece model on `specs` and save it with its sidecar in `out_dir`."""
    if not specs:
        raise UserError("no sources to train a tokenizer on: pass --source (e.g. --source stdlib) or set data.sources")
    sentences = sample_sentences(specs, text_field, max_sentences)
    if not sentences:
        raise UserError(f"no text to train a tokenizer on in {', '.join(specs)}")
    options = dict(
        vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback, split_digits=split_digits,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True, max_sentence_length=4 * SENTENCE_CHARS,
        input_sentence_size=0, num_threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1),
    )
    model = train_sentencepiece(iter(sentences), **options)
    info = {"model_type": model_type, "byte_fallback": byte_fallback, "split_digits": split_digits,
            "max_sentences": max_sentences, "sentences": len(sentences), "sources": list(specs),
            "text_field": text_field}
    tok = save_tokenizer(model, out_dir, info)
    if verbose:
        print(f"tokenizer: {tok.vocab_size} pieces ({model_type}) from {len(sentences)} sentences -> "
              f"{Path(out_dir) / MODEL_FILE} (sha256 {tok.sha256[:12]})", flush=True)
    return tok

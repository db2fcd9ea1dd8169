"""Tokenizers: sentencepiece (trained here, from any source) and Hugging Face (`tokenizers`), loading, and the
sha256 that names them.

A tokenizer directory holds `tokenizer.model` (the sentencepiece proto) and `tokenizer.json` (vocab
size, special ids, sha256 of the .model file, how it was trained). The sidecar is written last, so a
directory with both files is complete. Runs, manifests and checkpoints refer to a tokenizer by that
sha256 only: two files with the same bytes are the same tokenizer wherever they live.

Settings chosen so that `decode(encode(doc)) == doc` for code and prose: identity normalisation, no
whitespace collapsing, no dummy prefix, byte fallback for anything outside the vocabulary, and
whitespace-only pieces (indentation becomes one or two tokens). Newlines stay ordinary characters
(pieces like `):\\n` form), so no user-defined symbols are needed. One sentencepiece limit remains: a
literal U+2581 (the piece-space mark) in the input decodes as a space.

Hugging Face tokenizers (`tokenizer.kind: hf`, e.g. the tokenizer of a model imported with `loopstack convert hf`)
are used as they are, never trained here: `tokenizer.dir` is a directory holding the HF `tokenizer.json` (plus
`tokenizer_config.json` / `special_tokens_map.json`, which name the special tokens), or the path of such a
`tokenizer.json` file. Its sha256 is that of the `tokenizer.json` bytes. Note the name clash: the sentencepiece
sidecar is also called `tokenizer.json`; `tokenizer.kind` decides which one a directory holds (`kind="auto"`, for
copies beside prepared shards, looks at the file). `HFTokenizer` has the interface of `Tokenizer`; `encode` adds no
special tokens (no BOS from the HF post-processor), so a document is framed as with sentencepiece: its tokens, then
EOS (appended by `data prepare`). As with sentencepiece, the text of a special token inside a document ("</s>",
"<|endoftext|>") is encoded as ordinary text, never as the special id (HF's `split_special_tokens=True`): a document
cannot end early or smuggle in control tokens. Special ids absent from the vocabulary are -1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from loopstack.errors import UserError
from loopstack.fileio import atomic_write

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
HF_FILE = "tokenizer.json"  # the Hugging Face tokenizer (same name as the sentencepiece sidecar: the kind decides)
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # where HF names bos/eos/pad/unk
KINDS = ("sentencepiece", "hf")
SENTENCE_CHARS = 1024  # training sentences: documents cut at line ends into pieces this long
# sentencepiece releases with EncodeAsNumpy hand out ids as int32 numpy arrays (out_type="numpy"); older ones lists
_SP_NUMPY = hasattr(spm.SentencePieceProcessor, "EncodeAsNumpy")


class Tokenizer:
    """A loaded sentencepiece model with its identity (sha256) and special ids."""

    kind = "sentencepiece"

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

    def encode_ids(self, texts: list[str]) -> list[Sequence[int]]:
        """The ids of each text in one batched call, in the cheapest form to copy into a token array: int32 numpy
        arrays straight from sentencepiece's buffers where it offers them (no Python int per token), else lists."""
        if _SP_NUMPY:
            return self.sp.encode(texts, num_threads=1, out_type="numpy")
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def meta(self) -> dict:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "unk_id": self.unk_id}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer with the interface of `Tokenizer` (what prepare, the loader, training
    and generation use). `files` maps file name -> bytes of everything that defines it (tokenizer.json and the
    special-token configs): forked `prepare` workers inherit the object, and `copy_to` writes the same files."""

    kind = "hf"

    def __init__(self, files: dict[str, bytes], path: str | None = None, origin: str = HF_FILE):
        from tokenizers import Tokenizer as RustTokenizer

        self.files = files
        json_bytes = files[HF_FILE]
        try:
            self.tk = RustTokenizer.from_str(json_bytes.decode())
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
            raise UserError(f"{origin}: not a Hugging Face tokenizer.json ({str(err).splitlines()[0][:200]})") \
                from None
        self.tk.encode_special_tokens = True  # text is text: a literal "</s>" in a document is not EOS
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        self.model_bytes = json_bytes
        self.path = path
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        special = _hf_special_tokens(files, origin, self.tk)
        ids = {name: self.tk.token_to_id(tok) if tok is not None else None for name, tok in special.items()}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            -1 if ids[k] is None else int(ids[k]) for k in ("pad", "bos", "eos", "unk"))

    @property
    def dtype(self) -> str:
        """Token dtype of the shards: uint16 when every id fits."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """num_threads 1 encodes one by one in this thread (each `prepare` worker is one process: no rayon pool
        per worker); more uses the library's own thread pool (its size is RAYON_NUM_THREADS, not per call)."""
        if num_threads <= 1:
            return [self.tk.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def encode_ids(self, texts: list[str]) -> list[Sequence[int]]:
        """The ids of each text (lists: the library hands out nothing cheaper), one by one in this thread."""
        return self.encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Special tokens (BOS, EOS, padding) decode to nothing, as with sentencepiece."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def meta(self) -> dict:
        return {"kind": "hf", "sha256": self.sha256, "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}

    def copy_to(self, directory: str | os.PathLike) -> None:
        """Write the defining files into `directory` (unchanged files are left alone)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            if not (d / name).is_file() or (d / name).read_bytes() != data:
                atomic_write(d / name, data)


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_special_tokens(files: dict[str, bytes], origin: str, tk) -> dict[str, str | None]:
    """bos/eos/pad/unk token strings: special_tokens_map.json over tokenizer_config.json, and the BPE/WordPiece/
    Unigram model's own unk token when neither names one."""
    found: dict[str, str | None] = {"pad": None, "bos": None, "eos": None, "unk": None}
    for name in HF_CONFIG_FILES:  # special_tokens_map.json last: it wins
        if name not in files:
            continue
        try:
            cfg = json.loads(files[name])
        except ValueError as err:
            raise UserError(f"{Path(origin).parent / name}: invalid JSON ({err})") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{Path(origin).parent / name}: expected a JSON object")
        for key in found:
            tok = _token_content(cfg.get(f"{key}_token"))
            if tok is not None:
                found[key] = tok
    if found["unk"] is None:
        found["unk"] = getattr(tk.model, "unk_token", None) if hasattr(tk, "model") else None
    return found


def _hf_json_path(path: Path) -> Path:
    """The HF tokenizer.json that `tokenizer.dir` names: the file itself or `<dir>/tokenizer.json`."""
    return path if path.suffix == ".json" and not path.is_dir() else path / HF_FILE


def _looks_hf(json_path: Path) -> bool:
    """Is this tokenizer.json a Hugging Face tokenizer (it has a `model`) rather than a sentencepiece sidecar?"""
    try:
        data = json.loads(json_path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model" in data and "sha256" not in data


def tokenizer_exists(directory: str | os.PathLike, kind: str = "sentencepiece") -> bool:
    d = Path(directory)
    if kind == "hf":
        return _hf_json_path(d).is_file()
    return (d / MODEL_FILE).is_file() and (d / META_FILE).is_file()


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The Hugging Face tokenizer at `path` (a directory with tokenizer.json, or the file); a missing or invalid
    one is a one-line UserError."""
    p = Path(path)
    json_path = _hf_json_path(p)
    if not json_path.is_file():
        raise UserError(f"{p}: no Hugging Face {HF_FILE} (tokenizer.kind: hf wants a directory holding "
                        f"{HF_FILE} or the path of that file)")
    try:
        files = {HF_FILE: json_path.read_bytes()}
        for name in HF_CONFIG_FILES:
            if (json_path.parent / name).is_file():
                files[name] = (json_path.parent / name).read_bytes()
    except OSError as err:
        raise UserError(f"{p}: cannot read tokenizer ({err})") from None
    return HFTokenizer(files, str(p), str(json_path))


def save_tokenizer(model_bytes: bytes, directory: str | os.PathLike, info: dict | None = None) -> Tokenizer:
    """Write model then sidecar (both atomically); the sidecar's presence marks the directory complete."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(model_bytes, str(d))
    atomic_write(d / MODEL_FILE, model_bytes)
    meta = {**tok.meta(), **(info or {})}
    atomic_write(d / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return tok


def load_tokenizer(directory: str | os.PathLike, kind: str = "sentencepiece") -> Tokenizer | HFTokenizer:
    """The tokenizer in `directory` (`tokenizer.kind`: sentencepiece or hf; "auto" looks at the files, for the
    copies `data prepare` leaves beside its shards); a missing, partial or mismatched one is a UserError."""
    d = Path(directory)
    if kind == "auto":
        kind = "hf" if _looks_hf(_hf_json_path(d)) else "sentencepiece"
    if kind == "hf":
        return load_hf_tokenizer(d)
    if kind != "sentencepiece":
        raise UserError(f"tokenizer.kind = {kind!r}: expected one of {', '.join(KINDS)}")
    if not tokenizer_exists(d) and _looks_hf(_hf_json_path(d)):
        raise UserError(f"{d}: holds a Hugging Face {HF_FILE}, not a sentencepiece model: set tokenizer.kind: hf")
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
    if meta.get("sha256") is None and "model" in meta:
        raise UserError(f"{d / META_FILE}: a Hugging Face tokenizer.json beside {MODEL_FILE}; set tokenizer.kind: "
                        f"hf to use it (or remove it to use the sentencepiece model)")
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

"""Config sections owned by the data pipeline: `tokenizer` and `data`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loopstack.errors import ConfigError
from loopstack.typed_config import param


@dataclass
class TokenizerConfig:
    """How `loopstack data train-tokenizer` trains a sentencepiece model (and where runs find it). `kind: hf` uses a
    Hugging Face tokenizer as it is (never trained here; the training settings below do not apply)."""

    kind: Literal["sentencepiece", "hf"] = param(
        "sentencepiece", help="sentencepiece (trained here) or hf (a Hugging Face tokenizer.json, e.g. an imported "
                              "model's)")
    dir: str = param("data/tokenizer", help="sentencepiece: directory holding tokenizer.model + tokenizer.json; hf: "
                                            "directory holding the HF tokenizer.json (+ tokenizer_config.json), or "
                                            "that file")
    model_type: Literal["bpe", "unigram"] = param("bpe", help="sentencepiece algorithm")
    vocab_size: int = param(8192, min=64, max=1 << 20, help="vocabulary size incl. special tokens")
    max_sentences: int = param(2_000_000, min=1,
                               help="cap on training sentences (pieces of <= 1024 characters, cut at line ends)")
    byte_fallback: bool = param(True, help="unknown characters fall back to bytes")
    split_digits: bool = param(True, help="each digit its own piece")


@dataclass
class DataConfig:
    """Sources to tokenize, shards to write, and what the training loader reads."""

    sources: list[str] = param([], help="[NAME=]PATH|GLOB|stdlib[:GLOB]|hf:PATH[@SPLIT], optional #FIELD "
                                        "(see data_pipeline/sources.py); 'stdlib' is the embedded corpus")
    text_field: str = param("text", help="field holding the text in jsonl/parquet/datasets")
    out: str = param("data/shards", help="output directory of `data prepare`")
    workers: int = param(0, min=0, help="tokenizer processes; 0 = all cores")
    shard_mb: float = param(64.0, min=0.001, help="upper bound on a shard's size (one huge document excepted)")
    max_doc_mb: float = param(64.0, min=0.001, help="larger documents count as bad documents")
    bad_documents: Literal["skip", "error"] = param(
        "skip", help="empty / non-UTF-8 / oversized documents: skip and count them, or stop with file:line")
    train: list[str] = param([], help="manifest directories the trainer reads (default: [out])")
    weights: list[float] = param([], help="mixture weights, one per train directory")
    eval: list[str] = param([], help="held-out manifest directories for eval")
    eval_fraction: float = param(0.01, min=0.0, max=0.5,
                                 help="fraction of sequences held out when no eval dirs are given")
    seq_len: int = param(256, min=8, help="tokens per training sequence")
    document_masking: bool = param(False, help="attention does not cross document boundaries")
    prefetch: int = param(2, min=0, help="training batches read ahead by a background thread (pinned memory on GPU "
                                         "machines); 0 = read each batch when the step needs it. Exact either way: "
                                         "checkpoints record the batches consumed")

    def check(self) -> None:
        if self.weights and len(self.weights) != len(self.train):
            raise ConfigError(f"weights: {len(self.weights)} weights for {len(self.train)} train dirs")

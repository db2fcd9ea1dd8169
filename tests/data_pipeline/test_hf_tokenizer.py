"""`tokenizer.kind: hf`: a Hugging Face tokenizer.json through loading, `data prepare` (forked workers) and the
loader, with the same document framing as sentencepiece (tokens, then EOS; no BOS)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.loader import PackedDataset
from data_pipeline.prepare import ensure_dataset, prepare_from_config, train_tokenizer_from_config
from data_pipeline.shards import open_shard, read_manifest
from data_pipeline.tokenizer import HFTokenizer, load_tokenizer
from loopstack.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXTS = ["def add(x, y):\n    return x + y\n", "Hello, world! Ünïcödé and emoji \U0001F600.",
         "    indented\n\n\ttabs and  double  spaces", "1234567 digits", "<s> literal special text </s>"]


def make_hf_tokenizer(directory: Path, vocab: int = 300, bos_template: bool = True) -> Path:
    """A small byte-level BPE trained on TEXTS, saved with PreTrainedTokenizerFast.save_pretrained; its post-processor
    adds BOS (as Llama's does) so the tests see that loopstack's encode does not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXTS * 20, trainer)
    if bos_template:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok")


def test_encode_decode_and_ids_match_transformers(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    for source in (hf_dir, hf_dir / "tokenizer.json"):  # a directory or the file itself
        tok = load_tokenizer(source, "hf")
        assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
        assert tok.vocab_size == len(ref)
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (
            ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id) == (1, 2, 3, 0)
        assert tok.sha256 == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
        assert ref.encode(TEXTS[0])[0] == tok.bos_id  # HF adds BOS by default; loopstack's framing does not
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == ref.encode(text, add_special_tokens=False, split_special_tokens=True)
            assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.encode_batch(TEXTS) == tok.encode_batch(TEXTS, num_threads=2) == [tok.encode(t) for t in TEXTS]
        assert tok.decode([tok.bos_id, *tok.encode("abc"), tok.eos_id]) == "abc"  # specials decode to nothing
        assert tok.eos_id not in tok.encode("a </s> b") and tok.decode(tok.encode("a </s> b")) == "a </s> b"
        assert tok.dtype == "uint16" and tok.meta()["kind"] == "hf"
    assert load_tokenizer(hf_dir, "auto").kind == "hf"


def test_special_ids_absent_are_minus_one_and_map_overrides_config(tmp_path, hf_dir):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(d, "hf")  # no config files: only the BPE model's own unk token is known
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (-1, -1, -1, 0)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<s>",
                                                         "pad_token": "not-in-vocab"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>", "lstrip": False}}))
    tok = load_tokenizer(d, "hf")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)


def test_bad_hf_tokenizers_are_one_line_errors(tmp_path, hf_dir):
    def error(path, kind) -> str:
        with pytest.raises(UserError) as exc:
            load_tokenizer(path, kind)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "no Hugging Face tokenizer.json" in error(tmp_path / "missing", "hf")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": 3}')
    assert "not a Hugging Face tokenizer.json" in error(bad, "hf")
    (bad / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (bad / "tokenizer_config.json").write_text("{not json")
    assert "tokenizer_config.json: invalid JSON" in error(bad, "hf")
    # the name clash: an HF tokenizer.json read as a sentencepiece directory says which kind to set
    assert "set tokenizer.kind: hf" in error(hf_dir, "sentencepiece")
    assert "tokenizer.kind = 'bpe'" in error(hf_dir, "bpe")


def _shard_documents(d: Path) -> list[np.ndarray]:
    docs = []
    for s in read_manifest(d)["shards"]:
        for batch in open_shard(d / s["file"]):
            col = batch.column(0)
            values, offsets = col.values.to_numpy(), col.offsets.to_numpy()
            docs += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return docs


def test_prepare_with_hf_tokenizer_gives_its_ids_and_the_loader_reads_them(tmp_path, hf_dir):
    corpus = tmp_path / "docs.jsonl"
    texts = [TEXTS[i % len(TEXTS)] * (1 + i % 3) for i in range(40)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(hf_dir, "hf")
    tok_cfg = TokenizerConfig(kind="hf", dir=str(hf_dir))
    outs = {}
    for workers in (1, 2):  # two forked workers inherit the tokenizer: the same bytes
        data = DataConfig(sources=[str(corpus)], out=str(tmp_path / f"shards{workers}"), workers=workers,
                          shard_mb=0.001)
        m = prepare_from_config(data, tok_cfg, verbose=False)
        assert m["documents"] == len(texts) and m["tokenizer"]["kind"] == "hf" and m["dtype"] == "uint16"
        assert m["tokenizer"]["sha256"] == tok.sha256 and len(m["shards"]) > 1
        outs[workers] = _shard_documents(Path(data.out))
    docs = outs[1]
    assert [d.tolist() for d in docs] == [tok.encode(t) + [tok.eos_id] for t in texts]  # no BOS, EOS last
    assert [d.tolist() for d in outs[2]] == [d.tolist() for d in docs]
    copied = load_tokenizer(tmp_path / "shards1" / "tokenizer", "auto")  # the copy beside the shards
    assert copied.kind == "hf" and copied.sha256 == tok.sha256 and copied.eos_id == tok.eos_id
    # ensure_dataset finds it prepared (no tokenizer training for kind hf), the loader reads the stream
    assert ensure_dataset(DataConfig(sources=[str(corpus)], out=str(tmp_path / "shards1")), tok_cfg) == \
        [str(tmp_path / "shards1")]
    stream = np.concatenate(docs).astype(np.int64)
    L = 16
    ds = PackedDataset([tmp_path / "shards1"], L, micro_batch=4, seed=0, tokenizer_sha256=tok.sha256)
    n = ds.num_samples
    assert n == (len(stream) - 1) // L
    rows = np.concatenate([ds.next_batch()["tokens"] for _ in range(-(-n // 4))])[:n]
    assert sorted(r.tobytes() for r in rows) == sorted(stream[i * L:i * L + L + 1].tobytes() for i in range(n))


def test_hf_kind_is_never_trained(tmp_path):
    tok_cfg = TokenizerConfig(kind="hf", dir=str(tmp_path / "nothing"))
    data = DataConfig(sources=["stdlib:json/*.py"], out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="not trained here"):
        train_tokenizer_from_config(data, tok_cfg)
    with pytest.raises(UserError, match="no Hugging Face tokenizer.json"):
        ensure_dataset(data, tok_cfg)
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "out").exists()

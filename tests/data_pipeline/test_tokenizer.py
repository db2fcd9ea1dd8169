import hashlib
import json

import pytest

from data_pipeline.sources import iter_documents, parse_source, source_files
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from loopstack.errors import UserError
from tests.data_pipeline.conftest import SMALL, cli


def test_cli_trains_model_and_sidecar(tmp_path):
    out = tmp_path / "tok"
    cli("train-tokenizer", "--source", "stdlib:json/*.py", "--vocab-size", 400, "--out", out)
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert (meta["vocab_size"], meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["unk_id"]) == (400, 0, 1, 2, 3)
    tok = load_tokenizer(out)
    assert tok.sha256 == meta["sha256"] and tok.vocab_size == 400 and tok.eos_id == 2


def test_exact_roundtrip_on_real_stdlib_files(tok_dir):
    """decode(encode(doc)) == doc on a spread of the whole standard library (tabs, unicode, long lines)."""
    tok = load_tokenizer(tok_dir)
    files = source_files(parse_source("stdlib"))[::40]
    docs = [d.text for d in iter_documents(files) if d.text]
    assert len(docs) > 30 and any(not d.isascii() for d in docs)
    extra = ["\tdef f():\r\n\t\treturn 1   \n\n\n", "  leading and trailing  ", "naïve café 東京 🙂 ∑x²",
             "1234567890" * 3, "x" * 20000, "\x00\x01 control \x7f"]
    for doc in docs + extra:
        assert tok.decode(tok.encode(doc)) == doc
    assert all(i < tok.vocab_size for i in tok.encode("🙂 東京"))  # byte fallback, never unk


def test_training_is_deterministic_and_caps_sentences(tmp_path):
    a = train_tokenizer(SMALL, tmp_path / "a", vocab_size=400, verbose=False)
    b = train_tokenizer(SMALL, tmp_path / "b", vocab_size=400, verbose=False)
    assert a.sha256 == b.sha256
    c = train_tokenizer(SMALL, tmp_path / "c", vocab_size=400, max_sentences=20, verbose=False)
    assert json.loads((tmp_path / "c" / "tokenizer.json").read_text())["sentences"] == 20
    assert c.sha256 != a.sha256


def test_unigram_and_digit_splitting(tmp_path):
    tok = train_tokenizer(["stdlib:json/*.py"], tmp_path / "u", vocab_size=400, model_type="unigram", verbose=False)
    assert tok.decode(tok.encode("x = 12345\n    y\n")) == "x = 12345\n    y\n"
    pieces = tok.sp.encode("value = 2024", out_type=str)
    assert {"2", "0", "4"} <= set(pieces)  # split_digits: every digit its own piece


def test_load_errors_are_one_line(tmp_path, tok_dir):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    meta = json.loads((tok_dir / "tokenizer.json").read_text())
    (bad / "tokenizer.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(UserError, match="sha256") as err:
        load_tokenizer(bad)
    assert "\n" not in str(err.value)


def test_too_small_vocab_and_no_sources(tmp_path):
    with pytest.raises(UserError, match="tokenizer training failed") as err:
        train_tokenizer(SMALL, tmp_path / "t", vocab_size=100, verbose=False)
    assert "\n" not in str(err.value) and "Vocabulary size is smaller" in str(err.value)
    with pytest.raises(UserError, match="no sources"):
        train_tokenizer([], tmp_path / "t", vocab_size=300, verbose=False)

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.sources import iter_documents, parse_source, plan_units, read_unit, source_files, stdlib_dir
from loopstack.errors import UserError

DOCS = ["first document\n", "zweites Dokument: ü ß 東京\n", "x = [1, 2, 3]\n\tindented\n", "last one"]


def texts(specs, **kw):
    return [d.text for d in iter_documents(specs, **kw) if d.text is not None]


def test_spec_syntax():
    s = parse_source("web=data/*.jsonl#content", "text")
    assert (s.name, s.location, s.text_field) == ("web", "data/*.jsonl", "content")
    s = parse_source("stdlib:json/*.py", "text")
    assert (s.name, s.location, s.text_field) == ("stdlib:json/*.py", "stdlib:json/*.py", "text")
    s = parse_source("data/lang=en/x.parquet")  # '/' before '=' -> not a name
    assert s.name == s.location == "data/lang=en/x.parquet"
    s = parse_source("hf:/tmp/ds@test#body")
    assert s.is_hf and s.location == "hf:/tmp/ds@test" and s.text_field == "body"


def test_stdlib_corpus_is_sorted_and_has_no_site_packages():
    files = source_files(parse_source("stdlib"))
    assert files == sorted(files) and len(files) > 500
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert os.path.join(stdlib_dir(), "json", "decoder.py") in files
    json_files = source_files(parse_source("stdlib:json/*.py"))
    assert json_files == sorted(os.path.join(stdlib_dir(), "json", f) for f in os.listdir(os.path.join(
        stdlib_dir(), "json")) if f.endswith(".py"))


def test_every_format_reads_the_same_documents(tmp_path):
    lines = b"".join(json.dumps({"text": d, "id": i}).encode() + b"\n" for i, d in enumerate(DOCS))
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet", row_group_size=2)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i}.txt").write_text(d)
    (folder / ".hidden").write_text("never read")
    for spec in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "txt", "txt/*.txt"):
        assert texts([str(tmp_path / spec)]) == DOCS, spec
    assert texts([str(tmp_path / "*.jsonl*")]) == DOCS * 3  # a glob, sorted: a, b, c


def test_text_field_per_source(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    assert texts([f"x={tmp_path / 'a.jsonl'}#body"]) == ["hello"]
    assert texts([str(tmp_path / "a.jsonl")], text_field="body") == ["hello"]


@pytest.mark.parametrize("unit_bytes", [7, 64, 333, 4096])
def test_big_jsonl_split_in_byte_ranges_reads_each_line_once(tmp_path, unit_bytes):
    docs = [f"doc {i} " + "y" * (i * 7 % 50) for i in range(300)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = parse_source(str(path))
    units, _ = plan_units([src], unit_bytes)
    assert len(units) > 1 or unit_bytes > path.stat().st_size
    got = [d.text for u in units for d in read_unit(u, src, 1 << 20)]
    assert got == docs


def test_parquet_row_groups_become_units(tmp_path):
    docs = [f"row {i} " + "z" * 100 for i in range(1000)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "p.parquet", row_group_size=100)
    src = parse_source(str(tmp_path / "p.parquet"))
    units, _ = plan_units([src], 20_000)
    assert len(units) > 2
    assert [d.text for u in units for d in read_unit(u, src, 1 << 20)] == docs


def test_huggingface_saved_dataset_and_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # nothing may come from the hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert texts([f"hf:{tmp_path / 'saved'}#content"]) == DOCS
    assert texts([f"hf:{tmp_path / 'dd'}#content"]) == DOCS  # split train by default
    assert texts([f"hf:{tmp_path / 'dd'}@test#content"]) == DOCS[:1]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "part.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert texts([f"hf:{tmp_path / 'files' / 'part.jsonl'}"]) == DOCS
    with pytest.raises(UserError, match="no column 'text'"):
        texts([f"hf:{tmp_path / 'saved'}"])


def test_missing_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        texts([str(tmp_path / "nope.jsonl")])
    with pytest.raises(UserError, match="matches no files"):
        texts([str(tmp_path / "*.nothing")])
    os.symlink(tmp_path / "gone", tmp_path / "dangling.txt")
    with pytest.raises(UserError, match="dangling.txt: cannot read"):
        texts([str(tmp_path / "dangling.txt")])


def test_oversized_jsonl_line_is_skipped_without_reading_it_whole(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b" * 5000, "c", "d" * 80]))
    docs = list(iter_documents([str(path)], max_doc_bytes=100))
    assert [(d.text, d.bad) for d in docs] == [("a", ""), (None, "too_large"), ("c", ""), ("d" * 80, "")]
    assert docs[1].where == f"{path}:2"

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.loader import PackedDataset
from data_pipeline.prepare import ensure_dataset, merge, prepare
from data_pipeline.shards import open_shard, read_manifest, verify
from data_pipeline.sources import iter_documents
from data_pipeline.tokenizer import load_tokenizer
from loopstack.errors import UserError
from tests.data_pipeline.conftest import ROOT, SMALL, cli, files_of, one_line_error

BIGGER = ["stdlib:unittest/**/*.py", "stdlib:idlelib/**/*.py"]  # ~2 MB: long enough to kill mid-way


def shard_documents(d: Path) -> list[np.ndarray]:
    m = read_manifest(d)
    docs = []
    for s in m["shards"]:
        for batch in open_shard(d / s["file"]):
            col = batch.column(0)
            values, offsets = col.values.to_numpy(), col.offsets.to_numpy()
            docs += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return docs


def test_text_to_shards_to_loader_gives_back_the_documents(prepared):
    tok = load_tokenizer(prepared / "tokenizer")
    originals = [d.text for d in iter_documents(SMALL) if d.text]
    m = read_manifest(prepared)
    assert len(m["shards"]) > 3 and m["documents"] == len(originals) and m["dtype"] == "uint16"
    docs = shard_documents(prepared)
    assert all(d[-1] == tok.eos_id and tok.eos_id not in d[:-1] for d in docs)
    assert [tok.decode(d[:-1]) for d in docs] == originals
    # the loader's epoch is exactly the set of packed windows of the concatenated stream
    stream = np.concatenate(docs).astype(np.int64)
    L = 48
    ds = PackedDataset([prepared], L, micro_batch=5, seed=3, tokenizer_sha256=tok.sha256)
    n = ds.num_samples
    assert n == (len(stream) - 1) // L
    rows = np.concatenate([ds.next_batch()["tokens"] for _ in range(-(-n // 5))])[:n]
    want = sorted(stream[i * L:i * L + L + 1].tobytes() for i in range(n))
    assert sorted(r.tobytes() for r in rows) == want
    assert not np.array_equal(rows[:, 0], stream[: n * L: L])  # shuffled, not in stream order


def test_byte_identical_with_one_and_two_workers(tok_dir, tmp_path, prepared):
    prepare(SMALL, tok_dir, tmp_path / "w2", workers=2, shard_mb=0.05, verbose=False)
    assert files_of(tmp_path / "w2") == files_of(prepared)


def test_sigkill_mid_run_then_resume_equals_clean_run(tok_dir, tmp_path):
    clean = tmp_path / "clean"
    prepare(BIGGER, tok_dir, clean, workers=1, shard_mb=0.04, verbose=False)
    units = read_manifest(clean)["inputs"]["units"]
    assert units > 20
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "loopstack.cli", "data", "prepare", "--tokenizer", tok_dir, "--out", cut,
           "--shard-mb", "0.04", "--workers", "2"] + [a for s in BIGGER for a in ("--source", s)]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((cut / ".work").glob("unit-*.json"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((cut / ".work").glob("unit-*.json")))
    assert not (cut / "manifest.json").exists() and 3 <= done < units, "the kill did not land mid-run"
    time.sleep(0.2)  # forked workers die with the parent (PR_SET_PDEATHSIG)
    out = cli("prepare", "--tokenizer", tok_dir, "--out", cut, "--shard-mb", "0.04", "--workers", "1",
              *[a for s in BIGGER for a in ("--source", s)])
    assert "kept from an earlier run" in out.stdout
    assert files_of(cut) == files_of(clean)  # same manifest, same shards, nothing twice, no leftovers


def test_failed_run_keeps_finished_shards_and_resumes(tok_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"# file {i}\n" + "print('hello world')\n" * (200 + i) for i in range(12)]
    for i, t in enumerate(texts):
        (corpus / f"{i:02d}.py").write_text(t)
    (corpus / "11.py").write_bytes(b"bad \xff byte\n")  # the last unit fails
    out = tmp_path / "out"
    kw = dict(workers=1, shard_mb=0.01, bad_documents="error", verbose=False)
    with pytest.raises(UserError, match=r"11\.py: not valid UTF-8 \(byte 0xff at offset 4\)"):
        prepare([str(corpus)], tok_dir, out, **kw)
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.arrow")}
    assert len(kept) >= 10
    (corpus / "11.py").write_text(texts[11])
    prepare([str(corpus)], tok_dir, out, **kw)
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())  # finished shards were not rebuilt
    prepare([str(corpus)], tok_dir, tmp_path / "clean", **kw)
    assert files_of(out) == files_of(tmp_path / "clean")


def test_slices_then_merge_equal_a_single_prepare(tok_dir, tmp_path, prepared):
    out = tmp_path / "sliced"
    args = [a for s in SMALL for a in ("--source", s)] + ["--tokenizer", tok_dir, "--out", out, "--shard-mb", "0.05"]
    cli("prepare", *args, "--slice", "0/3")
    cli("prepare", *args, "--slice", "2/3")
    err = one_line_error(cli("merge", out, expect=2))
    assert "slices 1 of 3 are not done" in err and "--slice 1/3" in err
    cli("prepare", *args, "--slice", "1/3")
    assert not (out / "manifest.json").exists()
    cli("merge", out)
    assert files_of(out) == files_of(prepared)
    assert "up to date" in cli("prepare", *args, "--slice", "1/3").stdout  # a requeued task is a no-op


def test_verify_reports_and_loader_refuses_corrupt_shards(prepared, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(prepared, d)
    assert "ok" in cli("verify", d).stdout
    PackedDataset([d], 32, micro_batch=2)  # fine before
    m = read_manifest(d)
    flipped, cut = d / m["shards"][1]["file"], d / m["shards"][3]["file"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    err = one_line_error(cli("verify", d, expect=2))
    assert flipped.name in err and "sha256 mismatch" in err
    with pytest.raises(UserError, match=f"{flipped.name}: sha256 mismatch"):
        PackedDataset([d], 32, micro_batch=2)
    cut.write_bytes(cut.read_bytes()[:-100])
    err = one_line_error(cli("verify", d, expect=2))
    assert "2 of" in err and cut.name in err and "truncated" in err
    with pytest.raises(UserError, match="truncated"):
        PackedDataset([d], 32, micro_batch=2)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_bad_inputs_are_one_line_errors_naming_file_and_line(tok_dir, tmp_path):
    tok = ["--tokenizer", tok_dir, "--workers", "1"]
    field = _jsonl(tmp_path / "field.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    err = one_line_error(cli("prepare", "--source", field, *tok, "--out", tmp_path / "o1", expect=2))
    assert f"{field}:3: no field 'text'" in err and "body" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    err = one_line_error(cli("prepare", "--source", bad, *tok, "--out", tmp_path / "o2", "--bad-documents", "error",
                             expect=2))
    assert f"{bad}:2: not valid UTF-8" in err
    empty = _jsonl(tmp_path / "empty.jsonl", [{"text": "x"}, {"text": "y"}, {"text": ""}])
    err = one_line_error(cli("prepare", "--source", empty, *tok, "--out", tmp_path / "o3", "--bad-documents", "error",
                             expect=2))
    assert f"{empty}:3: empty document" in err
    notjson = _jsonl(tmp_path / "nj.jsonl", [{"text": "x"}, "{oops"])
    err = one_line_error(cli("prepare", "--source", notjson, *tok, "--out", tmp_path / "o4", "--bad-documents",
                             "error", expect=2))
    assert f"{notjson}:2: invalid JSON" in err
    big = _jsonl(tmp_path / "big.jsonl", [{"text": "small"}, {"text": "x" * 3000}])
    err = one_line_error(cli("prepare", "--source", big, *tok, "--out", tmp_path / "o5", "--bad-documents", "error",
                             "--max-doc-mb", "0.001", expect=2))
    assert f"{big}:2: document larger than data.max_doc_mb" in err
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    err = one_line_error(cli("prepare", "--source", gz, *tok, "--out", tmp_path / "o6", expect=2))
    assert f"{gz}: cannot read" in err
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "t.parquet")
    err = one_line_error(cli("prepare", "--source", tmp_path / "t.parquet", *tok, "--out", tmp_path / "o7", expect=2))
    assert "t.parquet: no column 'text'" in err and "content" in err
    (tmp_path / "empties").mkdir()
    (tmp_path / "empties" / "a.txt").write_text("")
    err = one_line_error(cli("prepare", "--source", tmp_path / "empties", *tok, "--out", tmp_path / "o8", expect=2))
    assert "empty corpus" in err and "a.txt" in err
    err = one_line_error(cli("prepare", "--source", tmp_path / "*.none", *tok, "--out", tmp_path / "o9", expect=2))
    assert "matches no files" in err


def test_bad_documents_are_skipped_and_counted_by_default(tok_dir, tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"text": ""}\n{"text": "caf\xe9"}\n\n{"text": 5}\n{"text": "good two"}\n')
    m = prepare([str(src)], tok_dir, tmp_path / "o", workers=1, verbose=False)
    assert m["documents"] == 2 and m["skipped"] == {"empty": 1, "not_text": 1, "not_utf8": 1}
    assert any(f"{src}:3" in e for e in m["skipped_examples"])


def test_enormous_document_is_encoded_in_pieces_and_round_trips(tok_dir, tmp_path):
    text = "".join(d.text for d in iter_documents(SMALL) if d.text)
    huge = (text * (1 + (2_500_000 // len(text))))[:2_500_000]
    (tmp_path / "huge.txt").write_text(huge)
    out = tmp_path / "o"
    m = prepare([str(tmp_path / "huge.txt")], tok_dir, out, workers=1, shard_mb=0.5, verbose=False)
    assert m["documents"] == 1 and len(m["shards"]) == 1 and m["shards"][0]["bytes"] > 0.5 * 2**20
    (doc,) = shard_documents(out)
    assert load_tokenizer(tok_dir).decode(doc[:-1]) == huge


def test_rerun_is_noop_and_other_settings_are_refused(prepared, tok_dir):
    before = files_of(prepared)
    args = [a for s in SMALL for a in ("--source", s)] + ["--tokenizer", tok_dir, "--out", prepared]
    assert "up to date" in cli("prepare", *args, "--shard-mb", "0.05").stdout
    err = one_line_error(cli("prepare", *args, "--shard-mb", "1", expect=2))
    assert "other sources, settings or tokenizer" in err
    assert files_of(prepared) == before
    verify(prepared)


def test_config_file_with_flags_overriding(tok_dir, tmp_path):
    out = tmp_path / "flag-out"
    cli("prepare", "--config", ROOT / "configs" / "smoke-cpu.yaml", "--set", f"tokenizer.dir={tok_dir}",
        "--set", f"data.out={tmp_path / 'cfg-out'}", "--set", "data.sources=['stdlib:json/*.py']", "--out", out)
    m = read_manifest(out)
    assert [s["spec"] for s in m["settings"]["sources"]] == ["stdlib:json/*.py"]
    assert not (tmp_path / "cfg-out").exists()
    err = one_line_error(cli("prepare", "--config", ROOT / "configs" / "smoke-cpu.yaml", "--set", "data.workerz=2",
                             expect=2))
    assert "data.workerz" in err


ENSURE = """
import sys, time
from pretrain.config import load_config
from data_pipeline.prepare import ensure_dataset
cfg = load_config(None, sys.argv[1:])
t = time.time()
print(ensure_dataset(cfg.data, cfg.tokenizer), round(time.time() - t, 3))
"""


def test_ensure_dataset_concurrent_calls_and_quick_noop(tmp_path):
    sets = [f"tokenizer.dir={tmp_path / 'tok'}", f"data.out={tmp_path / 'shards'}", "tokenizer.vocab_size=400",
            "data.sources=['stdlib:json/*.py']", "data.shard_mb=0.01"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", ENSURE, *sets], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("tokenizer:" in o for o, _ in outs) == 1 and sum("prepare:" in o for o, _ in outs) == 1
    verify(tmp_path / "shards")
    again = subprocess.run([sys.executable, "-c", ENSURE, *sets], cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.startswith(f"['{tmp_path / 'shards'}']")
    assert float(again.stdout.split()[-1]) < 1.0  # no work, no output but the result


def test_ensure_dataset_refuses_shards_from_other_sources(prepared, tok_dir):
    from pretrain.config import load_config

    cfg = load_config(None, [f"tokenizer.dir={tok_dir}", f"data.out={prepared}", "data.sources=['stdlib']"])
    with pytest.raises(UserError, match="was prepared from"):
        ensure_dataset(cfg.data, cfg.tokenizer)


def test_data_commands_do_not_import_torch(prepared):
    code = ("import sys; from loopstack.cli import main; main(['data', 'inspect', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'megatron', 'datasets', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(prepared)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip().endswith("[]"), out.stderr
    assert "documents" in out.stdout and "--- document" in out.stdout


def test_prepare_imports_neither_pandas_nor_tqdm_off_a_terminal(tok_dir, tmp_path):
    """`pa.array(ndarray)` imports pandas (~0.3 s in every forked worker) and tqdm is only for a terminal: both
    were start-up time of every prepare. One worker runs in this process, so its imports show here."""
    code = ("import sys; from data_pipeline.prepare import prepare; "
            "prepare(['stdlib:json/*.py'], sys.argv[1], sys.argv[2], workers=1, verbose=False); "
            "print(sorted(m for m in ('pandas', 'tqdm', 'torch', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tok_dir), str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_merge_without_slices_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no slice manifests"):
        merge(tmp_path)


def test_unsplittable_input_is_cut_into_parts_within_the_budget(tok_dir, tmp_path):
    docs = [d.text for d in iter_documents(SMALL) if d.text]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    (tmp_path / "all.jsonl.gz").write_bytes(gzip.compress(lines))  # one compressed file = one unit
    out = tmp_path / "o"
    budget_mb = 0.02
    m = prepare([str(tmp_path / "all.jsonl.gz")], tok_dir, out, workers=1, shard_mb=budget_mb, verbose=False)
    names = [s["file"] for s in m["shards"]]
    assert len(names) > 5 and names[:2] == ["shard-000000-0000.arrow", "shard-000000-0001.arrow"]
    for s in m["shards"]:
        assert s["tokens"] * 2 + s["documents"] * 10 <= budget_mb * 2**20 or s["documents"] == 1
    tok = load_tokenizer(tok_dir)
    assert [tok.decode(d[:-1]) for d in shard_documents(out)] == docs

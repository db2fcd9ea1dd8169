"""`loopstack data prepare`: sources -> tokenized, checksummed Arrow shards, in parallel and resumable.

How it works. The sources are planned into *units* (see `sources.py`): an ordered list that depends on
the inputs and settings only. Worker processes (forked, so they start in milliseconds and share the
loaded tokenizer) each take whole units: read, encode in batches, append EOS, write the unit's shard
`shard-UUUUUU-PPPP.arrow` (PPPP > 0 only when one unit outgrows `data.shard_mb`), then a receipt
`.work/unit-UUUUUU.json` (names, sizes, sha256, counts). `manifest.json` is built from the receipts in
unit order and written last, atomically. Hence:

* byte-identical shards and manifest for any `--workers` (a shard is a function of its unit only);
* resume after a crash or kill: a unit with a receipt whose files still hash right is kept, any other
  unit's files are deleted and rebuilt, so no document reaches the output twice;
* `manifest.json` present = the directory is complete; a re-run is then a quick no-op.

SLURM job arrays (`--slice I/N`, I = 0..N-1, e.g. `--slice $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`
with `--array=0-(N-1)`): every task runs the same `prepare` command with the same `--out` on a shared
filesystem. Task I plans all units, builds units [I*U/N, (I+1)*U/N) and writes
`manifest.slice-IIII-of-NNNN.json`. A task can be re-run (requeue) and resumes like a full prepare.
When all N are done, one `loopstack data merge OUT` checks them (same plan, every slice present, every
shard's sha256) and writes `manifest.json`, identical to the one an un-sliced prepare writes; the shard
files are the same files. Train the tokenizer once before the array.

Bad input: an unreadable file, a missing text field, a corrupt parquet/gzip/zstd file or an empty
corpus stops with one line naming the file (and line). Documents that are empty, not UTF-8, not JSON
objects, not strings or larger than `data.max_doc_mb` are skipped and counted in the manifest
(`data.bad_documents: skip`, the default; the standard library itself has a few non-UTF-8 test files),
or stop the run with one line naming file and line (`error`). Shards already written are never
touched by a failing run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from data_pipeline import encode
from data_pipeline.encode import WORK, Context, build_unit, worker_init
from data_pipeline.shards import (
    FORMAT,
    MANIFEST,
    manifest_sha,
    read_json,
    read_manifest,
    sha256_file,
    write_stamp,
)
from data_pipeline.sources import MiB, Source, Unit, parse_source, plan_units
from data_pipeline.tokenizer import META_FILE, MODEL_FILE, Tokenizer, load_tokenizer, tokenizer_exists
from loopstack.errors import UserError
from loopstack.fileio import atomic_write, atomic_write_json


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_slice(text: str | None) -> tuple[int, int] | None:
    """`'3/8'` -> (3, 8); slices are 0-based like SLURM_ARRAY_TASK_ID."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--slice {text}: expected I/N, e.g. --slice 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--slice {text}: need 0 <= I < N")
    return i, n


# --- orchestration -----------------------------------------------------------------------------------------


def _header(tok: Tokenizer, sources: list[Source], units: list[Unit], text_field: str, shard_mb: float,
            max_doc_mb: float, bad_documents: str) -> dict:
    """Everything the shards depend on: equal headers <=> interchangeable outputs."""
    plan = json.dumps([[u.source, [p.describe() for p in u.pieces]] for u in units]).encode()
    files = {p.path for u in units for p in u.pieces}
    return {
        "format": FORMAT,
        "tokenizer": tok.meta(),
        "dtype": tok.dtype,
        "settings": {"sources": [{"spec": s.spec, "name": s.name, "text_field": s.text_field} for s in sources],
                     "text_field": text_field, "shard_mb": shard_mb, "max_doc_mb": max_doc_mb,
                     "bad_documents": bad_documents},
        "inputs": {"files": len(files), "bytes": sum(u.size for u in units), "units": len(units),
                   "plan_sha256": hashlib.sha256(plan).hexdigest()},
    }


def _unit_key(header: dict, unit: Unit) -> str:
    """Resume key: settings, tokenizer and this unit's own inputs with mtimes (a changed file is rebuilt).

    Not the whole plan: fixing one bad file keeps every finished unit whose pieces did not move.
    """
    same = {k: v for k, v in header.items() if k != "inputs"}
    text = json.dumps([same, unit.index, unit.source, [[p.describe(), p.mtime_ns] for p in unit.pieces]],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def build_manifest(header: dict, receipts: list[dict]) -> dict:
    """The manifest from the header and every unit's receipt, in unit order (also what `merge` does)."""
    shards = [{**part, "source": r["source"], "unit": r["unit"]} for r in receipts for part in r["shards"]]
    skipped: dict[str, int] = {}
    per_source = {s["name"]: {**s, "documents": 0, "tokens": 0, "shards": 0, "skipped": {}}
                  for s in header["settings"]["sources"]}
    for r in receipts:
        agg = per_source[r["source"]]
        agg["documents"] += r["documents"]
        agg["tokens"] += r["tokens"]
        agg["shards"] += len(r["shards"])
        for k, v in r["skipped"].items():
            agg["skipped"][k] = agg["skipped"].get(k, 0) + v
            skipped[k] = skipped.get(k, 0) + v
    for agg in per_source.values():
        agg["skipped"] = dict(sorted(agg["skipped"].items()))
    return {**header,
            "documents": sum(r["documents"] for r in receipts), "tokens": sum(r["tokens"] for r in receipts),
            "bytes": sum(s["bytes"] for s in shards),
            "skipped": dict(sorted(skipped.items())),
            "skipped_examples": [e for r in receipts for e in r["skipped_examples"]][:10],
            "sources": list(per_source.values()),
            "shards": shards}


def _same_data(manifest: dict, header: dict) -> bool:
    return all(manifest.get(k) == header[k] for k in ("format", "tokenizer", "dtype", "settings", "inputs"))


def _copy_tokenizer(tok: Tokenizer, tok_dir: Path, out: Path) -> None:
    """A copy of the tokenizer beside the shards: the directory decodes without the run's config (a Hugging Face
    tokenizer's files are copied as they are; `load_tokenizer(dir, "auto")` tells the kinds apart)."""
    dest = out / "tokenizer"
    if tok.kind == "hf":
        tok.copy_to(dest)
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, META_FILE):
        src_bytes = (tok_dir / name).read_bytes()
        if not (dest / name).is_file() or (dest / name).read_bytes() != src_bytes:
            atomic_write(dest / name, src_bytes)


def _finished(out: Path, index: int, key: str) -> dict | None:
    """The receipt of a unit if it belongs to this plan and its shards still hash right."""
    path = out / WORK / f"unit-{index:06d}.json"
    if not path.is_file():
        return None
    try:
        receipt = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if receipt.pop("key", None) != key:
        return None
    for part in receipt["shards"]:
        f = out / part["file"]
        if not f.is_file() or f.stat().st_size != part["bytes"] or sha256_file(f) != part["sha256"]:
            return None
    return receipt


def _discard(out: Path, units: list[int]) -> None:
    """Delete everything a unit may have left (final or temp parts, receipt): it is rebuilt from scratch."""
    prefixes = {f"shard-{u:06d}-" for u in units}
    for name in os.listdir(out):
        if name[:13] in prefixes:
            (out / name).unlink(missing_ok=True)
    for u in units:
        (out / WORK / f"unit-{u:06d}.json").unlink(missing_ok=True)


class _NoBar:
    """What `_run` calls on a progress bar, doing nothing: no bar off a terminal (as tqdm's disable=None decides),
    and then tqdm is not even imported (its import is start-up time of every `prepare`)."""

    n = 0

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, verbose: bool):
    if not (verbose and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, dynamic_ncols=True)


def _run(ctx: Context, todo: list[int], workers: int, verbose: bool) -> list[dict]:
    """Build the units in `todo` with `workers` processes, biggest first; a progress bar on a terminal."""
    todo = sorted(todo, key=lambda u: (-ctx.units[u].size, u))
    total = sum(ctx.units[u].size for u in todo)
    ctx.progress = mp.get_context("fork").Array("q", 3) if workers > 1 else None
    encode._CTX = ctx
    # fork before tqdm starts its monitor thread: the workers inherit a single-threaded process
    pool = mp.get_context("fork").Pool(workers, initializer=worker_init) if workers > 1 else None
    bar = _progress_bar(total, verbose)
    t0 = time.time()
    results: list[dict] = []

    def refresh(n_done: int) -> None:
        docs, toks, chars = ctx.progress[:] if ctx.progress is not None else (
            sum(r["documents"] for r in results), sum(r["tokens"] for r in results), None)
        dt = max(time.time() - t0, 1e-6)
        bar.set_postfix_str(f"{docs / dt:,.0f} docs/s, {toks / dt / 1e6:.2f}M tok/s, {n_done}/{len(todo)} units",
                            refresh=False)
        done_bytes = chars if chars is not None else sum(ctx.units[r["unit"]].size for r in results)
        bar.update(max(0, min(done_bytes, total) - bar.n))

    try:
        if pool is None:
            for u in todo:
                results.append(build_unit(u))
                refresh(len(results))
        else:
            it = pool.imap_unordered(build_unit, todo, chunksize=1)
            while len(results) < len(todo):
                try:
                    results.append(it.next(timeout=0.25))
                except mp.TimeoutError:
                    pass
                refresh(len(results))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        encode._CTX = None
        bar.close()
    return results


def prepare(sources: list[str], tokenizer_dir: str | os.PathLike, out: str | os.PathLike, *,
            text_field: str = "text", workers: int = 0, shard_mb: float = 64.0, max_doc_mb: float = 64.0,
            bad_documents: str = "skip", slice: tuple[int, int] | None = None, verbose: bool = True,
            tokenizer_kind: str = "sentencepiece") -> dict:
    """Tokenize `sources` into shards under `out`; returns the manifest (or the slice manifest)."""
    if not sources:
        raise UserError("no sources: pass --source (e.g. --source stdlib) or set data.sources")
    if bad_documents not in ("skip", "error"):
        raise UserError(f"data.bad_documents = {bad_documents!r}: expected 'skip' or 'error'")
    t0 = time.time()
    tok_dir, out = Path(tokenizer_dir), Path(out)
    tok = load_tokenizer(tok_dir, tokenizer_kind)
    if tok.eos_id < 0:
        raise UserError(f"{tok_dir}: the tokenizer has no EOS token (documents end with EOS in the shards); name one "
                        f"as eos_token in tokenizer_config.json")
    srcs = [parse_source(s, text_field) for s in sources]
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise UserError(f"two sources share a name ({', '.join(names)}); name them with NAME=...")
    budget = max(1, int(shard_mb * MiB))
    units, _ = plan_units(srcs, budget)
    header = _header(tok, srcs, units, text_field, shard_mb, max_doc_mb, bad_documents)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if _same_data(manifest, header):
            if verbose:
                print(f"prepare: {out} is up to date ({manifest['documents']:,} documents, "
                      f"{manifest['tokens']:,} tokens)", flush=True)
            return manifest
        raise UserError(f"{out} holds shards prepared from other sources, settings or tokenizer; remove it "
                        f"or choose another output directory")
    lo, hi = (0, len(units)) if slice is None else (slice[0] * len(units) // slice[1],
                                                      (slice[0] + 1) * len(units) // slice[1])
    (out / WORK).mkdir(exist_ok=True)
    _copy_tokenizer(tok, tok_dir, out)
    keys = {u.index: _unit_key(header, u) for u in units[lo:hi]}
    receipts: dict[int, dict] = {}
    for u in range(lo, hi):
        done = _finished(out, u, keys[u])
        if done is not None:
            receipts[u] = done
    todo = [u for u in range(lo, hi) if u not in receipts]
    _discard(out, todo)
    n_workers = max(1, min(workers or cpu_count(), len(todo)))
    if verbose and todo:
        kept = f", {len(receipts)} kept from an earlier run" if receipts else ""
        what = f"slice {slice[0]}/{slice[1]}: " if slice else ""
        print(f"prepare: {what}{len(todo)} units of {', '.join(sources)} with {n_workers} workers{kept} -> {out}",
              flush=True)
    ctx = Context(tok, srcs, units, out, header, budget, int(max_doc_mb * MiB), bad_documents, keys)
    for r in _run(ctx, todo, n_workers, verbose):
        receipts[r["unit"]] = r
    ordered = [receipts[u] for u in range(lo, hi)]
    if slice is not None:
        path = out / f"manifest.slice-{slice[0]:04d}-of-{slice[1]:04d}.json"
        atomic_write_json(path, {**header, "slice": {"index": slice[0], "count": slice[1], "units": [lo, hi]},
                                 "units": ordered})
        if verbose:
            docs = sum(r["documents"] for r in ordered)
            print(f"prepare: slice {slice[0]}/{slice[1]} done ({docs:,} documents) -> {path}", flush=True)
        return read_json(path)
    return _finish(out, header, ordered, verbose, t0)


def _finish(out: Path, header: dict, receipts: list[dict], verbose: bool, t0: float) -> dict:
    manifest = build_manifest(header, receipts)
    if manifest["documents"] == 0:
        why = f"; skipped {manifest['skipped']}, e.g. {manifest['skipped_examples'][0]}" if manifest["skipped"] else ""
        raise UserError(f"empty corpus: no documents in {', '.join(s['spec'] for s in header['settings']['sources'])}"
                        f"{why}")
    atomic_write_json(out / MANIFEST, manifest)
    write_stamp(out, manifest_sha(out), [s["file"] for s in manifest["shards"]])
    keep = {s["file"] for s in manifest["shards"]}
    for f in out.glob("shard-*"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
    for f in out.glob("manifest.slice-*.json"):
        f.unlink(missing_ok=True)
    shutil.rmtree(out / WORK, ignore_errors=True)
    if verbose:
        dt = time.time() - t0
        print(f"prepare: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
              f"{len(manifest['shards'])} shards ({manifest['bytes'] / 1e6:.1f} MB, {manifest['dtype']}) in {dt:.1f} s "
              f"({manifest['tokens'] / dt / 1e6:.2f}M tokens/s) -> {out / MANIFEST}", flush=True)
        if manifest["skipped"]:
            print(f"prepare: skipped {sum(manifest['skipped'].values())} documents "
                  f"({', '.join(f'{v} {k}' for k, v in manifest['skipped'].items())}), e.g. "
                  f"{manifest['skipped_examples'][0]}", flush=True)
    return manifest


def merge(out: str | os.PathLike, verbose: bool = True) -> dict:
    """Combine the slice manifests of a `--slice I/N` array into `manifest.json` (checks every shard)."""
    t0 = time.time()
    out = Path(out)
    if (out / MANIFEST).is_file() and not list(out.glob("manifest.slice-*.json")):
        if verbose:
            print(f"merge: {out / MANIFEST} already complete", flush=True)
        return read_manifest(out)
    parts = sorted(out.glob("manifest.slice-*-of-*.json"))
    if not parts:
        raise UserError(f"{out}: no slice manifests (manifest.slice-I-of-N.json) to merge")
    slices = [read_json(p, "slice manifest") for p in parts]
    counts = {s["slice"]["count"] for s in slices}
    if len(counts) != 1:
        raise UserError(f"{out}: slice manifests from different --slice counts ({sorted(counts)}); "
                        f"remove the stale ones")
    n = counts.pop()
    have = {s["slice"]["index"] for s in slices}
    missing = sorted(set(range(n)) - have)
    if missing:
        raise UserError(f"{out}: slices {', '.join(map(str, missing))} of {n} are not done; run prepare "
                        f"--slice {missing[0]}/{n}")
    header = {k: v for k, v in slices[0].items() if k not in ("slice", "units")}
    for s in slices:
        if {k: v for k, v in s.items() if k not in ("slice", "units")} != header:
            raise UserError(f"{out}: slice {s['slice']['index']} was planned from other inputs or settings; "
                            f"re-run it")
    receipts = [r for s in sorted(slices, key=lambda s: s["slice"]["index"]) for r in s["units"]]
    if [r["unit"] for r in receipts] != list(range(header["inputs"]["units"])):
        raise UserError(f"{out}: slice manifests do not cover units 0..{header['inputs']['units'] - 1}")
    for r in receipts:
        for part in r["shards"]:
            f = out / part["file"]
            if not f.is_file() or f.stat().st_size != part["bytes"] or sha256_file(f) != part["sha256"]:
                raise UserError(f"{f}: missing or does not match its slice manifest; re-run slice "
                                f"{next(s['slice']['index'] for s in slices if r in s['units'])}/{n}")
    return _finish(out, header, receipts, verbose, t0)


# --- the trainer's entry point -------------------------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock: concurrent `ensure_dataset` calls wait for the one doing the work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_from_config(data_cfg, tok_cfg, *, slice: tuple[int, int] | None = None, verbose: bool = True) -> dict:
    return prepare(data_cfg.sources, tok_cfg.dir, data_cfg.out, text_field=data_cfg.text_field,
                   workers=data_cfg.workers, shard_mb=data_cfg.shard_mb, max_doc_mb=data_cfg.max_doc_mb,
                   bad_documents=data_cfg.bad_documents, slice=slice, verbose=verbose,
                   tokenizer_kind=tok_cfg.kind)


def train_tokenizer_from_config(data_cfg, tok_cfg, verbose: bool = True) -> Tokenizer:
    from data_pipeline.tokenizer import train_tokenizer

    if tok_cfg.kind == "hf":
        raise UserError(f"tokenizer.kind = hf: a Hugging Face tokenizer is used as it is, not trained here; point "
                        f"tokenizer.dir at its tokenizer.json (now {tok_cfg.dir})")
    return train_tokenizer(data_cfg.sources, tok_cfg.dir, vocab_size=tok_cfg.vocab_size,
                           text_field=data_cfg.text_field, model_type=tok_cfg.model_type,
                           max_sentences=tok_cfg.max_sentences, byte_fallback=tok_cfg.byte_fallback,
                           split_digits=tok_cfg.split_digits, verbose=verbose)


def _prepared_from(out: Path, data_cfg, tok_sha: str) -> bool:
    """Is `out` complete and made from these sources + tokenizer? (cheap: reads two JSON files)"""
    if not (out / MANIFEST).is_file():
        return False
    m = read_manifest(out)
    specs = [s["spec"] for s in m["settings"]["sources"]]
    if specs != list(data_cfg.sources) or m["settings"]["text_field"] != data_cfg.text_field \
            or m["tokenizer"]["sha256"] != tok_sha:
        raise UserError(f"{out} was prepared from {specs} with tokenizer {m['tokenizer']['sha256'][:12]}, the config "
                        f"asks for {list(data_cfg.sources)} with {tok_sha[:12]}; remove it or set data.out")
    return True


def ensure_dataset(data_cfg, tok_cfg) -> list[str]:
    """Tokenizer and shards for a run, made once: returns the train manifest directories.

    No tokenizer in `tokenizer.dir` -> train one on `data.sources`; no complete manifest in `data.out`
    -> prepare it. Safe when several processes call it at once (file locks); a quick no-op when done.
    """
    train = list(data_cfg.train) or [data_cfg.out]
    tok_dir, out = Path(tok_cfg.dir), Path(data_cfg.out)
    kind = tok_cfg.kind
    if data_cfg.sources:
        if kind == "hf":
            load_tokenizer(tok_dir, kind)  # never trained here: a missing one is an error now
        elif not tokenizer_exists(tok_dir):
            with file_lock(tok_dir.parent / f".{tok_dir.name}.lock"):
                if not tokenizer_exists(tok_dir):
                    train_tokenizer_from_config(data_cfg, tok_cfg)
        tok_sha = load_tokenizer(tok_dir, kind).sha256
        if not _prepared_from(out, data_cfg, tok_sha):
            with file_lock(out / ".lock"):
                if not _prepared_from(out, data_cfg, tok_sha):
                    prepare_from_config(data_cfg, tok_cfg)
    elif kind == "hf":
        load_tokenizer(tok_dir, kind)
    elif not tokenizer_exists(tok_dir):
        raise UserError(f"tokenizer.dir = {tok_dir} has no tokenizer and data.sources is empty: set data.sources "
                        f"or run `loopstack data train-tokenizer`")
    for d in train + list(data_cfg.eval):
        read_manifest(d)
    return train

"""Data pipeline benchmark: `python -m benchmarks.bench_data` -> benchmarks/results/data.json.

On the embedded corpus (this interpreter's standard library, ~31 MB) with an 8k BPE tokenizer, at 1 worker
and at all cores, in the same run:

* the floor: sentencepiece's own batched `encode(docs, num_threads=k)` of the same documents (the ones
  `prepare` encodes: bad ones dropped) already in memory, same tokenizer, k threads = k workers; the best
  of its two output types (lists of ints, int32 numpy arrays) so that the floor is not slowed by an output
  `prepare` does not use;
* `loopstack data prepare --workers k` as a fresh process: the whole command (interpreter start-up, plan,
  read, encode, Arrow, fsync, sha256, manifest), what a user waits for; also `prepare()` called in this
  process, for the share of start-up;
* the peer: Hugging Face datasets, `Dataset.from_dict` of the same documents in memory, `map` (batched,
  the same sentencepiece model, `num_proc=k`) and `save_to_disk`, timed inside its own process after its
  imports (so its start-up is not counted: in its favour).

Target: the whole command within 1.15x of the floor at every worker count. A shared machine makes wall times
noisy, so the variants run interleaved in rounds (a busy spell hits all alike), each ratio is taken within a
round, and min and median over `--repeats` rounds are reported; CPU seconds (less sensitive to other load)
are recorded beside. Then the loader: sequences/s and memory for the corpus and a 10x larger one (the same
shards listed ten times), each in a fresh process, to show that memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "data.json"
TARGET = 1.15  # the whole command / the floor, at every worker count

HF_PEER = r"""
import json, resource, sys, time
import datasets
from data_pipeline.sources import iter_documents
from data_pipeline.tokenizer import load_tokenizer
datasets.disable_progress_bars()
datasets.disable_caching()
sp = load_tokenizer(sys.argv[1]).sp
procs, out = int(sys.argv[2]), sys.argv[3]
docs = [d.text for d in iter_documents(["stdlib"]) if d.text]
def encode(batch):
    return {"input_ids": sp.encode(batch["text"])}
def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
t, c = time.perf_counter(), cpu()
ds = datasets.Dataset.from_dict({"text": docs})
ds = ds.map(encode, batched=True, num_proc=procs if procs > 1 else None, remove_columns=["text"])
ds.save_to_disk(out)
wall, c = time.perf_counter() - t, cpu() - c
print(json.dumps({"wall_s": wall, "cpu_s": c, "rows": len(ds)}))
"""

LOADER = r"""
import json, sys, time
from data_pipeline.loader import PackedDataset
seq_len, micro_batch, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def rss():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(status[k].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
t = time.perf_counter()
ds = PackedDataset([sys.argv[1]], seq_len, micro_batch=micro_batch, seed=0)
open_s = time.perf_counter() - t
after_open = rss()
n, t = 0, time.perf_counter()
while time.perf_counter() - t < seconds:
    ds.next_batch()
    n += micro_batch
dt = time.perf_counter() - t
print(json.dumps({"tokens": sum(s.manifest["tokens"] for s in ds.streams), "samples": ds.num_samples,
                  "open_s": round(open_s, 3), "sequences": n, "seq_per_s": round(n / dt),
                  "tokens_per_s": round(n * seq_len / dt), "rss_mib_after_open": after_open, "rss_mib_end": rss()}))
"""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "data_pipeline"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted data_pipeline changes" if dirty else "")
    except OSError:
        return "unknown"


def cpu_now() -> float:
    """CPU seconds of this process and its finished children (forked workers included)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall, cpu) seconds of one call."""
    c, t = cpu_now(), time.perf_counter()
    fn()
    return time.perf_counter() - t, cpu_now() - c


def replicate(src: Path, dest: Path, times: int) -> None:
    """A manifest `times` x larger: hard links to the same shards under new names (same bytes, same sha)."""
    from data_pipeline.shards import MANIFEST
    from loopstack.fileio import atomic_write_json

    m = json.loads((src / MANIFEST).read_text())
    dest.mkdir(parents=True)
    shards = []
    for k in range(times):
        for s in m["shards"]:
            name = f"rep{k:02d}-{s['file']}"
            os.link(src / s["file"], dest / name)
            shards.append({**s, "file": name})
    atomic_write_json(dest / MANIFEST, {**m, "shards": shards, "documents": m["documents"] * times,
                                        "tokens": m["tokens"] * times, "bytes": m["bytes"] * times})


def summary(ratios: list[float]) -> dict:
    return {"min": round(min(ratios), 3), "median": round(statistics.median(ratios), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face datasets peer")
    parser.add_argument("--no-loader", action="store_true", help="skip the loader measurements")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    from data_pipeline.encode import SEGMENT_CHARS
    from data_pipeline.prepare import prepare
    from data_pipeline.sources import iter_documents
    from data_pipeline.tokenizer import _SP_NUMPY, load_tokenizer, train_tokenizer

    n = cores()
    counts = sorted({1, n})
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    # whether the peer can run; not by importing it here (pandas would come along into the forked workers)
    hf = not args.no_hf and importlib.util.find_spec("datasets") is not None
    result: dict = {"machine": {"cpus": n, "platform": platform.platform(), "python": platform.python_version(),
                                "processor": platform.processor() or platform.machine(),
                                "load_avg_start": os.getloadavg()},
                    "git_commit": git_commit(), "corpus": "stdlib", "vocab_size": args.vocab_size}
    try:
        t = time.perf_counter()
        train_tokenizer(["stdlib"], work / "tok", vocab_size=args.vocab_size, verbose=False)
        result["train_tokenizer_s"] = round(time.perf_counter() - t, 2)
        tok = load_tokenizer(work / "tok")
        docs = [d.text for d in iter_documents(["stdlib"]) if d.text]
        assert max(map(len, docs)) <= SEGMENT_CHARS  # prepare encodes each document whole, as the floor does
        mb = sum(len(d.encode()) for d in docs) / 1e6
        tokens = sum(map(len, tok.sp.encode(docs, num_threads=n)))
        result["corpus_mb"], result["documents"], result["tokens"] = round(mb, 1), len(docs), tokens
        out_types = {"ints": int, **({"numpy": "numpy"} if _SP_NUMPY else {})}

        def floor(k: int, out_type) -> None:
            tok.sp.encode(docs, num_threads=k, out_type=out_type)

        def cli(k: int) -> None:
            shutil.rmtree(work / "shards", ignore_errors=True)
            subprocess.run([sys.executable, "-m", "loopstack.cli", "data", "prepare", "--source", "stdlib",
                            "--tokenizer", str(work / "tok"), "--out", str(work / "shards"), "--workers", str(k)],
                           check=True, cwd=ROOT, env=env, capture_output=True)

        def in_process(k: int) -> None:
            shutil.rmtree(work / "shards", ignore_errors=True)
            prepare(["stdlib"], work / "tok", work / "shards", workers=k, verbose=False)

        def hf_peer(k: int) -> tuple[float, float]:
            shutil.rmtree(work / "hf", ignore_errors=True)
            out = subprocess.run([sys.executable, "-c", HF_PEER, str(work / "tok"), str(k), str(work / "hf")],
                                 check=True, cwd=ROOT, env=env, capture_output=True, text=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            assert got["rows"] == len(docs)
            return got["wall_s"], got["cpu_s"]

        # rounds of every variant, interleaved, so that a busy spell on a shared machine hits all alike
        rounds: list[dict[str, list[float]]] = []
        for _ in range(args.repeats):
            row: dict[str, list[float]] = {}
            for k in counts:
                for name, out_type in out_types.items():
                    row[f"floor_{name}_{k}"] = list(timed(lambda k=k, o=out_type: floor(k, o)))
                row[f"cli_{k}"] = list(timed(lambda k=k: cli(k)))
                if hf:
                    row[f"hf_{k}"] = list(hf_peer(k))
                row[f"prepare_{k}"] = list(timed(lambda k=k: in_process(k)))
            for k in counts:
                row[f"floor_{k}"] = min((row[f"floor_{name}_{k}"] for name in out_types), key=lambda v: v[0])
            rounds.append(row)
        manifest = json.loads((work / "shards" / "manifest.json").read_text())
        assert manifest["tokens"] == tokens + manifest["documents"]  # every document + its EOS

        def best(key: str) -> dict:
            wall, cpu = min(r[key] for r in rounds)
            return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}

        def ratio(key: str, k: int) -> dict:
            return summary([r[f"{key}_{k}"][0] / r[f"floor_{k}"][0] for r in rounds])

        result["floor"] = {f"threads_{k}": {**best(f"floor_{k}"), "tokens_per_s": round(tokens / best(f"floor_{k}")
                                                                                       ["wall_s"]),
                                            **{f"{name}_wall_s": best(f"floor_{name}_{k}")["wall_s"]
                                               for name in out_types}} for k in counts}
        result["prepare"] = {
            "whole_command": {f"workers_{k}": {**best(f"cli_{k}"), "vs_floor": ratio("cli", k)} for k in counts},
            "in_process": {f"workers_{k}": {**best(f"prepare_{k}"), "vs_floor": ratio("prepare", k)}
                           for k in counts},
            "cpu_vs_floor_1_thread": summary([r["cli_1"][1] / r["floor_1"][1] for r in rounds]),
            "shards": len(manifest["shards"]), "shard_bytes": manifest["bytes"],
            "speedup_all_cores_vs_1": round(best("cli_1")["wall_s"] / best(f"cli_{n}")["wall_s"], 2),
            "target": f"whole command <= {TARGET}x the floor at every worker count (min and median over rounds)",
            "met": {stat: all(ratio("cli", k)[stat] <= TARGET for k in counts) for stat in ("min", "median")},
        }
        if hf:
            result["hf_datasets"] = {f"num_proc_{k}": {**best(f"hf_{k}"), "vs_floor": ratio("hf", k),
                                                       "whole_command_vs_hf": summary(
                                                           [r[f"cli_{k}"][0] / r[f"hf_{k}"][0] for r in rounds])}
                                     for k in counts}
        result["rounds_wall_cpu_s"] = [{k: [round(x, 3) for x in v] for k, v in r.items()} for r in rounds]

        if not args.no_loader:
            result["loader"] = measure_loader(work, env, args.seq_len, args.micro_batch)
        result["machine"]["load_avg_end"] = os.getloadavg()
        busy = max(result["machine"]["load_avg_start"][0], result["machine"]["load_avg_end"][0]) > n
        result["machine"]["busy"] = busy  # others' load on the cores: the wall-clock ratios are then noise
        if busy:
            result["note"] = (f"load average above {n} (the core count) during the run: the wall-clock ratios are "
                              f"not meaningful; re-record on an idle machine (CPU seconds are less affected)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def measure_loader(work: Path, env: dict, seq_len: int, micro_batch: int) -> dict:
    """The loader over the prepared shards and over a 10x manifest of them, each in a fresh process."""
    replicate(work / "shards", work / "shards-x10", 10)
    loader = {}
    for name, d in (("x1", work / "shards"), ("x10", work / "shards-x10")):
        out = subprocess.run([sys.executable, "-c", LOADER, str(d), str(seq_len), str(micro_batch), "5"],
                             check=True, cwd=ROOT, env=env, capture_output=True, text=True)
        loader[name] = json.loads(out.stdout)
    return {"seq_len": seq_len, "micro_batch": micro_batch, **loader,
            "note": "compare seq_per_s with the trainer's sequences/s per rank (target >= 50x); "
                    "RssAnon is the loader's own memory, RssFile the mapped shard pages it touched, VmHWM the peak"}


if __name__ == "__main__":
    sys.exit(main())

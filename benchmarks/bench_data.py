"""Data pipeline benchmark: `python -m benchmarks.bench_data` -> benchmarks/results/data.json.

On the embedded corpus (this interpreter's standard library, ~31 MB) with an 8k BPE tokenizer:

* reference: sentencepiece's own batched `encode(docs, num_threads=cores)`, text already in memory;
* `prepare` end to end (plan, read, encode, Arrow, sha256, manifest) with 1 worker and with all cores;
  targets: all cores >= 0.8x the reference, 2 workers >= 1.8x one worker;
* the loader: sequences/s and memory for the corpus and a 10x larger one (the same shards listed ten
  times), each in a fresh process, to show that memory does not grow with the corpus.

Timings are the best of `--repeats` runs (the machine may be shared); the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "data.json"

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    from data_pipeline.prepare import prepare
    from data_pipeline.sources import iter_documents
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

    n = cores()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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
        mb = sum(len(d.encode()) for d in docs) / 1e6
        tokens = sum(map(len, tok.sp.encode(docs, num_threads=n)))
        result["corpus_mb"], result["documents"], result["tokens"] = round(mb, 1), len(docs), tokens

        def run_prepare(workers: int) -> None:
            shutil.rmtree(work / "shards", ignore_errors=True)
            prepare(["stdlib"], work / "tok", work / "shards", workers=workers, verbose=False)

        runs: dict[str, list[tuple[float, float]]] = {"ref_n": [], "ref_1": [], "prep_1": [], "prep_n": []}
        for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits all alike
            runs["ref_n"].append(timed(lambda: tok.sp.encode(docs, num_threads=n)))
            runs["ref_1"].append(timed(lambda: tok.sp.encode(docs, num_threads=1)))
            runs["prep_1"].append(timed(lambda: run_prepare(1)))
            runs["prep_n"].append(timed(lambda: run_prepare(n)))
        (ref, ref_cpu), (ref1, ref1_cpu), (p1, p1_cpu), (pn, pn_cpu) = (min(v) for v in runs.values())
        result["reference_encode"] = {f"threads_{n}_s": round(ref, 3), "threads_1_s": round(ref1, 3),
                                      "threads_1_cpu_s": round(ref1_cpu, 3), "tokens_per_s": round(tokens / ref)}
        shutil.rmtree(work / "shards", ignore_errors=True)
        cmd = [sys.executable, "-m", "loopstack.cli", "data", "prepare", "--source", "stdlib", "--tokenizer",
               str(work / "tok"), "--out", str(work / "shards")]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
        cli_s = time.perf_counter() - t
        manifest = json.loads((work / "shards" / "manifest.json").read_text())
        assert manifest["tokens"] == tokens + manifest["documents"]  # every document + its EOS
        result["prepare"] = {
            "workers_1_s": round(p1, 3), f"workers_{n}_s": round(pn, 3), f"cli_workers_{n}_s": round(cli_s, 3),
            "workers_1_cpu_s": round(p1_cpu, 3), f"workers_{n}_cpu_s": round(pn_cpu, 3),
            "cpu_efficiency_vs_reference_1_thread": round(ref1_cpu / p1_cpu, 2),
            "all_runs_wall_cpu_s": {k: [[round(w, 2), round(c, 2)] for w, c in v] for k, v in runs.items()},
            "shards": len(manifest["shards"]), "shard_bytes": manifest["bytes"],
            "speedup_all_cores_vs_1": round(p1 / pn, 2),
            "all_cores_vs_reference": round(ref / pn, 2),
            "targets": {"all_cores_vs_reference": ">= 0.8", "workers_2_vs_1": ">= 1.8"},
        }

        replicate(work / "shards", work / "shards-x10", 10)
        loader = {}
        for name, d in (("x1", work / "shards"), ("x10", work / "shards-x10")):
            out = subprocess.run([sys.executable, "-c", LOADER, str(d), str(args.seq_len), str(args.micro_batch), "5"],
                                 check=True, cwd=ROOT, env=env, capture_output=True, text=True)
            loader[name] = json.loads(out.stdout)
        result["loader"] = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, **loader,
                            "note": "compare seq_per_s with the trainer's sequences/s per rank (target >= 50x); "
                                    "RssAnon is the loader's own memory, RssFile the mapped shard pages it touched, "
                                    "VmHWM the peak"}
        result["machine"]["load_avg_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench-gpu` / `python -m benchmarks.gpu`: the GPU check as one command, in under 8 minutes on one H200.

    python -m benchmarks.gpu [--tiny] [--out PATH] [--budget-s 420] [--variants flt,parcae] [--data DIR]

Phase 1, correctness smoke: for every model variant (`model.variant`), a few bf16 steps through the trainer's own
entry (`pretrain.train.run`, what `loopstack train` calls: one process, NCCL on CUDA, gloo on CPU) on the smoke
config, a checkpoint at step 2, then a second run resumed from that checkpoint in another run directory; the resumed
steps must give the uninterrupted run's losses (exactly on CPU; within 1% on CUDA, whose kernels are not
deterministic). A one-element all-reduce on the device records the backend.

Phase 2, throughput, each row one model through one step function, warmup steps (the compile) excluded:
- the trainer's step (`Trainer.train_step` + the per-step stop agreement of `fit`: loader, DeepSpeed engine, bf16,
  ZeRO, guards, Muon) with `train.compile: true`, for the `gpu-125m` and `gpu-1b` presets (on one GPU: tp 1, a fixed
  loop count) at 4 and 8 loops, without and with per-loop activation checkpointing;
- a bare compiled PyTorch loop of the `gpu-1b` preset (the same `LoopedLM` built the same way, bf16 weights, the
  same core layers compiled by `compile_model`, torch's own Muon + fused AdamW on the same parameter groups, clip,
  no DeepSpeed, no loader, no guards) on the same batches: the trainer's overhead is the ratio of the step times;
- weight sharing: the plain loop (`variant: looped`, loops L over n_core layers) against the same network unrolled
  (loops 1 over n_core x L layers, its own weights per layer), checked to be the same shapes and FLOPs.
Per row: tokens/s, model and hardware TFLOP/s (`pretrain.models.flops`, loop-aware: forward-only loops 1x,
recomputation in hardware FLOPs only), MFU/HFU against `device_peak_flops` (None on CPU), peak memory, compile counts.

Budget: the command stops itself inside `--budget-s` (default 420 s, so the whole device call, wheel install and
start included, stays under 8 minutes). The phases run in child processes that the parent kills when their time is
up; each measured config is guarded (an OOM, a compile failure or a crash of the child is recorded in its row, and
a fresh child takes the remaining configs); configs the budget did not reach are rows with status "skipped" and a
note. Configs run most important first: the ~1B preset and its bare loop (two of the three targets), the shared vs
unrolled pair, then the rest of the grid.

Results: `benchmarks/results/gpu.json` (full mode on CUDA only: that file holds GPU numbers and nothing else; tiny or
CPU runs write to `--out` or a temporary path) with device, versions, commit, every row, and the issue's three
targets: loop-aware MFU of the ~1B preset >= 50%, looped tokens/s >= 95% of the unrolled network's, the trainer's
step time <= 1.10x the bare loop's.

`--tiny`: the same code paths with tiny models, few steps and two variants (override with `--variants`), in seconds
on CPU (the CI test runs it end to end) or on a GPU. Nothing is downloaded: the data is the smoke config's (a
tokenizer and shards made from the standard library; `--data DIR` reuses a prepared one), the full-size models keep
the presets' 32k vocabulary. On the device machine the carried wheels in `.whl/` (scripts/gpu_wheels.sh) are installed
into /tmp/site first when deepspeed or megatron-core is missing.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopstack.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "gpu.json"
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/site")
SMOKE = ROOT / "configs" / "smoke-cpu.yaml"
PRESETS = {"125m": ROOT / "configs" / "gpu-125m.yaml", "1b": ROOT / "configs" / "gpu-1b.yaml"}
TARGETS = {"mfu_1b": 0.50, "looped_over_unrolled_tokens_per_s": 0.95, "loopstack_over_bare_step_time": 1.10}
SMOKE_STEPS, SMOKE_CKPT = 4, 2  # steps of the uninterrupted run; the resumed run starts from this checkpoint
RESUME_TOL = {"cuda": 1e-2, "cpu": 0.0}  # relative loss difference allowed after resuming
SMOKE_SHARE = 0.35  # of the budget left after the data is ready: ~10 s per variant on a GPU, the rest is throughput


@dataclass(frozen=True)
class Mode:
    """What a run measures: full (the presets) or tiny (same paths, tiny models)."""

    name: str
    loops: tuple[int, ...]
    ckpt: tuple[str, ...]
    warmup: int
    steps: int
    unrolled: tuple[str, ...]  # presets whose shape gets the shared-vs-unrolled pair, in order
    min_start_s: float  # a config is not started with less time left than this
    shrink: dict[str, tuple[str, ...]]  # per preset: overrides making it small (tiny mode)


FULL = Mode("full", loops=(4, 8), ckpt=("none", "loop"), warmup=2, steps=5, unrolled=("125m", "1b"),
            min_start_s=25.0, shrink={"125m": ("model.vocab_size=32768",), "1b": ("model.vocab_size=32768",)})
_TINY_COMMON = ("model.n_heads=2", "model.d_model=32", "data.seq_len=32", "train.micro_batch=2", "train.grad_accum=2")
TINY = Mode("tiny", loops=(2,), ckpt=("loop",), warmup=1, steps=2, unrolled=("125m",), min_start_s=0.0,
            shrink={"125m": _TINY_COMMON + ("model.n_core=2",),
                    "1b": _TINY_COMMON + ("model.n_prelude=1", "model.n_core=2", "model.n_coda=1")})


# --- the parent: wheels, data, phases under one budget, the results file ----------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models, few steps: the same code paths in seconds")
    p.add_argument("--out", default=None, help=f"results file (default {RESULT.relative_to(ROOT)} for a full run "
                                               "on CUDA, a temporary path otherwise)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole command (s)")
    p.add_argument("--variants", default=None, help="comma-separated model variants for the smoke phase "
                                                    "(default: all; tiny: flt,parcae)")
    p.add_argument("--data", default=None, help="directory for the smoke tokenizer and shards (made if absent)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed at the end)")
    p.add_argument("--child", choices=("smoke", "throughput"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.child:
        return _child(args.child, json.loads(Path(args.spec).read_text()))
    if args.budget_s <= 0:
        raise UserError(f"--budget-s {args.budget_s:g}: must be positive")
    mode = TINY if args.tiny else FULL
    variants = _variants(args.variants, mode)
    out = Path(args.out).resolve() if args.out else None
    if out is not None and out == RESULT.resolve() and mode is not FULL:
        raise UserError(f"--out {args.out}: {RESULT.relative_to(ROOT)} holds full GPU results only; a tiny run "
                        "writes elsewhere")
    if out is not None and out.is_dir():
        raise UserError(f"--out {args.out}: is a directory; give a file path")
    site = use_carried_wheels()
    import torch  # after the wheels: /tmp/site may hold what the children import

    cuda = torch.cuda.is_available()
    if not cuda and mode is FULL:
        raise UserError("no CUDA device visible: the full benchmark needs a GPU; --tiny runs the same code paths on "
                        "CPU in seconds")
    if out is None:
        out = RESULT if mode is FULL else Path(tempfile.gettempdir()) / "loopstack-bench-gpu-tiny.json"
    if out == RESULT.resolve() and not cuda:
        raise UserError(f"--out {args.out}: {RESULT.relative_to(ROOT)} holds GPU results only")
    work = Path(tempfile.mkdtemp(prefix="loopstack-bench-gpu-"))
    data = Path(args.data).resolve() if args.data else work / "data"
    deadline = started + args.budget_s
    notes: list[str] = []
    try:
        data_flags = prepare_data(data)
        print(f"== bench-gpu ({mode.name}): data ready in {time.time() - started:.0f} s; budget "
              f"{args.budget_s:.0f} s", flush=True)
        base_env = _child_env(site)
        smoke_until = time.time() + SMOKE_SHARE * (deadline - time.time())
        smoke_events = run_phase("smoke", dict(mode=mode.name, data_flags=data_flags, variants=variants,
                                               work=str(work / "smoke")), [v for v in variants], smoke_until,
                                 base_env, work, notes)
        configs = throughput_configs(mode, data_flags)
        tp_events = run_phase("throughput", dict(mode=mode.name, work=str(work / "throughput"),
                                                 warmup=mode.warmup, steps=mode.steps, min_start_s=mode.min_start_s),
                              configs, deadline - 3.0, base_env, work, notes)
        record = assemble(mode, args.budget_s, started, smoke_events, tp_events, configs, variants, notes)
        print_summary(write_record(out, record), out)
    finally:
        if args.keep:
            print(f"run directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if record["ok"] else 1


def _variants(text: str | None, mode: Mode) -> list[str]:
    from pretrain.models.config import RECIPES

    if text is None:
        return ["flt", "parcae"] if mode is TINY else list(RECIPES)
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in RECIPES]
    if unknown or not chosen:
        raise UserError(f"--variants {text!r}: unknown variant {unknown[0] if unknown else '(none given)'!r}; "
                        f"variants: {', '.join(RECIPES)}")
    return chosen


def use_carried_wheels(wheels: Path = WHEELS, site: Path = SITE) -> Path | None:
    """On a machine without deepspeed or megatron-core (the device image), install the wheels carried in `.whl/`
    (scripts/gpu_wheels.sh) into `site` with pip, offline, and put it first on this process's path; the children
    get it through PYTHONPATH. Returns `site` when used, None when nothing was missing (or nothing was carried)."""
    missing = [m for m in ("deepspeed", "megatron.core") if _find_spec(m) is None]
    found = sorted(glob.glob(str(wheels / "*.whl")))
    if not missing:
        return site if str(site) in sys.path else None
    if not found:
        raise UserError(f"{', '.join(missing)} not importable and no wheels in {wheels} (make them with "
                        "scripts/gpu_wheels.sh on a machine with pip, and carry .whl)")
    print(f"installing {len(found)} carried wheels into {site} ({', '.join(missing)} missing)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *found], check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return site


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:  # the parent package is missing
        return None


def _child_env(site: Path | None) -> dict[str, str]:
    paths = [str(ROOT)] + ([str(site)] if site else []) + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    env = dict(os.environ, PYTHONPATH=":".join(paths), PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def prepare_data(data: Path) -> list[str]:
    """The smoke config's tokenizer and shards in `data` (made from the standard library when absent: nothing is
    downloaded); returns the `--set` flags that point a config at them."""
    from data_pipeline.prepare import ensure_dataset
    from pretrain.config import load_config

    flags = [f"tokenizer.dir={data}/tokenizer", f"data.out={data}/shards"]
    cfg = load_config(SMOKE, flags)
    ensure_dataset(cfg.data, cfg.tokenizer)
    return flags


def throughput_configs(mode: Mode, data_flags: list[str]) -> list[dict]:
    """The phase-2 rows, most important first. Each: name, kind (loopstack | bare), preset, overrides, tags."""
    common = data_flags + ["data.sources=[]", "parallel.tp=1", "logging.wandb=disabled", "logging.console=false",
                           "logging.diagnostics_every=0", "loop.sampler=fixed", "train.compile=true",
                           "train.steps=100000", "eval.every=0"]
    top = max(mode.loops)

    def row(preset: str, kind: str, loops: int, ckpt: str, tags: tuple[str, ...] = (), extra: tuple[str, ...] = (),
            label: str = "") -> dict:
        overrides = common + list(mode.shrink[preset]) + [f"model.loops={loops}",
                                                          f"parallel.activation_checkpointing={ckpt}", *extra]
        name = f"gpu-{preset}{label} loops={loops} ckpt={ckpt}" + (" [bare]" if kind == "bare" else "")
        return dict(name=name, kind=kind, preset=str(PRESETS[preset]), overrides=overrides, tags=list(tags))

    def pair(preset: str) -> list[dict]:
        """Plain loop (variant looped) vs the same network unrolled: loops 1 over n_core x L layers."""
        from pretrain.config import load_config

        n_core = load_config(PRESETS[preset], list(mode.shrink[preset])).model.n_core
        loops = min(mode.loops)
        plain = ("model.variant=looped", "loop.backprop_loops=0")
        return [row(preset, "loopstack", loops, "none", (f"looped_pair:{preset}",), plain, " looped"),
                row(preset, "loopstack", 1, "none", (f"unrolled_pair:{preset}",),
                    plain + (f"model.n_core={n_core * loops}",), f" unrolled x{n_core * loops}")]

    rows = [row("1b", "loopstack", top, "loop", ("mfu_1b", "bare_ref")),
            row("1b", "bare", top, "loop", ("bare",))]
    rows += pair(mode.unrolled[0])
    rows.append(row("125m", "loopstack", min(mode.loops), "loop"))
    # packed documents: the dense [B, 1, T, T] mask through SDPA vs one FlexAttention block mask per forward
    for kernel in ("sdpa", "flex"):
        rows.append(row("125m", "loopstack", min(mode.loops), "none", (f"docmask:{kernel}",),
                        ("data.document_masking=true", f"model.attention={kernel}"), f" docmask {kernel}"))
    for preset in ("125m", "1b"):
        for loops in mode.loops:
            for ckpt in mode.ckpt:
                if not any(r["name"] == row(preset, "loopstack", loops, ckpt)["name"] for r in rows):
                    rows.append(row(preset, "loopstack", loops, ckpt))
    for preset in mode.unrolled[1:]:
        rows += pair(preset)
    return rows


def run_phase(kind: str, spec: dict, items: list, until: float, env: dict[str, str], work: Path,
              notes: list[str]) -> list[dict]:
    """Run `items` (variants or configs) in child processes until `until` (epoch seconds): a child that crashes or
    runs out of time is recorded against the item it was on, and a fresh child takes the rest while time is left.
    Returns the children's events (one dict per started / finished / skipped item)."""
    events: list[dict] = []
    done: set[str] = set()
    attempt = 0
    key = "variant" if kind == "smoke" else "name"
    names = [item if isinstance(item, str) else item["name"] for item in items]
    while True:
        todo = [item for item, name in zip(items, names, strict=True) if name not in done]
        if not todo:
            break
        if time.time() >= until - 1.0:
            for name in [n for n in names if n not in done]:
                events.append({key: name, "status": "skipped", "note": "the time budget ran out before it started"})
            break
        attempt += 1
        spec_path = work / f"{kind}-{attempt}.json"
        events_path = work / f"{kind}-{attempt}.jsonl"
        spec_path.write_text(json.dumps(dict(spec, items=todo, events=str(events_path), deadline=until)))
        cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", kind, "--spec", str(spec_path)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        grace = 20.0 if kind == "throughput" else 10.0
        try:
            rc = proc.wait(timeout=max(until - time.time(), 0) + grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        got = _read_events(events_path)
        started = [e[key] for e in got if e.get("event") == "start"]
        finished = {e[key] for e in got if "status" in e}
        events += [e for e in got if "status" in e]
        done |= finished
        left = [n for n in names if n not in done]
        if not left:
            break
        current = next((n for n in reversed(started) if n not in finished), None)
        why = "stopped at the time budget" if rc is None else f"the {kind} process exited with {rc}"
        if current is not None:  # it died (or was stopped) on this item: a fresh child takes the rest
            events.append({key: current, "status": "skipped", "note": f"{why} while on this item"} if rc is None
                          else {key: current, "status": "error", "error": f"{why} while on this item"})
            done.add(current)
            left.remove(current)
        if rc is None or current is None:  # out of time, or a child that fails before its first item
            if current is None:
                notes.append(f"{kind}: {why} before starting an item")
            status = {"status": "skipped", "note": "the time budget ran out before it started"} if rc is None \
                else {"status": "error", "error": why}
            events += [{key: name, **status} for name in left]
            break
    device = next((e["device"] for e in _all_events(work, kind) if "device" in e), None)
    if device is not None:
        events.append({"event": "device", "device": device})
    return events


def _kill_group(proc: subprocess.Popen) -> None:
    """The child and what it started (inductor's compile workers): its own process group, started for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_events(path: Path) -> list[dict]:
    """A child's events file (JSON lines; a line cut by a kill is skipped)."""
    from pretrain.metrics import read_jsonl

    return read_jsonl(path)


def _all_events(work: Path, kind: str) -> list[dict]:
    return [e for p in sorted(work.glob(f"{kind}-*.jsonl")) for e in _read_events(p)]


# --- the results ----------------------------------------------------------------------------------------------

def assemble(mode: Mode, budget_s: float, started: float, smoke_events: list[dict], tp_events: list[dict],
             configs: list[dict], variants: list[str], notes: list[str]) -> dict:
    device = next((e["device"] for e in smoke_events + tp_events if e.get("event") == "device"), {})
    smoke = {e["variant"]: {k: v for k, v in e.items() if k != "variant"} for e in smoke_events if "variant" in e}
    smoke = {v: smoke.get(v, {"status": "skipped", "note": "not reached"}) for v in variants}
    by_name = {e["name"]: e for e in tp_events if "name" in e}
    rows = []
    for cfg in configs:
        row = {"name": cfg["name"], "kind": cfg["kind"], "tags": cfg["tags"], "overrides": _short(cfg["overrides"])}
        row.update({k: v for k, v in by_name.get(cfg["name"], {"status": "skipped", "note": "not reached"}).items()
                    if k != "name"})
        rows.append(row)
    targets = compute_targets(rows, judged=mode is FULL and device.get("peak_bf16_flops") is not None)
    smoke_ok = all(s.get("status") == "ok" for s in smoke.values())
    rows_ok = not any(r.get("status") == "error" for r in rows)  # rows the budget did not reach are not failures
    if not rows_ok:
        notes.append("some throughput rows failed: see each row's error")
    if any(r.get("status") == "skipped" for r in rows):
        notes.append("some throughput rows were not measured within the time budget: see each row's note")
    return {
        "mode": mode.name, "budget_s": budget_s, "elapsed_s": round(time.time() - started, 1),
        "device": device, "ok": smoke_ok and rows_ok,
        "smoke": {"ok": smoke_ok, "steps": SMOKE_STEPS, "resumed_from_step": SMOKE_CKPT,
                  "backend": device.get("backend"), "variants": smoke},
        "throughput": rows, "targets": targets, "docmask_flex_over_sdpa": docmask_ratio(rows), "notes": notes,
        "method": "tokens/s = tokens per optimizer step / median step time over the measured steps (warmup steps, "
                  "which include the compile, excluded); TFLOP/s from pretrain.models.flops (model: forward-only "
                  "loops 1x, backpropagated 3x; hardware adds activation-checkpoint recomputation); MFU/HFU over "
                  "device_peak_flops (dense bf16 datasheet peak); peak memory = torch.cuda.max_memory_allocated "
                  "during the row (reset at its start). Trainer rows time Trainer.train_step plus the stop "
                  "agreement fit() runs every step; the bare row times forward/backward over the same micro "
                  "batches, clip and torch's Muon + AdamW on bf16 weights (no fp32 master copy, no DeepSpeed).",
    }


def _short(overrides: list[str]) -> list[str]:
    """The overrides that say what the row is (not the data paths and logging switches every row shares)."""
    shared = ("tokenizer.dir=", "data.out=", "data.sources=", "logging.", "train.steps=", "eval.every=")
    return [o for o in overrides if not o.startswith(shared)]


def compute_targets(rows: list[dict], judged: bool = True) -> dict:
    """The issue's three targets from the rows tagged for them; a value is None when a row it needs is missing.
    `judged` False (tiny mode, or no GPU): the values are computed the same way but `met` stays None, since tiny
    models on a CPU say nothing about the targets."""

    def tagged(tag: str) -> dict | None:
        row = next((r for r in rows if tag in r["tags"]), None)
        return row if row is not None and row.get("status") == "ok" else None

    def verdict(name: str, value: float | None, basis: str, lower_is_better: bool = False) -> dict:
        target = TARGETS[name]
        met = None if value is None or not judged else (value <= target if lower_is_better else value >= target)
        return {"value": value, "target": target, "met": met, "basis": basis}

    out = {}
    mfu_row = tagged("mfu_1b")
    out["mfu_1b"] = verdict("mfu_1b", mfu_row and mfu_row.get("mfu"),
                            f"loop-aware MFU of '{mfu_row['name'] if mfu_row else 'gpu-1b'}' (bf16, one GPU); "
                            "None without a known peak (CPU)")
    best = max((r for r in rows if r["name"].startswith("gpu-1b") and r["kind"] == "loopstack"
                and r.get("status") == "ok" and r.get("mfu") is not None), key=lambda r: r["mfu"], default=None)
    out["mfu_1b"]["best"] = {"row": best["name"], "mfu": best["mfu"]} if best else None
    pairs = []
    for r in rows:
        for tag in r["tags"]:
            if tag.startswith("looped_pair:"):
                unrolled = tagged("unrolled_pair:" + tag.split(":", 1)[1])
                if r.get("status") == "ok" and unrolled is not None:
                    pairs.append((r, unrolled))
    ratio = pairs[0][0]["tokens_per_s"] / pairs[0][1]["tokens_per_s"] if pairs else None
    out["looped_over_unrolled_tokens_per_s"] = verdict(
        "looped_over_unrolled_tokens_per_s", ratio,
        "tokens/s of variant looped over the same network unrolled (first pair: "
        f"{pairs[0][0]['name']!r} / {pairs[0][1]['name']!r})" if pairs else "no complete pair")
    out["looped_over_unrolled_tokens_per_s"]["pairs"] = [same_network(a, b) for a, b in pairs]
    ref, bare = tagged("bare_ref"), tagged("bare")
    out["loopstack_over_bare_step_time"] = verdict(
        "loopstack_over_bare_step_time", ref["step_s_median"] / bare["step_s_median"] if ref and bare else None,
        f"median step time of '{ref['name'] if ref else 'gpu-1b'}' over its bare compiled PyTorch loop, same batch "
        "and GPU, one run", lower_is_better=True)
    return out


def docmask_ratio(rows: list[dict]) -> dict:
    """Not one of the issue's targets, measured alongside: packed documents (data.document_masking), tokens/s with
    model.attention=flex over the dense-mask sdpa path."""
    ok = {t: r for r in rows if r.get("status") == "ok" for t in r["tags"] if t.startswith("docmask:")}
    sdpa, flex = ok.get("docmask:sdpa"), ok.get("docmask:flex")
    return {"value": flex["tokens_per_s"] / sdpa["tokens_per_s"] if sdpa and flex else None,
            "basis": "gpu-125m with data.document_masking: tokens/s of model.attention=flex / sdpa (dense mask)"}


def same_network(looped: dict, unrolled: dict) -> dict:
    """Whether a shared-vs-unrolled pair is one network shape: equal FLOPs per token, the same layer shapes, and
    the unrolled model holding exactly (loops - 1) more copies of the core layers' parameters."""
    shapes = looped["core_layer_shapes"]
    per_layer = sum(math.prod(int(d) for d in entry.split()[1].split("x")) for entry in shapes[0]) \
        if len(shapes) == 1 else None
    extra = None if per_layer is None else \
        unrolled["params"] - looped["params"] - per_layer * looped["layers"][1] * (looped["loops"] - 1)
    return {"looped": looped["name"], "unrolled": unrolled["name"],
            "tokens_per_s_ratio": looped["tokens_per_s"] / unrolled["tokens_per_s"],
            "flops_equal": math.isclose(looped["model_flops_per_token"], unrolled["model_flops_per_token"],
                                        rel_tol=1e-12),
            "layer_shapes_equal": looped["core_layer_shapes"] == unrolled["core_layer_shapes"],
            "layers": [looped["layers"][1] * looped["loops"], unrolled["layers"][1] * unrolled["loops"]],
            "params_unexplained": extra}


def versions() -> dict:
    """Versions of what the benchmark ran on (from the child that ran it)."""
    import importlib.metadata as md

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist_name in ("deepspeed", "megatron-core", "triton"):
        try:
            out[dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            out[dist_name] = None
    if torch.cuda.is_available():
        try:
            nccl = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except (AttributeError, RuntimeError, TypeError):
            out["nccl"] = None
    return out


def commit() -> str:
    """The git commit (with -dirty), or, where the tree travelled without .git (the device machine), the one
    scripts/gpu_wheels.sh recorded in .whl/COMMIT when it prepared the wheels."""
    from benchmarks.common import git_commit

    sha = git_commit()
    if sha and sha != "unknown":
        return sha
    recorded = WHEELS / "COMMIT"
    if recorded.exists():
        return recorded.read_text().strip() + " (recorded by scripts/gpu_wheels.sh; no .git where it ran)"
    return "unknown"


def write_record(out: Path, results: dict) -> dict:
    """The results file, written atomically, in the layout every benchmark result has (benchmarks/common.py)."""
    from benchmarks.common import machine_info

    record = {"benchmark": "gpu", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
              "machine": machine_info(), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(_plain(record), indent=1, allow_nan=False) + "\n")
    tmp.replace(out)
    return record


def _plain(x: Any) -> Any:
    """Strict JSON: non-finite floats as strings, tuples as lists, anything else unknown as its text."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def print_summary(record: dict, out: Path) -> None:
    res = record["results"]
    dev = res["device"]
    print(f"\n== bench-gpu {res['mode']} on {dev.get('name', '?')} in {res['elapsed_s']:.0f} s "
          f"(budget {res['budget_s']:.0f} s)")
    bad = [f"{v} ({s.get('status')})" for v, s in res["smoke"]["variants"].items() if s.get("status") != "ok"]
    print(f"smoke ({res['smoke']['backend']}): {len(res['smoke']['variants']) - len(bad)}/"
          f"{len(res['smoke']['variants'])} variants trained, saved and resumed with the same losses"
          + (f"; not ok: {', '.join(bad)}" if bad else ""))
    print(f"{'row':52s} {'status':8s} {'tok/s':>11s} {'TFLOP/s':>8s} {'MFU':>6s} {'HFU':>6s} {'peak GiB':>9s}")
    for r in res["throughput"]:
        if r.get("status") == "ok":
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            hfu = "-" if r.get("hfu") is None else f"{100 * r['hfu']:.1f}%"
            mem = "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}"
            print(f"{r['name']:52s} {'ok':8s} {r['tokens_per_s']:11,.0f} {r['model_tflops']:8.1f} {mfu:>6s} "
                  f"{hfu:>6s} {mem:>9s}")
        else:
            print(f"{r['name']:52s} {r.get('status', '?'):8s} {r.get('error') or r.get('note') or ''}"[:160])
    for name, t in res["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target {name}: {value} (target {t['target']}, met: {t['met']})")
    print(f"wrote {out}")


# --- the children ----------------------------------------------------------------------------------------------

class _Events:
    """One JSON line per event, flushed at once, so the parent keeps what a killed child had finished."""

    def __init__(self, path: str):
        self.path = path

    def emit(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(event)) + "\n")


def _child(kind: str, spec: dict) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    events = _Events(spec["events"])
    if kind == "smoke":
        smoke_child(spec, events)
    else:
        throughput_child(spec, events)
    return 0


def device_record(backend: str | None = None) -> dict:
    import torch

    from pretrain.metrics import device_peak_flops

    name, peak = device_peak_flops()
    rec = {"name": name, "peak_bf16_flops": peak, "backend": backend, "versions": versions()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        rec.update(memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    return rec


def smoke_child(spec: dict, events: _Events) -> None:
    """Phase 1 in one process: the backend check, then per variant an uninterrupted run and a resumed one."""
    import torch
    import torch.distributed as dist

    from pretrain.distributed import init_distributed, shutdown

    env = init_distributed(tp=1, seed=0)
    try:  # the collective the trainer's loss reduction uses, on the trainer's device
        x = torch.ones(4, device=env.device)
        dist.all_reduce(x)
        backend = f"{dist.get_backend()} ({'ok' if float(x.sum()) == 4.0 else 'wrong sum'})"
    finally:
        shutdown()
    events.emit({"event": "device", "device": device_record(backend)})
    work = Path(spec["work"])
    tol = RESUME_TOL["cuda" if torch.cuda.is_available() else "cpu"]
    for variant in spec["items"]:
        if time.time() > spec["deadline"] - 2.0:
            events.emit({"variant": variant, "status": "skipped", "note": "the time budget ran out before it "
                                                                          "started"})
            continue
        events.emit({"event": "start", "variant": variant})
        t0 = time.time()
        try:
            result = smoke_variant(variant, spec["data_flags"], work / variant, tol)
        except Exception as err:  # noqa: BLE001 - recorded in the results, the next variant still runs
            result = {"status": "error", "error": _one_line(err)}
            traceback.print_exc()
        result["seconds"] = round(time.time() - t0, 1)
        events.emit({"variant": variant, **result})
        print(f"smoke {variant}: {result['status']} ({result['seconds']:.1f} s)", flush=True)


def smoke_variant(variant: str, data_flags: list[str], work: Path, tol: float) -> dict:
    """bf16 steps of `variant` through `pretrain.train.run`; a second run resumes from the first one's checkpoint
    at step SMOKE_CKPT (in its own run directory) and must continue with the same losses (relative `tol`)."""
    from pretrain.config import load_config
    from pretrain.metrics import read_metrics
    from pretrain.train import run

    flags = data_flags + [f"model.variant={variant}", "train.dtype=bf16", f"train.steps={SMOKE_STEPS}",
                          f"checkpoint.every={SMOKE_CKPT}", "checkpoint.keep_last=4", "logging.every=1",
                          "logging.wandb=disabled", "logging.console=false", "logging.diagnostics_every=0",
                          "eval.loops=[1]", "eval.batches=1"]
    cfg = load_config(SMOKE, flags)
    first, resumed = work / "run", work / "resumed"
    rc = run(cfg, first, resume="none")
    rc2 = run(cfg, resumed, resume=str(first / "checkpoints" / str(SMOKE_CKPT)))
    losses = {r["step"]: r["loss"] for r in read_metrics(first) if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    steps = list(range(SMOKE_CKPT + 1, SMOKE_STEPS + 1))
    if rc or rc2 or sorted(losses) != list(range(1, SMOKE_STEPS + 1)) or sorted(again) != steps:
        return {"status": "error", "error": f"exit codes {rc}, {rc2}; logged steps {sorted(losses)} and resumed "
                                            f"{sorted(again)}"}
    diff = max(abs(again[s] - losses[s]) / max(abs(losses[s]), 1e-12) for s in steps)
    finite = all(math.isfinite(v) for v in losses.values())
    ok = finite and diff <= tol
    return {"status": "ok" if ok else "mismatch", "losses": [losses[s] for s in sorted(losses)],
            "resumed_losses": [again[s] for s in steps], "max_rel_diff": diff, "tolerance": tol,
            **({} if ok else {"error": f"resumed losses differ by {diff:.3g} relative (tolerance {tol:g})"
                              if finite else "non-finite loss"})}


def throughput_child(spec: dict, events: _Events) -> None:
    """Phase 2 in one process (imports, the compile cache and dynamo's graphs shared): each config guarded."""
    from pretrain.distributed import init_distributed, shutdown

    _raise_recompile_limit()
    env = init_distributed(tp=1, seed=0)
    events.emit({"event": "device", "device": device_record(env.backend)})
    work = Path(spec["work"])
    try:
        for entry in spec["items"]:
            left = spec["deadline"] - time.time()
            if left < max(spec["min_start_s"], 1.0):
                events.emit({"name": entry["name"], "status": "skipped",
                             "note": f"the time budget ran out before it started ({left:.0f} s left)"})
                continue
            events.emit({"event": "start", "name": entry["name"]})
            print(f"== {entry['name']}", flush=True)
            t0 = time.time()
            try:
                row = measure(entry, env, work, spec)
            except Exception as err:  # noqa: BLE001 - an OOM or compile failure is a result, not the end
                row = {"status": "error", "error": _one_line(err)}
                traceback.print_exc()
            _release(env.device)
            row["seconds"] = round(time.time() - t0, 1)
            events.emit({"name": entry["name"], **row})
            if row["status"] == "ok":
                mfu = "" if row["mfu"] is None else f", MFU {100 * row['mfu']:.1f}%"
                print(f"   {row['tokens_per_s']:,.0f} tok/s, {row['model_tflops']:.1f} model TFLOP/s{mfu}, "
                      f"{row['step_s_median'] * 1e3:.1f} ms/step ({row['seconds']:.0f} s)", flush=True)
            else:
                print(f"   {row['status']}: {row.get('error', '')}", flush=True)
    finally:
        shutdown()


def _raise_recompile_limit() -> None:
    """Many models compile in one process here (two presets, variants, unrolled): dynamo's per-code cache limit
    (8) would silently fall back to eager for the later ones."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def measure(entry: dict, env, work: Path, spec: dict) -> dict:
    import torch

    from pretrain.config import load_config
    from pretrain.models.compile import compile_stats

    cfg = load_config(entry["preset"], entry["overrides"])
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_mem = torch.cuda.memory_allocated() / 2**30 if cuda else None
    before = compile_stats()
    t0 = time.time()
    step, info, cleanup = (bare_step if entry["kind"] == "bare" else trainer_step)(cfg, env, work / _slug(entry))
    try:
        build_s = time.time() - t0
        times, note = time_steps(step, spec["warmup"], spec["steps"], spec["deadline"], cuda)
    finally:
        cleanup()
    after = compile_stats()
    row = rates(cfg, info, times)
    row.update(status="ok", build_s=round(build_s, 1), warmup_steps=spec["warmup"], steps_measured=len(times),
               step_times_s=[round(t, 5) for t in times],
               compile={"graphs": after["graphs"] - before["graphs"], "recompiles": after["recompiles"]},
               memory_at_start_gib=start_mem)
    if cuda:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        row["peak_memory_gib"] = None
    if note:
        row["note"] = note
    return row


def _slug(entry: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in entry["name"]).strip("-")


def time_steps(step, warmup: int, steps: int, deadline: float, cuda: bool) -> tuple[list[float], str]:
    """Seconds of each measured step after `warmup` unmeasured ones (which pay the compile). Past the deadline the
    measurement stops early (at least one measured step), with a note."""
    import torch

    for _ in range(warmup):
        step()
    times: list[float] = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if time.time() > deadline - 5.0 and len(times) < steps:
            return times, f"{len(times)} of {steps} steps measured: the time budget was running out"
    return times, ""


def rates(cfg, info: dict, times: list[float]) -> dict:
    """Tokens/s, TFLOP/s and MFU/HFU of a row from its median step time; FLOPs as the trainer logs them."""
    from pretrain.metrics import device_peak_flops
    from pretrain.models.flops import flops_per_token

    flops = flops_per_token(cfg.model, cfg.data.seq_len, info["loops"], info["backprop_loops"],
                            cfg.parallel.activation_checkpointing, vocab_size=info["vocab_size"],
                            loss_on="all" if cfg.model.exit_gate else cfg.loop.loss_on)
    median = statistics.median(times)
    tok_s = info["tokens_per_step"] / median
    _, peak = device_peak_flops()
    return {"variant": cfg.model.variant, "loops": info["loops"], "backprop_loops": info["backprop_loops"],
            "activation_checkpointing": cfg.parallel.activation_checkpointing, "d_model": cfg.model.d_model,
            "layers": [cfg.model.n_prelude, cfg.model.n_core, cfg.model.n_coda], "seq_len": cfg.data.seq_len,
            "micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum, "vocab": info["vocab_size"],
            "zero_stage": cfg.parallel.zero_stage, "optimizer": info.get("optimizer", cfg.train.optimizer),
            "params": info["params"], "core_layer_shapes": info["core_layer_shapes"],
            "tokens_per_step": info["tokens_per_step"], "step_s_median": median, "step_s_min": min(times),
            "tokens_per_s": tok_s, "model_flops_per_token": flops.model_flops,
            "hardware_flops_per_token": flops.hardware_flops, "model_tflops": tok_s * flops.model_flops / 1e12,
            "hardware_tflops": tok_s * flops.hardware_flops / 1e12,
            "mfu": tok_s * flops.model_flops / peak if peak else None,
            "hfu": tok_s * flops.hardware_flops / peak if peak else None}


def _model_info(model, cfg, vocab: int, tokens_per_step: int, loops: int, backprop: int) -> dict:
    """What a row records of its model: parameters, and each core layer's parameter shapes (the shared-vs-unrolled
    check compares them: the unrolled model must be the shared one's layers, repeated)."""
    shapes = [sorted(f"{n} {'x'.join(map(str, p.shape)) or '1'}" for n, p in layer.named_parameters())
              for layer in model.core]
    distinct = [s for i, s in enumerate(shapes) if s not in shapes[:i]]
    return {"params": sum(p.numel() for p in model.parameters()), "core_layer_shapes": distinct,
            "vocab_size": vocab, "tokens_per_step": tokens_per_step, "loops": loops, "backprop_loops": backprop}


def trainer_step(cfg, env, run_dir: Path):
    """The trainer's step on this config: (step function, row info, cleanup)."""
    from pretrain.models.depth import depth_for_step
    from pretrain.train import Trainer

    trainer = Trainer(cfg, run_dir, env)
    loops, backprop = depth_for_step(cfg.loop, cfg.model.loops, cfg.seed, 0)
    info = _model_info(trainer.engine.module, cfg, trainer.vocab_size, trainer.tokens_per_step, loops, backprop)

    def step() -> None:
        trainer.train_step()  # the step, its scalars read (fit reads them one step later: the same work)
        trainer.stop.poll(env.device)  # what fit() does after every step

    def cleanup() -> None:
        nonlocal trainer
        trainer.stop.wait()  # the last stop flag's all-reduce
        close = getattr(trainer.train_data, "close", None)
        if close is not None:
            close()
        trainer.log.close()
        destroy = getattr(trainer.engine.ds, "destroy", None)
        if destroy is not None:
            try:
                destroy()
            except Exception:  # noqa: BLE001 - best effort: the memory is released with the objects anyway
                pass
        trainer = None

    return step, info, cleanup


def bare_step(cfg, env, run_dir: Path):
    """A bare compiled PyTorch loop of the same model on the same batches: (step function, row info, cleanup).

    The model is built as the trainer builds it (same config, seed, activation checkpointing, loss chunking, the
    core layers compiled by `compile_model`), with bf16 weights when train.dtype is bf16; the optimizer is torch's
    own: Muon on the trainer's Muon group (train.optimizer muon; AdamW when this torch has no Muon), fused AdamW
    on the other groups at the trainer's learning rates; gradients accumulated over the micro batches, clipped."""
    import torch

    from data_pipeline.loader import PackedDataset
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.batches import model_inputs
    from pretrain.inference import model_vocab_size
    from pretrain.models import build_model, param_roles
    from pretrain.models.compile import compile_model
    from pretrain.models.depth import depth_for_step
    from pretrain.optim import build_param_groups

    t = cfg.train
    tokenizer = load_tokenizer(cfg.tokenizer.dir, cfg.tokenizer.kind)
    vocab = model_vocab_size(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
    model = build_model(cfg.model, cfg.loop, vocab, activation_checkpointing=cfg.parallel.activation_checkpointing,
                        dtype=dtype, device=env.device)
    model.loss_chunk = t.loss_chunk_tokens
    if t.compile:
        compile_model(model)
    cuda = env.device.type == "cuda"
    groups = build_param_groups(model, param_roles(model), t)
    muon = [g for g in groups if g["kind"] == "muon"]
    adam = [dict(params=g["params"], lr=g["lr"], weight_decay=g["weight_decay"]) for g in groups
            if g["kind"] == "adamw" or not hasattr(torch.optim, "Muon")]
    opts = [torch.optim.AdamW(adam, betas=(t.beta1, t.beta2), eps=t.eps, fused=True if cuda else None)]
    used = "adamw"
    if muon and hasattr(torch.optim, "Muon"):
        opts.append(torch.optim.Muon([dict(params=g["params"], lr=g["lr"], weight_decay=g["weight_decay"])
                                      for g in muon], momentum=t.muon_momentum))
        used = "muon (torch.optim.Muon) + adamw"
    data = PackedDataset(cfg.data.train or [cfg.data.out], cfg.data.seq_len, micro_batch=t.micro_batch, dp_rank=0,
                         dp_size=1, seed=cfg.seed, split="train", eval_fraction=0.0 if cfg.data.eval else
                         cfg.data.eval_fraction, tokenizer_sha256=tokenizer.sha256,
                         document_masking=cfg.data.document_masking)
    batches = [model_inputs(data.next_batch(), env.device) for _ in range(t.grad_accum)]
    loops, backprop = depth_for_step(cfg.loop, cfg.model.loops, cfg.seed, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    info = _model_info(model, cfg, vocab, t.micro_batch * t.grad_accum * cfg.data.seq_len, loops, backprop)
    info["optimizer"] = used

    def step() -> None:
        for x in batches:
            out = model(x.inputs, x.labels, loops=loops, backprop_loops=backprop, doc_ids=x.doc_ids)
            (out.loss / len(batches)).backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)

    def cleanup() -> None:
        nonlocal model, opts, batches, params
        model = opts = batches = params = None

    return step, info, cleanup


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:400]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"benchmarks.gpu: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)

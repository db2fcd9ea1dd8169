"""Peak memory and step time of a looped model vs loop count, with and without per-loop checkpointing (CPU).

    python -m benchmarks.bench_models            # writes benchmarks/results/models.json
    python -m benchmarks.bench_models --quick    # smaller model, 2 timed steps (a smoke run)

How memory is measured (every (loops, checkpointing) point in a fresh Python process, so no allocator state
carries over; gradients and AdamW moments are materialised before anything is read):
- tensor_peak_mb (the primary measure): the peak of live tensor memory during one training step (forward,
  backward, optimizer step), from torch.profiler's memory events (+bytes per allocation, -bytes per free, running
  sum) - exact and independent of the allocator; tensors alive before the step (parameters, gradients, optimizer
  state) are the baseline and not counted.
- peak_rss_mb / step_peak_mb: the process's resident-memory high-water mark (ru_maxrss) after a warm-up and one
  step, and that minus the RSS before the first step. These children run with glibc's mmap threshold fixed at
  64 KiB (MALLOC_MMAP_THRESHOLD_): by default glibc raises the threshold as large blocks are freed and serves them
  from a heap it keeps, so RSS would measure fragmentation that grows with the number of allocations (with loops)
  rather than live memory. Allocations under 64 KiB still fragment, so for tiny models (--quick) only
  tensor_peak_mb is meaningful.
- saved_mb: the bytes autograd holds for backward at the end of a forward (saved-tensor hooks).
The target (with checkpointing, peak memory grows <= 15% from 4 to 16 loops) is evaluated on each measure.

Step time comes from a second fresh process per point with the default allocator (the fixed mmap threshold makes
large allocations slow): the fastest of the timed steps after one warm-up step (the median and every step are
recorded too). On a shared machine it is only as good as the load allows; each point records the 1-minute load
average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "models.json"
LOOPS = (2, 4, 8, 16)
SIZES = {  # d_model, heads, core layers, seq, batch, vocab, timed steps
    "default": dict(d_model=256, n_heads=4, n_core=2, seq=256, batch=4, vocab=4096, steps=5),
    "quick": dict(d_model=64, n_heads=2, n_core=2, seq=64, batch=2, vocab=512, steps=2),
    # FLT-like depth (all six layers looped): memory only, to show how the growth depends on the block's depth
    "deep": dict(d_model=256, n_heads=4, n_core=6, seq=256, batch=4, vocab=4096, steps=1),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_point(loops: int, ckpt: str, size: str, mode: str) -> dict:
    """One measurement in this (fresh) process: "memory" (RSS, saved tensors; one step after warm-up) or
    "timing" (median step time over the timed steps)."""
    import torch

    from pretrain.distributed import init_distributed
    from pretrain.models import LoopConfig, ModelConfig, build_model, flops_per_token

    s = SIZES[size]
    init_distributed(tp=1, seed=0)
    cfg = ModelConfig(variant="flt", loops=loops, d_model=s["d_model"], n_heads=s["n_heads"], n_core=s["n_core"],
                      logit_softcap=15.0)
    model = build_model(cfg, LoopConfig(), s["vocab"], activation_checkpointing=ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # gradients and Adam moments exist before the baseline is read
        p.grad = torch.zeros_like(p)
    opt.step()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    baseline = _rss_mb()

    times = []
    for step in range(1 + (s["steps"] if mode == "timing" else 1)):  # the first step warms up, untimed
        t0 = time.perf_counter()
        loss = model(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if step:
            times.append(time.perf_counter() - t0)
    if mode == "timing":
        f = flops_per_token(cfg, s["seq"], loops, 0, ckpt, vocab_size=s["vocab"])
        step_s = min(times)  # on a shared machine the fastest step is the least disturbed estimate
        tokens_per_s = s["batch"] * s["seq"] / step_s
        return dict(step_time_s=round(step_s, 4), step_time_median_s=round(statistics.median(times), 4),
                    step_times_s=[round(t, 4) for t in times],
                    tokens_per_s=round(tokens_per_s, 1), model_flops_per_token=f.model_flops,
                    hardware_flops_per_token=f.hardware_flops,
                    achieved_hardware_gflops=round(f.hardware_flops * tokens_per_s / 1e9, 2),
                    load_average_1m=os.getloadavg()[0])

    peak = _peak_rss_mb()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # one more step, profiled
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = tensor_peak = 0
    for e in events:  # +bytes on allocation, -bytes on free: the running sum is the live tensor memory
        live += e.nbytes()
        tensor_peak = max(tensor_peak, live)
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward leaves for backward
        extra = model(x, y).loss
    extra.backward()
    return dict(tensor_peak_mb=round(tensor_peak / 2**20, 3), baseline_rss_mb=round(baseline, 1),
                peak_rss_mb=round(peak, 1), step_peak_mb=round(peak - baseline, 1),
                saved_mb=round(sum(saved.values()) / 2**20, 3), loss=round(loss.item(), 4))


def _child(loops: int, ckpt: str, size: str, mode: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_models", "--point", str(loops), ckpt, size, mode]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if mode == "memory":  # honest RSS (module docstring); it slows large allocations, so timing runs without it
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{mode} measurement {loops} loops / {ckpt} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    import warnings

    import torch

    with warnings.catch_warnings():  # megatron announces the absence of Apex / Transformer Engine
        warnings.simplefilter("ignore")
        import megatron.core

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "pretrain/models", "benchmarks"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", None
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
                platform=platform.platform(), torch=torch.__version__, megatron_core=megatron.core.__version__,
                git_commit=commit, models_tree_dirty=dirty, load_average=os.getloadavg())


def growth(points: list[dict], ckpt: str, key: str) -> float:
    by = {p["loops"]: p[key] for p in points if p["checkpointing"] == ckpt}
    return by[16] / by[4] - 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--point", nargs=4, metavar=("LOOPS", "CKPT", "SIZE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:  # child process: one measurement, JSON on stdout
        loops, ckpt, size, mode = args.point
        print(json.dumps(run_point(int(loops), ckpt, size, mode)))
        return

    size = "quick" if args.quick else "default"
    points = []
    for ckpt in ("none", "loop"):
        for loops in LOOPS:
            point = dict(loops=loops, checkpointing=ckpt, **_child(loops, ckpt, size, "memory"),
                         **_child(loops, ckpt, size, "timing"))
            points.append(point)
            print(f"loops {loops:2d}  ckpt {ckpt:4s}  step {point['step_time_s']:7.3f} s  "
                  f"tensor peak {point['tensor_peak_mb']:7.1f} MB  RSS peak {point['peak_rss_mb']:7.1f} MB  "
                  f"(+{point['step_peak_mb']:6.1f} MB)  saved {point['saved_mb']:6.1f} MB  "
                  f"load {point['load_average_1m']:.1f}", flush=True)

    keys = ("tensor_peak_mb", "peak_rss_mb", "step_peak_mb", "saved_mb")
    summary = {f"{key}_growth_4_to_16_{ckpt}": round(growth(points, ckpt, key), 4)
               for ckpt in ("none", "loop") for key in keys}
    s = SIZES[size]
    summary["loop_state_mb"] = s["batch"] * s["seq"] * s["d_model"] * 4 / 2**20  # one fp32 [B, T, d] state
    ckpt_by = {p["loops"]: p for p in points if p["checkpointing"] == "loop"}
    for key in ("tensor_peak_mb", "saved_mb"):  # with checkpointing, memory per extra loop (vs loop_state_mb)
        summary[f"{key}_per_extra_loop_loop"] = round((ckpt_by[16][key] - ckpt_by[4][key]) / 12, 3)
    if not args.quick:  # the same growth with a 6-layer looped block (memory only)
        deep = {n: _child(n, "loop", "deep", "memory") for n in (4, 16)}
        print(f"n_core 6, ckpt loop: tensor peak {deep[4]['tensor_peak_mb']:.1f} -> {deep[16]['tensor_peak_mb']:.1f} MB"
              f", RSS peak {deep[4]['peak_rss_mb']:.1f} -> {deep[16]['peak_rss_mb']:.1f} MB", flush=True)
        summary["deep_n_core_6_loop"] = {
            "points": deep, **{f"{key}_growth_4_to_16": round(deep[16][key] / deep[4][key] - 1, 4)
                               for key in ("tensor_peak_mb", "peak_rss_mb", "step_peak_mb", "saved_mb")}}
    summary["target"] = "with per-loop checkpointing, peak memory grows <= 15% from 4 to 16 loops"
    for key in keys:
        summary[f"target_met_{key}"] = summary[f"{key}_growth_4_to_16_loop"] <= 0.15
    result = dict(benchmark="bench_models", size=size, config=dict(variant="flt", **SIZES[size]),
                  memory_method="fresh subprocess per point; tensor_peak = peak live tensor bytes in one step "
                                "(torch.profiler memory events); with MALLOC_MMAP_THRESHOLD_=65536: peak_rss = "
                                "ru_maxrss after warm-up + one step, step_peak = peak_rss - RSS after model + grads + "
                                "AdamW state; saved = autograd saved-tensor bytes after forward",
                  timing_method="separate fresh subprocess per point, default allocator, fastest of the timed steps",
                  machine=machine_info(), summary=summary, points=points,
                  created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

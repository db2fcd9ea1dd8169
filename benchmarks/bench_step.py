"""`make bench BENCH=step`: Muon's optimizer step, distributed vs redundant, and the chunked loss's memory.

Muon's optimizer step on 2 data-parallel processes: distributed (each matrix orthogonalised by one owner,
batched) against the redundant path (every rank orthogonalises every matrix), per ZeRO layout.

Two gloo processes on CPU hold the Muon matrices of a small Fully Looped Transformer (quickstart's model at
d_model 128 with 4 core layers) with identical gradients (as after DP averaging), and time the Muon step
alone (AdamW groups left out: they are the same in both paths). Layouts: ZeRO 0 (whole matrices, through
`HybridOptimizer`), ZeRO 1/2 (one flat partition per rank, matrices straddling the boundary, DeepSpeed's
fragment addresses) and ZeRO 3 (per-matrix chunks). Bytes each rank sends and the Newton-Schulz FLOPs it
runs come from `MuonStats` (counted from the shapes as the step runs; see pretrain/muon.py). On 2 CPU
cores the two processes share the cores, so time is the less telling number; bytes and FLOPs are exact.
The chunked loss (`chunked_loss`, one process): bytes autograd saves for backward, whole-batch cross-entropy vs
`train.loss_chunk_tokens`, on a model whose 32k-token vocabulary makes the logits the largest activation.
Compiled vs eager (`compile_vs_eager`, one process): a training step (forward, backward, AdamW) of a tiny FLT with
its core layers compiled as `train.compile: true` compiles them (`compile_model`) against the same model eager: the
first step's cost (the compile), then the step time, the two models' steps alternating, and their losses side by
side. On a shared CPU the times are noisy (the load average is recorded); the GPU numbers are benchmarks/gpu.py's.
Run: python -m benchmarks.bench_step  (writes benchmarks/results/step.json)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import time

WORLD, STEPS, WARMUP = 2, 12, 2
OVERRIDES = ["model.d_model=128", "model.n_core=4", "model.n_heads=4"]
VOCAB = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: mp.Queue) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    from pretrain.distributed import init_distributed, shutdown

    env = init_distributed(tp=1, seed=0)
    try:
        out.put((rank, _measure(env)))
    except BaseException as err:  # noqa: BLE001 - the parent must hear about it instead of waiting
        out.put((rank, {"error": repr(err)}))
        raise
    finally:
        shutdown()


def _measure(env) -> dict:
    from collections import defaultdict
    from functools import partial
    from types import SimpleNamespace

    import torch
    from megatron.core import parallel_state as ps

    from pretrain.config import load_config
    from pretrain.models import build_model, param_roles
    from pretrain.muon import MatrixInfo, MuonStats, TPContext, Zero3Matrix, muon_step_flat, muon_step_zero3
    from pretrain.optim import HybridOptimizer, build_param_groups

    cfg = load_config("configs/quickstart.yaml", OVERRIDES + ["train.optimizer=muon"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loop, VOCAB)
    (group,) = [g for g in build_param_groups(model, param_roles(model), cfg.train) if g["name"] == "muon"]
    mats = [p.detach() for p in group["params"]]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(m.shape, generator=g) * 1e-3 for m in mats]  # same on every rank: DP-averaged
    dp_group, world, rank = ps.get_data_parallel_group(), env.dp, env.dp_rank
    tp = TPContext(None)
    infos = [MatrixInfo.of(m, 1) for m in mats]
    numels = [m.numel() for m in mats]
    args = dict(lr=0.02, wd=0.0, beta=0.95, tp=tp, steps=5, ns_dtype=torch.float32)

    setups: dict[str, tuple] = {}  # "zero0_redundant" -> (step function, its MuonStats)

    def timed(layout: str) -> None:
        """Both paths of one layout, alternating step by step (so load from elsewhere hits both alike)."""
        pair = [f"{layout}_redundant", f"{layout}_distributed"]
        for _ in range(WARMUP):
            for key in pair:
                setups[key][0]()
        times: dict[str, list[float]] = {key: [] for key in pair}
        for i in range(STEPS):
            for key in pair if i % 2 == 0 else pair[::-1]:
                torch.distributed.barrier()
                t0 = time.perf_counter()
                setups[key][0]()
                times[key].append(time.perf_counter() - t0)
        for key in pair:
            fn, stats = setups[key]
            stats.reset()
            fn()
            out[key] = {"step_ms_median": statistics.median(times[key]) * 1e3, "step_ms_min": min(times[key]) * 1e3,
                        "dp_bytes_sent": stats.dp_bytes, "ns_gflops": stats.ns_flops / 1e9,
                        "matrices_orthogonalised": stats.matrices}

    out = {"matrices": len(mats), "muon_params": sum(numels),
           "shapes": sorted({tuple(m.shape) for m in mats})}
    for distributed in (False, True):
        name = "distributed" if distributed else "redundant"
        # ZeRO 0: whole matrices through the optimizer
        params = [torch.nn.Parameter(m.clone()) for m in mats]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        opt = HybridOptimizer([dict(params=params, name="muon", kind="muon", lr=0.02, weight_decay=0.0)],
                              betas=(0.9, 0.95), eps=1e-8, momentum=0.95, dp_group=dp_group,
                              muon_distributed=distributed)
        setups[f"zero0_{name}"] = (opt.step, opt.muon_stats)

        # ZeRO 1/2: matrices back to back, split into equal partitions; DeepSpeed's fragment addresses
        part = -(-sum(numels) // world)
        lo, hi, off, lps = rank * part, (rank + 1) * part, 0, []
        whole = torch.zeros(part * world)
        whole[:sum(numels)] = torch.cat([m.reshape(-1) for m in mats])
        gwhole = torch.zeros(part * world)
        gwhole[:sum(numels)] = torch.cat([gr.reshape(-1) for gr in grads])
        for m in mats:
            a, b = max(off, lo), min(off + m.numel(), hi)
            lp = torch.empty(0)
            if b > a:
                lp._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=a - off, numel=b - a),
                                                 hp_fragment_address=SimpleNamespace(start=a - lo, numel=b - a))
            lps.append(lp)
            off += m.numel()
        flat, state, stats = whole[lo:hi].clone(), defaultdict(dict), MuonStats()
        flat.grad = gwhole[lo:hi].clone()
        setups[f"zero12_{name}"] = (partial(muon_step_flat, flat, lps, infos, state, dp_group=dp_group,
                                            distributed=distributed, stats=stats, plans={}, **args), stats)

        # ZeRO 3: per matrix a chunk of ceil(numel / world) elements, zero-padded
        chunks = [-(-n // world) for n in numels]
        z3, offset, parts, gparts = [], 0, [], []
        for m, gr, info, c in zip(mats, grads, infos, chunks, strict=True):
            z3.append(Zero3Matrix(info, offset, c, m.numel()))
            offset += c
            for src, dst in ((m, parts), (gr, gparts)):
                padded = torch.zeros(c * world)
                padded[:m.numel()] = src.reshape(-1)
                dst.append(padded[rank * c:(rank + 1) * c])
        flat3, state3, stats3 = torch.cat(parts), defaultdict(dict), MuonStats()
        flat3.grad = torch.cat(gparts)
        setups[f"zero3_{name}"] = (partial(muon_step_zero3, flat3, z3, state3, dp_group=dp_group,
                                           distributed=distributed, stats=stats3, **args), stats3)
    for layout in ("zero0", "zero12", "zero3"):
        timed(layout)
    return out


def main() -> dict:
    from benchmarks.common import write_result

    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    per_rank = dict(queue.get(timeout=600) for _ in range(WORLD))
    for p in procs:
        p.join(timeout=30)
    errors = [v["error"] for v in per_rank.values() if "error" in v]
    if errors:
        raise RuntimeError(f"bench_step worker failed: {errors[0]}")
    first = per_rank[0]
    layouts = {}
    for layout in ("zero0", "zero12", "zero3"):
        row = {}
        for name in ("redundant", "distributed"):
            ranks = [per_rank[r][f"{layout}_{name}"] for r in range(WORLD)]
            row[name] = {"step_ms_median_max_over_ranks": max(x["step_ms_median"] for x in ranks),
                         "step_ms_min_max_over_ranks": max(x["step_ms_min"] for x in ranks),
                         "dp_bytes_sent_per_rank": [x["dp_bytes_sent"] for x in ranks],
                         "ns_gflops_per_rank": [round(x["ns_gflops"], 4) for x in ranks],
                         "matrices_per_rank": [x["matrices_orthogonalised"] for x in ranks]}
        red, dis = row["redundant"], row["distributed"]
        row["speedup_median"] = red["step_ms_median_max_over_ranks"] / dis["step_ms_median_max_over_ranks"]
        row["speedup_min"] = red["step_ms_min_max_over_ranks"] / dis["step_ms_min_max_over_ranks"]
        layouts[layout] = row
        print(f"{layout:7s} redundant {red['step_ms_min_max_over_ranks']:7.1f} ms (min), "
              f"{max(red['dp_bytes_sent_per_rank']):>9,} B/rank | distributed "
              f"{dis['step_ms_min_max_over_ranks']:7.1f} ms (min), {max(dis['dp_bytes_sent_per_rank']):>9,} B/rank")
    results = {
        "model": {"config": "configs/quickstart.yaml", "overrides": OVERRIDES, "muon_matrices": first["matrices"],
                  "muon_params": first["muon_params"], "shapes": first["shapes"]},
        "dp": WORLD, "tp": 1, "layouts": layouts,
        "load_average_1min_after": os.getloadavg()[0],  # other work on the machine makes the times noisy
        "note": f"2 gloo processes on CPU (1 thread each), fp32 Newton-Schulz, 5 iterations; Muon step only; "
                f"{STEPS} steps after {WARMUP}, the two paths alternating step by step; min is the number to "
                "read on a shared machine; bytes per rank per step in the ring model of each "
                "collective (MuonStats); zero12 distributed: the 16 B per matrix of fragment addresses go at the "
                "first step only (the plan is kept), so a measured step sends only the straddling matrices",
    }
    results["chunked_loss"] = chunked_loss()
    results["compile"] = compile_vs_eager()
    write_result("step", results)
    return results


def chunked_loss(vocab: int = 32768, tokens: int = 1024, chunk: int = 256) -> dict:
    """train.loss_chunk_tokens: bytes autograd keeps for backward at the end of the forward (the activation memory
    a step peaks with), the largest single saved tensor, and the step time, whole-batch loss vs chunked, on a
    small model with a large vocabulary (the logits dominate), one process."""
    import torch

    from pretrain.distributed import init_distributed, shutdown
    from pretrain.models import build_model
    from pretrain.models.config import LoopConfig, ModelConfig

    init_distributed(tp=1, seed=0)
    out = {"vocab": vocab, "tokens_per_micro_batch": tokens, "chunk": chunk}
    try:
        cfg = ModelConfig(variant="flt", d_model=128, n_heads=4, n_core=2, loops=4)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (tokens // 256, 257), generator=g)
        for n in (0, chunk):
            torch.manual_seed(0)
            model = build_model(cfg, LoopConfig(), vocab, device="cpu")
            model.loss_chunk = n
            sizes: list[int] = []

            def pack(t, sizes=sizes):
                sizes.append(t.numel() * t.element_size())
                return t

            times = []
            for step in range(4):
                start = time.perf_counter()
                if step == 0:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        loss = model(x[:, :-1], x[:, 1:]).loss
                else:
                    loss = model(x[:, :-1], x[:, 1:]).loss
                loss.backward()
                times.append(time.perf_counter() - start)
            key = "chunked" if n else "whole"
            out[key] = {"saved_for_backward_mb": sum(sizes) / 2**20, "largest_saved_mb": max(sizes) / 2**20,
                        "step_ms_min": 1000 * min(times[1:]), "loss": float(loss.detach())}
            print(f"loss {key:8s}: {sum(sizes) / 2**20:8.1f} MB saved for backward (largest tensor "
                  f"{max(sizes) / 2**20:.1f} MB), step {1000 * min(times[1:]):.0f} ms")
    finally:
        shutdown()
    return out


def compile_vs_eager(steps: int = 10, warmup: int = 3) -> dict:
    """`train.compile`: step time of a tiny FLT (d_model 128, 2 core layers x 4 loops, 4 x 128 tokens, vocabulary
    512) with the core layers compiled (`compile_model`) vs eager, on CPU, one process. Each model's first step is
    timed apart (the compile, cold: inductor gets an empty cache directory for this measurement; one intra-op
    thread for both models), then `warmup` more
    steps each, then `steps` steps alternating between the two (so load from elsewhere hits both alike); losses of
    the same steps side by side (the same initial weights, data and AdamW)."""
    import shutil
    import tempfile

    import torch

    cold = tempfile.mkdtemp(prefix="bench-step-inductor-")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread each: on an oversubscribed machine more threads only add spin-waiting
    try:
        return _compile_vs_eager(steps, warmup)
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(cold, ignore_errors=True)


def _compile_vs_eager(steps: int, warmup: int) -> dict:
    import torch

    from pretrain.distributed import init_distributed, shutdown
    from pretrain.models import build_model
    from pretrain.models.compile import compile_model, compile_stats
    from pretrain.models.config import LoopConfig, ModelConfig

    cfg = ModelConfig(variant="flt", d_model=128, n_heads=4, n_core=2, loops=4)
    out: dict = {"model": {"variant": cfg.variant, "d_model": cfg.d_model, "n_core": cfg.n_core, "loops": cfg.loops,
                           "batch": 4, "seq_len": 128, "vocab": 512},
                 "dynamo_disabled": os.environ.get("TORCHDYNAMO_DISABLE", "0") == "1"}
    init_distributed(tp=1, seed=0)
    try:
        x = torch.randint(0, 512, (4, 129), generator=torch.Generator().manual_seed(0))
        runs = {}
        for name in ("eager", "compiled"):
            torch.manual_seed(0)
            model = build_model(cfg, LoopConfig(), 512, device="cpu")
            if name == "compiled":
                compile_model(model)
            runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), [], [])

        def step(name: str) -> None:
            model, opt, times, losses = runs[name]
            start = time.perf_counter()
            loss = model(x[:, :-1], x[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))

        for name in runs:
            for _ in range(1 + warmup):
                step(name)
        for i in range(steps):
            for name in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
                step(name)
        for name, (_, _, times, losses) in runs.items():
            out[name] = {"first_step_s": times[0], "step_ms_median": statistics.median(times[1 + warmup:]) * 1e3,
                         "step_ms_min": min(times[1 + warmup:]) * 1e3, "losses": losses}
        eager, compiled = out["eager"], out["compiled"]
        out["speedup_median"] = eager["step_ms_median"] / compiled["step_ms_median"]
        out["speedup_min"] = eager["step_ms_min"] / compiled["step_ms_min"]
        out["max_rel_loss_diff"] = max(abs(a - b) / abs(a) for a, b in zip(eager["losses"], compiled["losses"],
                                                                            strict=True))
        out["compile_stats"] = compile_stats()
        out["load_average_1min_after"] = os.getloadavg()[0]
        out["note"] = (f"one process on CPU, one thread, fp32; {steps} steps per model after its first step and "
                       f"{warmup} more, the two alternating; the first step includes the compile (cold inductor "
                       "cache); noisy on a shared machine")
        print(f"compile: eager {eager['step_ms_min']:.1f} ms vs compiled {compiled['step_ms_min']:.1f} ms (min), "
              f"first compiled step {compiled['first_step_s']:.1f} s, losses within {out['max_rel_loss_diff']:.1e}")
    finally:
        shutdown()
    return out


if __name__ == "__main__":
    main()

"""Distributed Muon (`train.muon_distributed`): owners, batched Newton-Schulz, and equality with the redundant path.

The multi-process tests run real gloo processes (tests/dist.py) and, in each, both Muon paths on the same
data for every ZeRO layout: ZeRO 0 (whole matrices, through `HybridOptimizer`), ZeRO 1/2 (one flat
partition per rank in which matrices straddle the partition boundary, described by DeepSpeed's
`_hp_mapping` fragment addresses) and ZeRO 3 (per-matrix chunks, zero-padded). Each run is compared with
the redundant path (every rank orthogonalises everything, today's Muon) and with Keller Jordan's
single-device Muon (`ref_muon_step`) on the whole matrices, to 1e-6, the tolerance the existing Muon tests
use: weights are O(1) and the two paths differ only in how fp32 matmuls are blocked (batched vs 2-D
kernels), measured at 2.4e-7 here after 3 steps. Bytes and FLOPs each rank reports are compared exactly
with what the shapes give.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pretrain.muon import (
    MatrixInfo,
    MuonStats,
    TPContext,
    assign_owners,
    assign_owners_by_locality,
    newton_schulz,
    newton_schulz_batched,
    ns_flops,
)
from tests.trainer.test_optim import ref_muon_step

SHAPES = [(8, 4), (8, 4), (4, 8), (6, 6), (8, 4), (4, 6)]  # full shapes; three equal ones batch together
TP_DIM = [0, 1, None, 0, 1, None]  # megatron's partition_dim under TP=2 (None = replicated)
STEPS, LR, WD, BETA = 3, 0.05, 0.1, 0.9
TOL = 1e-6


# --- single process ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 16), (24, 8), (8, 24), (8, 4), (6, 6)])
def test_batched_newton_schulz_equals_one_at_a_time(shape):
    """Each matrix of a stack, and a stack of one, gives `newton_schulz`'s result. NS outputs are O(1)
    (singular values 0.7-1.2); 2e-6 is ~16 fp32 ulps, room for the different blocking of 3-D and 2-D
    matmul kernels on tiny matrices (measured <= 8.4e-7 at 8x4 and 6x6; bit-equal from 16x16 up on CPU)."""
    g = torch.Generator().manual_seed(3)
    stack = torch.randn(5, *shape, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3]).view(5, 1, 1)
    batched = newton_schulz_batched(stack)
    assert batched.shape == stack.shape
    for k in range(5):  # per-matrix normalisation: a batch-mate 1e6x larger does not change the result
        assert (batched[k] - newton_schulz(stack[k])).abs().max().item() <= 2e-6, k
        assert (newton_schulz_batched(stack[k:k + 1])[0] - newton_schulz(stack[k])).abs().max().item() <= 2e-6


def test_owners_are_deterministic_balanced_and_cover_every_matrix():
    shapes = [(64, 16)] * 6 + [(16, 16)] * 5 + [(128, 64), (16, 48)]
    for world in (1, 2, 3, 4):
        owners = assign_owners(shapes, world)
        assert owners == assign_owners(list(shapes), world)  # a pure function of the shapes: every rank agrees
        assert set(owners) <= set(range(world)) and len(owners) == len(shapes)
        load = [sum(ns_flops(*s) for s, o in zip(shapes, owners, strict=True) if o == r) for r in range(world)]
        biggest = max(ns_flops(*s) for s in shapes)
        assert max(load) - min(load) <= biggest, (world, load)  # greedy longest-first: within one matrix
    two = assign_owners(shapes[:11], 2)  # equal shapes spread evenly, so each owner can batch its share
    assert sorted(two[:6]) == [0, 0, 0, 1, 1, 1] and abs(two[6:].count(0) - two[6:].count(1)) == 1
    # ZeRO 1/2: the rank holding most of a matrix owns it; an even split goes to the less loaded rank
    assert assign_owners_by_locality([(4, 4), (4, 4), (8, 8), (8, 8)], [[16, 0], [6, 10], [32, 32], [32, 32]]) == [
        0, 1, 0, 1]
    assert ns_flops(8, 4, steps=1) == 4 * 4 * 4 * 8 + 2 * 4 ** 3 and ns_flops(4, 8) == ns_flops(8, 4)


def test_config_key_selects_the_path():
    from pretrain.config import TrainConfig, load_config
    from pretrain.optim import build_optimizer
    from tests.trainer.test_optim import ROLES, _Net

    assert TrainConfig().muon_distributed is True
    assert load_config(None, ["train.muon_distributed=false"]).train.muon_distributed is False
    for flag in (True, False):
        opt = build_optimizer(_Net(), ROLES, replace(TrainConfig(), optimizer="muon", muon_distributed=flag))
        assert opt.muon_distributed is flag


# --- the per-rank body: both paths, every layout ------------------------------------------------------------

def _data():
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(*s, generator=g) for s in SHAPES]
    grads = [[torch.randn(*s, generator=g) for s in SHAPES] for _ in range(STEPS)]
    return weights, grads


def _local(t: torch.Tensor, k: int, tp: int, tp_rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=TP_DIM[k])[tp_rank].clone() if tp > 1 and TP_DIM[k] is not None else t.clone()


def _zero12_partition(numels: list[int], dp: int, dp_rank: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """ZeRO 1/2's layout: matrices flattened back to back, split into dp equal partitions. Returns this rank's
    [lo, hi) and, per matrix, (start in the matrix, start in the partition, length) of its fragment here."""
    total = sum(numels)
    part = -(-total // dp)
    lo, hi = dp_rank * part, (dp_rank + 1) * part
    frags, off = [], 0
    for n in numels:
        a, b = max(off, lo), min(off + n, hi)
        frags.append((a - off, a - lo, b - a) if b > a else (0, 0, 0))
        off += n
    return lo, part, frags


def _stats_tuple(s: MuonStats) -> tuple[int, int, int, int]:
    return s.dp_bytes, s.tp_bytes, s.ns_flops, s.matrices


def _rank_body(tp_size: int) -> dict:
    import torch.distributed as dist

    from pretrain.muon import Zero3Matrix, muon_step_flat, muon_step_zero3
    from pretrain.optim import HybridOptimizer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // tp_size
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    tp_group = dp_group = None
    for d in range(dp):  # every rank must create every group
        g = dist.new_group([d * tp_size + t for t in range(tp_size)])
        tp_group = g if d == dp_rank else tp_group
    for t in range(tp_size):
        g = dist.new_group([d * tp_size + t for d in range(dp)])
        dp_group = g if t == tp_rank else dp_group
    tp = TPContext(tp_group if tp_size > 1 else None)
    weights, grads = _data()
    local_w = [_local(w, k, tp_size, tp_rank) for k, w in enumerate(weights)]
    local_g = [[_local(g, k, tp_size, tp_rank) for k, g in enumerate(step)] for step in grads]
    infos = [MatrixInfo(w.shape, TP_DIM[k] if tp_size > 1 else None) for k, w in enumerate(local_w)]
    numels = [w.numel() for w in local_w]
    args = dict(lr=LR, wd=WD, beta=BETA, tp=tp, steps=5, ns_dtype=torch.float32)
    out: dict = {"rank": rank, "tp_rank": tp_rank, "dp_rank": dp_rank}

    def gather_flat(flat: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(flat) for _ in range(dp)]
        dist.all_gather(parts, flat, group=dp_group)
        return torch.cat(parts)

    for distributed in (True, False):
        key = "dist" if distributed else "redundant"
        # ZeRO 0, through the optimizer (its dispatch, its dp_group, its stats)
        params = [torch.nn.Parameter(w.clone()) for w in local_w]
        for k, p in enumerate(params):
            if tp_size > 1 and TP_DIM[k] is not None:
                p.tensor_model_parallel, p.partition_dim = True, TP_DIM[k]
        opt = HybridOptimizer([dict(params=params, name="muon", kind="muon", lr=LR, weight_decay=WD)],
                              betas=(0.9, 0.95), eps=1e-8, momentum=BETA, tp_group=tp.group, dp_group=dp_group,
                              muon_distributed=distributed)
        for step in range(STEPS):
            for p, g in zip(params, local_g[step], strict=True):
                p.grad = g.clone()
            opt.muon_stats.reset()  # the optimizer sums its stats over steps
            opt.step()
        out[f"z0-{key}"] = [p.detach().numpy().copy() for p in params]
        out[f"z0-{key}-mom"] = [opt.state[p]["momentum_buffer"].numpy().copy() for p in params]
        out[f"z0-{key}-stats"] = _stats_tuple(opt.muon_stats)

        # ZeRO 1/2: one flat partition; DeepSpeed's fragment addresses on stand-in lp tensors
        lo, part, frags = _zero12_partition(numels, dp, dp_rank)
        whole = torch.zeros(part * dp)
        whole[:sum(numels)] = torch.cat([w.reshape(-1) for w in local_w])
        flat = whole[lo:lo + part].clone()
        lp_params = []
        for w, (at, hp, n) in zip(local_w, frags, strict=True):
            lp = torch.empty_like(w)
            if n:
                lp._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=at, numel=n),
                                                 hp_fragment_address=SimpleNamespace(start=hp, numel=n))
            lp_params.append(lp)
        state, stats = defaultdict(dict), MuonStats()
        for step in range(STEPS):
            gwhole = torch.zeros(part * dp)
            gwhole[:sum(numels)] = torch.cat([g.reshape(-1) for g in local_g[step]])
            flat.grad = gwhole[lo:lo + part].clone()
            stats.reset()
            muon_step_flat(flat, lp_params, infos, state, dp_group=dp_group, distributed=distributed, stats=stats,
                           **args)
        full = gather_flat(flat)
        assert not full[sum(numels):].any()  # padding past the last matrix stays zero
        out[f"z12-{key}"] = [t.view(w.shape).numpy().copy() for t, w in
                             zip(full[:sum(numels)].split(numels), local_w, strict=True)]
        out[f"z12-{key}-stats"] = _stats_tuple(stats)

        # ZeRO 3: per matrix a chunk of ceil(numel / dp) elements, zero-padded, concatenated
        def partition(tensors: list[torch.Tensor]) -> torch.Tensor:
            parts = []
            for t in tensors:
                chunk = -(-t.numel() // dp)
                padded = torch.zeros(chunk * dp)
                padded[:t.numel()] = t.reshape(-1)
                parts.append(padded[dp_rank * chunk:(dp_rank + 1) * chunk])
            return torch.cat(parts)

        matrices, offset = [], 0
        for info, n in zip(infos, numels, strict=True):
            chunk = -(-n // dp)
            matrices.append(Zero3Matrix(info, offset, chunk, n))
            offset += chunk
        flat, state, stats = partition(local_w), defaultdict(dict), MuonStats()
        for step in range(STEPS):
            flat.grad = partition(local_g[step])
            stats.reset()
            muon_step_zero3(flat, matrices, state, dp_group=dp_group, distributed=distributed, stats=stats, **args)
        gathered = gather_flat(flat).view(dp, -1)
        mats = []
        for m in matrices:
            w = gathered[:, m.offset:m.offset + m.chunk].reshape(-1)
            assert not w[m.numel:].any()  # ZeRO-3 padding stays zero
            mats.append(w[:m.numel].view(m.info.local_shape).numpy().copy())
        out[f"z3-{key}"] = mats
        out[f"z3-{key}-stats"] = _stats_tuple(stats)
    return out


# --- checks in the parent ---------------------------------------------------------------------------------

def _reference() -> list[torch.Tensor]:
    weights, grads = _data()
    moms = [torch.zeros_like(w) for w in weights]
    for step in range(STEPS):
        for w, m, g in zip(weights, moms, grads[step], strict=True):
            w.grad = g
            ref_muon_step(w, m, lr=LR, wd=WD, beta=BETA)
    return [w.detach() for w in weights]


def _assemble(results: list[dict], key: str, dp_rank: int) -> list[torch.Tensor]:
    """Whole matrices from the TP blocks of one DP replica."""
    shards = {r["tp_rank"]: r[key] for r in results if r["dp_rank"] == dp_rank}
    tp = len(shards)
    return [torch.cat([torch.from_numpy(shards[t][k]) for t in range(tp)], dim=TP_DIM[k])
            if tp > 1 and TP_DIM[k] is not None else torch.from_numpy(shards[0][k]) for k in range(len(SHAPES))]


def _check_paths_agree(results: list[dict], dp: int) -> None:
    want = _reference()
    for layout in ("z0", "z12", "z3"):
        for r in results:  # distributed == redundant on every rank, to fp32 rounding (here: bit for bit)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(r[f"{layout}-dist"], r[f"{layout}-redundant"],
                                                                  strict=True))
            assert diff <= TOL, (layout, r["rank"], diff)
        for d in range(dp):
            got = _assemble(results, f"{layout}-dist", d)
            for k, (a, b) in enumerate(zip(got, want, strict=True)):
                assert (a - b).abs().max().item() <= TOL, (layout, d, k)
    for r in results:  # same optimizer state in both paths: checkpoints move between them
        assert all(np.array_equal(a, b) for a, b in zip(r["z0-dist-mom"], r["z0-redundant-mom"], strict=True))
    moved = _assemble(results, "z0-dist", 0)[0] - _data()[0][0]
    assert moved.abs().max().item() > 1e-2  # the weights really moved


def _expected_stats(dp: int, dp_rank: int) -> dict[str, tuple[int, int, int]]:
    """(dp bytes, NS FLOPs, matrices) one DP=dp, TP=1 rank should report per step, from the shapes alone."""
    numels = [a * b for a, b in SHAPES]
    owners = assign_owners(SHAPES, dp)
    every = sum(ns_flops(*s) for s in SHAPES)
    owned = sum(ns_flops(*s) for s, o in zip(SHAPES, owners, strict=True) if o == dp_rank)
    n_owned = owners.count(dp_rank)
    width = max(sum(n for n, o in zip(numels, owners, strict=True) if o == r) for r in range(dp))

    def exchange(pieces: list[list[int]], owners: list[int]) -> int:  # elements to owners, results back
        out = sum(pieces[k][dp_rank] for k in range(len(SHAPES)) if owners[k] != dp_rank)
        back = sum(pieces[k][r] for k in range(len(SHAPES)) if owners[k] == dp_rank for r in range(dp) if r != dp_rank)
        return 4 * (out + back)

    z12 = [[_zero12_partition(numels, dp, r)[2][k][2] for r in range(dp)] for k in range(len(SHAPES))]
    near = assign_owners_by_locality(SHAPES, z12)
    assert all(z12[k][near[k]] == max(z12[k]) for k in range(len(SHAPES)))
    z12_owned = [ns_flops(*s) for s, o in zip(SHAPES, near, strict=True) if o == dp_rank]
    chunks = [-(-n // dp) for n in numels]
    z3 = [[max(0, min(c, n - r * c)) for r in range(dp)] for n, c in zip(numels, chunks, strict=True)]
    return {"z0-redundant": (0, every, len(SHAPES)), "z0-dist": ((dp - 1) * width * 4, owned, n_owned),
            "z12-redundant": (sum(2 * (dp - 1) * n * 4 // dp for n in numels), every, len(SHAPES)),
            "z12-dist": (exchange(z12, near) + (dp - 1) * len(SHAPES) * 16, sum(z12_owned), len(z12_owned)),
            "z3-redundant": ((dp - 1) * sum(chunks) * 4, every, len(SHAPES)),
            "z3-dist": (exchange(z3, owners), owned, n_owned)}


@pytest.fixture(scope="module")
def dp2():
    from tests.dist import run_distributed

    return run_distributed(_rank_body, 2, args=(1,))


def test_dp2_distributed_equals_redundant_and_reference_muon(dp2):
    _check_paths_agree(dp2, dp=2)


def test_dp2_bytes_and_flops_per_rank_follow_from_the_shapes(dp2):
    flops = {k: 0 for k in ("z0", "z12", "z3")}
    for r in dp2:
        want = _expected_stats(2, r["dp_rank"])
        for key, (dp_bytes, ns, n) in want.items():
            assert r[f"{key}-stats"] == (dp_bytes, 0, ns, n), (key, r["rank"])
        for layout in flops:
            flops[layout] += r[f"{layout}-dist-stats"][2]
    every = sum(ns_flops(*s) for s in SHAPES)
    assert all(v == every for v in flops.values())  # each matrix orthogonalised exactly once over the DP group
    # ZeRO 1/2: only the matrix straddling the partition boundary travels, instead of an all-reduce of all
    assert all(4 * r["z12-dist-stats"][0] < r["z12-redundant-stats"][0] for r in dp2)


def test_tp2_dp2_distributed_equals_redundant_and_reference_muon():
    """4 processes: TP shards gathered before Newton-Schulz, owners over the DP group of each TP rank."""
    from tests.dist import run_distributed

    results = run_distributed(_rank_body, 4, args=(2,))
    _check_paths_agree(results, dp=2)
    local = [s[0] * s[1] // (2 if TP_DIM[k] is not None else 1) for k, s in enumerate(SHAPES)]
    held = [[_zero12_partition(local, 2, r)[2][k][2] for r in range(2)] for k in range(len(SHAPES))]
    owners = {"z0": assign_owners(SHAPES, 2), "z12": assign_owners_by_locality(SHAPES, held),
              "z3": assign_owners(SHAPES, 2)}
    agree = 2 * 1 * (2 * len(SHAPES)) * 8 // 2  # z12: the TP group's all-reduce that checks its owners agree
    for r in results:
        tp_all = sum(n * 4 for k, n in enumerate(local) if TP_DIM[k] is not None)
        for layout, own in owners.items():  # TP traffic: every sharded matrix vs only the owned ones
            tp_owned = sum(n * 4 for k, n in enumerate(local) if TP_DIM[k] is not None and own[k] == r["dp_rank"])
            assert r[f"{layout}-redundant-stats"][1] == tp_all, (layout, r["rank"])
            assert r[f"{layout}-dist-stats"][1] == tp_owned + (agree if layout == "z12" else 0), (layout, r["rank"])


# --- under DeepSpeed: the real ZeRO layouts take the distributed path ------------------------------------------

def _deepspeed_body(zeros: tuple[int, ...]) -> dict:
    from pretrain.distributed import init_distributed
    from pretrain.engine import build_engine
    from tests.trainer import test_engine as te

    env = init_distributed(tp=1, seed=0)
    out = {"rank": env.rank, "tp_rank": env.tp_rank, "dp_rank": env.dp_rank}
    for zero in zeros:
        case = dict(name=f"z{zero}", opt="muon", zero=zero, tp=1)
        cfg = te._cfg(case, 3)
        assert cfg.train.muon_distributed  # the default
        engine = build_engine(te.TPNet(te.full_weights(), 1, 0), cfg, env, te.ROLES)
        run = te._train(engine, env, cfg, case, te.batches(3))
        run["weights"] = te._local_weights(engine, zero)
        s = engine.base_optimizer.muon_stats  # summed over the 3 steps
        run["stats"] = (s.dp_bytes, s.ns_flops, s.matrices)
        out[f"z{zero}"] = run
    return out


def test_deepspeed_zero_stages_use_distributed_muon_and_match_reference():
    """DP=2 under DeepSpeed ZeRO 0-3 (test_engine's model: TP-layer matrices, 3 Muon matrices): every rank
    orthogonalises only its share (FLOPs over the ranks add up to each matrix once per step) and the run
    equals Keller Jordan's Muon on the whole batch (test_engine's reference and tolerances)."""
    from tests.dist import run_distributed
    from tests.trainer import test_engine as te

    zeros = (0, 1, 2, 3)
    results = run_distributed(_deepspeed_body, 2, args=(zeros,), env={"HF_HUB_OFFLINE": "1"})
    want = te.reference("muon", 3)
    every = 3 * sum(ns_flops(*te.full_weights()[n].shape) for n in te.MATRICES)
    for zero in zeros:
        te._check_against(results, f"z{zero}", want)
        stats = [r[f"z{zero}"]["stats"] for r in results]
        assert sum(s[1] for s in stats) == every and all(0 < s[1] < every for s in stats), (zero, stats)
        assert sum(s[2] for s in stats) == 3 * len(te.MATRICES), (zero, stats)

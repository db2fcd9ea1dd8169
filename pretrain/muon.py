"""Muon for tensor-parallel block matrices, under DeepSpeed ZeRO 0/1/2/3.

Muon (Keller Jordan, 2024) keeps SGD momentum per matrix and replaces each update by its nearest
semi-orthogonal matrix, computed with a quintic Newton-Schulz iteration. The iteration is not
elementwise, so two things must be true for it to be the same optimizer at every layout:

* **Tensor parallelism.** A megatron shard (`tensor_model_parallel=True`, split along `partition_dim`)
  is only a block of the matrix, and orthogonalising blocks separately is a different update (this is
  why DeepSpeed's own `"type": "Muon"` gives TP=2 != TP=1). We all-gather the shards of the momentum
  update across the TP group, run Newton-Schulz on the whole matrix, and keep our block. Every TP rank
  computes the same full result (redundant compute, no extra state); the aspect-ratio scale uses the
  full shape.
* **ZeRO 1/2.** DeepSpeed hands the wrapped optimizer one flat fp32 partition per param group, and a
  matrix may straddle partitions. Momentum is elementwise, so it lives sharded in that partition like
  Adam's moments. For the orthogonalisation each DP rank scatters its fragments of the momentum update
  into a zero buffer per matrix, an all-reduce (sum) over the DP group assembles the matrix, and the
  rank writes back only its fragment of the result. Fragment positions come from DeepSpeed's public
  lp->hp linkage (`param._hp_mapping`), the same one `safe_get_full_grad` uses, so this works for
  DeepSpeedZeroOptimizer and BF16_Optimizer alike.

* **ZeRO 3.** DeepSpeed hands the optimizer one flat fp32 partition per sub-group, the concatenation of
  each matrix's own partition: rank r holds elements [r*n, (r+1)*n) of the flattened (zero-padded) matrix.
  The positions come from ZeRO-3's own bookkeeping (`grad_position`, read once by
  `HybridOptimizer.bind_zero3`). Momentum is again sharded elementwise; for the orthogonalisation each rank
  all-gathers its chunk of the momentum update over the DP group, which yields the matrix, and keeps its
  chunk of the result.

ZeRO 0 (and DeepSpeed's bf16 ZeRO-0 wrapper, whose fp32 master copies keep their shapes) passes whole
tensors: gradients are already averaged.

The redundant path (`train.muon_distributed: false`, today's Muon kept for comparison): per step and Muon
matrix, under ZeRO 1/2 one DP all-reduce of the zero-filled matrix, under ZeRO 3 one DP all-gather, under
TP one TP all-gather; matrices go one at a time (extra memory: one full matrix) and every rank runs
Newton-Schulz on every matrix (fp32 on CPU, bf16 on CUDA as in Keller's recipe).

**Distributed Muon** (`train.muon_distributed`, the default). Newton-Schulz is ~(4mn^2 + 2n^3) FLOPs per
iteration for an m x n matrix (n <= m) against O(mn) for everything else, so running it on every DP rank for
every matrix (the redundant path above) wastes (W-1)/W of that compute. As in the public distributed Muon
implementations (Keller Jordan's `DistMuon` round-robin + all_gather, Moonlight's and Dion's), each matrix
gets one *owner* DP rank (`assign_owners`: longest-first greedy on Newton-Schulz FLOPs over the stable
parameter order, so every rank computes the same plan without talking), the owner alone orthogonalises it,
and the result travels to the ranks that need it:

* ZeRO 0: every rank needs every whole result, so one all-gather over the DP group of each rank's owned
  results (padded to the largest rank's share). This is traffic the redundant path does not have:
  ~(W-1)/W x 4 bytes x Muon parameters sent per rank per step, traded for (W-1)/W of the NS FLOPs. The
  gather buffer holds every result at once (one fp32 copy of the Muon matrices; the redundant path needs
  one matrix).
* ZeRO 1/2: DeepSpeed cuts the group's flat buffer into W equal partitions, so a rank already holds
  whole matrices, and only the (at most W-1) matrices straddling a partition boundary are split. The owner
  is the rank holding most of the matrix (`assign_owners_by_locality`): a matrix on one rank needs no
  traffic at all, a straddler's fragments go to its owner and the result's fragments come back (two
  all-to-alls, only over the straddlers). The redundant path all-reduces every zero-filled matrix
  (~2(W-1)/W x all Muon parameters per rank). Equal partitions are near-equal FLOPs when the matrices
  share their short side (a transformer's d_model). Fragment positions differ between ranks, so the first
  step all-gathers the (start, length) pairs, 16 bytes per matrix per rank, and keeps the plan (`_flat_plan`).
* A skip decided on the device (`keep`, from `HybridOptimizer.skip_flag`): every step function runs in full and
  then keeps the old momentum and weights bit for bit (`momentum_update`, `apply_update_`), with no host read.
* ZeRO 3: every rank holds 1/W of every matrix, so owners are balanced by FLOPs (`assign_owners`); each
  rank sends owner(k) its chunk of matrix k and the owner sends each rank its chunk of the result: two
  all-to-alls, ~2(W-1)/W x (the rank's partition) per rank, against the redundant path's all-gather of
  every matrix, ~(W-1)/W x all Muon parameters: W/2 times fewer bytes (the same at W=2), 1/W of the
  compute. (A reduce-scatter would make every rank hold a zero-filled copy of every matrix; the
  all-to-all moves only elements that exist, once each way.)
* TP: unchanged, the TP all-gather still precedes Newton-Schulz; owners are DP ranks, so the owner's
  whole TP group gathers and orthogonalises its matrices and each TP rank distributes its own block.
* Batched Newton-Schulz: an owner stacks its matrices of equal (full) shape and iterates them together
  (`newton_schulz_batched`, torch batched matmul, per-matrix norm): the same arithmetic, so the same
  result to fp32 rounding. On CPU (torch 2.13) it is bit-equal for matrices of 16+ rows and columns;
  tiny ones go through a different small-matrix kernel in 3-D matmul and differ by a few ulps (<= 1e-6
  in the NS output). tests/trainer/test_muon_dist.py checks both.

Both paths keep the same optimizer state (one `momentum_buffer` per tensor the optimizer is handed), so
checkpoints move between them. `MuonStats` counts what one step sent (DP and TP bytes, in the ring model of
the collectives: all-reduce 2(W-1)/W n, all-gather (W-1)/W n, all-to-all the bytes addressed to other ranks)
and the NS FLOPs this rank ran; `benchmarks/bench_step.py` reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Keller Jordan's quintic: maximal slope at zero; singular values end near 1 (roughly 0.7-1.2), not exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T (the 'zeroth power'), in plain torch; returns g's dtype."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


def newton_schulz_batched(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`newton_schulz` of each matrix of a (batch, rows, cols) stack at once: batched matmuls, one norm per
    matrix. One kernel launch per product instead of one per matrix and product (what an owner with many
    equal-shaped matrices wants on a GPU); the same arithmetic per matrix."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


def ns_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Matmul FLOPs of `steps` Newton-Schulz iterations on a rows x cols matrix (on its short side n:
    x x^T 2n^2m, s s 2n^3, (..) x 2n^2m per iteration)."""
    n, m = min(rows, cols), max(rows, cols)
    return steps * (4 * n * n * m + 2 * n ** 3)


def aspect_scale(rows: int, cols: int) -> float:
    """sqrt(max(1, rows/cols)): Keller's scaling so tall matrices get a comparable per-element step."""
    return max(1.0, rows / cols) ** 0.5


@dataclass(frozen=True)
class MatrixInfo:
    """What Muon must know about one matrix beyond its local tensor (which DeepSpeed may replace)."""

    local_shape: torch.Size
    partition_dim: int | None  # dim the TP shards are split along; None = replicated on every TP rank

    @staticmethod
    def of(p: torch.Tensor, tp_size: int) -> MatrixInfo:
        if p.dim() != 2:
            raise ValueError(f"Muon needs 2-D matrices, got shape {tuple(p.shape)}")
        sharded = tp_size > 1 and bool(getattr(p, "tensor_model_parallel", False))
        return MatrixInfo(p.shape, int(getattr(p, "partition_dim", 0)) if sharded else None)

    def full_shape(self, tp_size: int) -> tuple[int, int]:
        """The whole matrix's shape (the TP shards concatenated along `partition_dim`)."""
        rows, cols = self.local_shape
        if self.partition_dim is None or tp_size == 1:
            return rows, cols
        return (rows * tp_size, cols) if self.partition_dim == 0 else (rows, cols * tp_size)


class TPContext:
    """The tensor-parallel group Muon gathers over (None or size 1 = no gather)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0


@dataclass
class MuonStats:
    """What this rank did for Muon since the last `reset`: bytes it sent over the DP and the TP group
    (ring model: all-reduce 2(W-1)/W n, all-gather (W-1)/W n, all-to-all what goes to other ranks),
    Newton-Schulz FLOPs it ran and matrices it orthogonalised. Counted from the shapes as the steps run."""

    dp_bytes: int = 0
    tp_bytes: int = 0
    ns_flops: int = 0
    matrices: int = 0

    def reset(self) -> None:
        self.dp_bytes = self.tp_bytes = self.ns_flops = self.matrices = 0


def _count(stats: MuonStats | None, **add: int) -> None:
    if stats is not None:
        for k, v in add.items():
            setattr(stats, k, getattr(stats, k) + int(v))


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def assign_owners(shapes: list[tuple[int, int]], world: int, steps: int = 5) -> list[int]:
    """The DP rank that orthogonalises each matrix: longest processing time first (by `ns_flops`, ties by
    position), each to the least loaded rank so far (ties: lowest rank). Pure function of the shapes, so
    every rank derives the same plan; equal shapes spread evenly, and an owner's equal shapes batch."""
    load = [0] * world
    owners = [0] * len(shapes)
    for k in sorted(range(len(shapes)), key=lambda k: (-ns_flops(*shapes[k], steps), k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[k] = r
        load[r] += ns_flops(*shapes[k], steps)
    return owners


def assign_owners_by_locality(shapes: list[tuple[int, int]], held: list[list[int]], steps: int = 5) -> list[int]:
    """ZeRO 1/2: the owner of each matrix is the rank that already holds most of its elements (`held[k][r]`);
    ties go to the rank with the fewest Newton-Schulz FLOPs so far, then the lowest rank. ZeRO 1/2 cuts one
    flat buffer into equal partitions, so all but the W-1 matrices that straddle a boundary lie on one rank
    and need no traffic at all, and equal partitions are near-equal FLOPs when matrices share a short side."""
    load = [0] * (len(held[0]) if held else 0)
    owners = []
    for shape, h in zip(shapes, held, strict=True):
        most = max(h)
        r = min((r for r in range(len(h)) if h[r] == most), key=lambda r: (load[r], r))
        owners.append(r)
        load[r] += ns_flops(*shape, steps)
    return owners


def orthogonalize(update: torch.Tensor, info: MatrixInfo, tp: TPContext, steps: int,
                  ns_dtype: torch.dtype, stats: MuonStats | None = None) -> torch.Tensor:
    """The scaled Newton-Schulz image of the *whole* matrix, restricted to this rank's shard."""
    _count(stats, ns_flops=ns_flops(*info.full_shape(tp.size), steps), matrices=1)
    if info.partition_dim is None or tp.size == 1:
        return newton_schulz(update, steps, ns_dtype) * aspect_scale(*update.shape)
    full = _tp_gather(update, info, tp, stats)
    out = newton_schulz(full, steps, ns_dtype) * aspect_scale(*full.shape)
    return out.chunk(tp.size, dim=info.partition_dim)[tp.rank]


def _tp_gather(update: torch.Tensor, info: MatrixInfo, tp: TPContext, stats: MuonStats | None) -> torch.Tensor:
    shards = [torch.empty_like(update) for _ in range(tp.size)]
    dist.all_gather(shards, update.contiguous(), group=tp.group)
    _count(stats, tp_bytes=(tp.size - 1) * update.numel() * update.element_size())
    return torch.cat(shards, dim=info.partition_dim)


def orthogonalize_batched(updates: list[torch.Tensor], infos: list[MatrixInfo], tp: TPContext, steps: int,
                          ns_dtype: torch.dtype, stats: MuonStats | None = None) -> list[torch.Tensor]:
    """`orthogonalize` of several matrices: TP shards gathered one matrix at a time (in list order, the same
    on every TP rank), then one `newton_schulz_batched` per distinct full shape; this rank's blocks back."""
    fulls = []
    for u, info in zip(updates, infos, strict=True):
        sharded = info.partition_dim is not None and tp.size > 1
        fulls.append(_tp_gather(u, info, tp, stats) if sharded else u)
        _count(stats, ns_flops=ns_flops(*fulls[-1].shape, steps), matrices=1)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, f in enumerate(fulls):
        by_shape.setdefault(tuple(f.shape), []).append(k)
    outs: list[torch.Tensor | None] = [None] * len(fulls)
    for shape, ks in by_shape.items():
        ortho = newton_schulz_batched(torch.stack([fulls[k] for k in ks]), steps, ns_dtype) * aspect_scale(*shape)
        for k, o in zip(ks, ortho, strict=True):
            info = infos[k]
            sharded = info.partition_dim is not None and tp.size > 1
            outs[k] = o.chunk(tp.size, dim=info.partition_dim)[tp.rank] if sharded else o
    return outs


def nesterov_(momentum: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    """EMA momentum in place, then the Nesterov blend (Keller's form); elementwise, so shards commute."""
    momentum.lerp_(grad, 1 - beta)
    return grad.lerp(momentum, beta)


def momentum_update(p: torch.Tensor, state: dict, beta: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The Nesterov momentum update of `p` (a matrix, or a flat ZeRO partition), from its gradient (none =
    zero) and its `momentum_buffer` in the optimizer's `state` (created on first use).

    `keep` (a 0-dim bool on the device, False = the step is skipped): where False the gradient is replaced by
    the buffer itself, so the EMA `lerp` leaves the buffer exactly as it was (a + w(a - a) = a) and a
    non-finite gradient never reaches it; no host read."""
    grad = p.grad if p.grad is not None else torch.zeros_like(p)
    st = state[p]
    if "momentum_buffer" not in st:
        st["momentum_buffer"] = torch.zeros_like(p)
    buf = st["momentum_buffer"]
    grad = grad.to(p.dtype)
    if keep is not None:
        grad = torch.where(keep, grad, buf)
    return nesterov_(buf, grad, beta)


def apply_update_(p: torch.Tensor, update: torch.Tensor, lr: float, wd: float,
                  keep: torch.Tensor | None = None) -> None:
    """p <- p (1 - lr wd) - lr update (decoupled weight decay). With `keep` (0-dim device bool) False, p is
    left bit for bit as it was: the decay factor is exactly 1 and the update exactly 0, chosen on the device.
    With `keep` True the result is bit-identical to the unmasked form (the same kernels, the same scalars
    rounded the same way)."""
    if keep is None:
        p.mul_(1 - lr * wd).add_(update, alpha=-lr)
        return
    # Python scalars travel as kernel arguments: no host-to-device copy (which would wait on CUDA)
    p.mul_(torch.where(keep, 1 - lr * wd, 1.0)).add_(torch.where(keep, update, 0.0), alpha=-lr)


@torch.no_grad()
def muon_step_shaped(params: list[torch.Tensor], infos: list[MatrixInfo], state: dict, lr: float, wd: float,
                     beta: float, tp: TPContext, steps: int, ns_dtype: torch.dtype,
                     dp_group: dist.ProcessGroup | None = None, distributed: bool = False,
                     stats: MuonStats | None = None, keep: torch.Tensor | None = None) -> None:
    """ZeRO 0: params are the matrices themselves (or same-shaped fp32 masters), grads already DP-averaged.

    `distributed`: each DP rank orthogonalises only the matrices `assign_owners` gives it, and one DP
    all-gather hands every rank every result; otherwise every rank orthogonalises everything. `keep`: the
    on-device skip (`momentum_update`, `apply_update_`); every step function takes it."""
    updates = [momentum_update(p, state, beta, keep) for p in params]
    world, rank = _group_size_rank(dp_group)
    if not distributed or world == 1 or len({u.dtype for u in updates}) > 1:
        for p, u, info in zip(params, updates, infos, strict=True):
            o = orthogonalize(u, info, tp, steps, ns_dtype, stats)
            apply_update_(p, o.to(p.dtype), lr, wd, keep)
        return
    owners = assign_owners([i.full_shape(tp.size) for i in infos], world, steps)
    mine = [k for k, o in enumerate(owners) if o == rank]
    outs = orthogonalize_batched([updates[k] for k in mine], [infos[k] for k in mine], tp, steps, ns_dtype, stats)
    loads = [sum(updates[k].numel() for k, o in enumerate(owners) if o == r) for r in range(world)]
    width = max(loads)
    send = torch.zeros(width, dtype=updates[0].dtype, device=updates[0].device)
    if mine:
        send[:loads[rank]] = torch.cat([o.reshape(-1) for o in outs])
    gathered = torch.empty(width * world, dtype=send.dtype, device=send.device)
    dist.all_gather_into_tensor(gathered, send, group=dp_group)
    _count(stats, dp_bytes=(world - 1) * width * send.element_size())
    at = [r * width for r in range(world)]
    for p, o in zip(params, owners, strict=True):
        n = p.numel()
        result = gathered[at[o]:at[o] + n].view(p.shape)
        at[o] += n
        apply_update_(p, result.to(p.dtype), lr, wd, keep)


def _owner_exchange(u: torch.Tensor, delta: torch.Tensor, infos: list[MatrixInfo], local_at: list[int],
                    pieces: list[list[tuple[int, int]]], owners: list[int], dp_group: dist.ProcessGroup | None,
                    tp: TPContext, steps: int, ns_dtype: torch.dtype, stats: MuonStats | None) -> None:
    """The sharded (ZeRO 1/2/3) distributed step: fill `delta` (this rank's flat partition) with its part of
    the orthogonalised update `u`.

    `pieces[k][r] = (start, n)`: rank r holds elements [start, start + n) of matrix k's flattened (TP-local)
    update; this rank's sits at `u[local_at[k]:local_at[k] + n]`. Pieces of one matrix are disjoint and
    cover it. Every rank sends owner(k) its piece of matrix k (all-to-all), the owner assembles and
    orthogonalises its matrices (batched), and sends every rank its piece of the result (all-to-all back).
    """
    world, rank = _group_size_rank(dp_group)
    by_owner = [[k for k, o in enumerate(owners) if o == r] for r in range(world)]
    send_splits = [sum(pieces[k][rank][1] for k in by_owner[o]) for o in range(world)]
    recv_splits = [sum(pieces[k][r][1] for k in by_owner[rank]) for r in range(world)]
    out_parts = [u[local_at[k]:local_at[k] + pieces[k][rank][1]] for o in range(world) for k in by_owner[o]]
    send = torch.cat(out_parts) if out_parts else u.new_empty(0)
    recv = u.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=dp_group)
    # assemble the owned matrices; absent pieces stay zero (as the redundant path's zero-filled all-reduce)
    wholes = {k: u.new_zeros(infos[k].local_shape.numel()) for k in by_owner[rank]}
    pos = 0
    for r in range(world):
        for k in by_owner[rank]:
            start, n = pieces[k][r]
            wholes[k][start:start + n] = recv[pos:pos + n]
            pos += n
    mine = by_owner[rank]
    outs = orthogonalize_batched([wholes[k].view(infos[k].local_shape) for k in mine], [infos[k] for k in mine],
                                 tp, steps, ns_dtype, stats)
    result = {k: o.reshape(-1) for k, o in zip(mine, outs, strict=True)}
    back = [result[k][pieces[k][r][0]:pieces[k][r][0] + pieces[k][r][1]] for r in range(world) for k in mine]
    back_send = torch.cat(back) if back else u.new_empty(0)
    back_recv = u.new_empty(sum(send_splits))
    dist.all_to_all_single(back_recv, back_send, send_splits, recv_splits, group=dp_group)
    size = u.element_size()
    _count(stats, dp_bytes=size * (sum(send_splits) - send_splits[rank] + sum(recv_splits) - recv_splits[rank]))
    pos = 0
    for o in range(world):
        for k in by_owner[o]:
            n = pieces[k][rank][1]
            delta[local_at[k]:local_at[k] + n] = back_recv[pos:pos + n]
            pos += n


def _flat_plan(flat: torch.Tensor, lp_params: list[torch.Tensor], infos: list[MatrixInfo],
               group: dist.ProcessGroup | None, world: int, tp: TPContext, steps: int,
               stats: MuonStats | None) -> tuple[list, list[int], list[int]]:
    """ZeRO 1/2 distributed Muon: where every rank's fragment of each matrix is (`pieces`), who owns each
    matrix and where this rank's fragments sit in its partition. DeepSpeed's partitions never move during an
    engine's life, so `muon_step_flat` computes this once per partition (`plans`) and reuses it: the table
    all-gather and its host read (`tolist`) happen at the first step only."""
    # where each rank's fragment of each matrix is: (start in the matrix, length), 0 length = none
    mine = torch.zeros(len(lp_params), 2, dtype=torch.int64, device=flat.device)
    local_at = [0] * len(lp_params)
    for k, lp in enumerate(lp_params):
        frag = getattr(lp, "_hp_mapping", None)
        if frag is not None:
            mine[k, 0], mine[k, 1] = frag.lp_fragment_address.start, frag.hp_fragment_address.numel
            local_at[k] = frag.hp_fragment_address.start
    table = torch.empty(world * len(lp_params), 2, dtype=torch.int64, device=flat.device)
    dist.all_gather_into_tensor(table, mine, group=group)
    _count(stats, dp_bytes=(world - 1) * mine.numel() * mine.element_size())
    table = table.view(world, len(lp_params), 2).tolist()
    pieces = [[(table[r][k][0], table[r][k][1]) for r in range(world)] for k in range(len(lp_params))]
    owners = assign_owners_by_locality([i.full_shape(tp.size) for i in infos],
                                       [[n for _, n in row] for row in pieces], steps)
    if tp.size > 1:  # a TP group gathers its owned matrices together: its ranks must agree on them
        t = torch.tensor(owners + [-o for o in owners], dtype=torch.int64, device=flat.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp.group)
        _count(stats, tp_bytes=2 * (tp.size - 1) * t.numel() * t.element_size() // tp.size)
        if t[:len(owners)].tolist() != [-o for o in t[len(owners):].tolist()]:
            raise RuntimeError("distributed Muon: TP ranks see different ZeRO 1/2 partitions of the Muon "
                               "group; set train.muon_distributed=false")
    return pieces, owners, local_at


@torch.no_grad()
def muon_step_flat(flat: torch.Tensor, lp_params: list[torch.Tensor], infos: list[MatrixInfo], state: dict,
                   lr: float, wd: float, beta: float, dp_group: dist.ProcessGroup | None, tp: TPContext,
                   steps: int, ns_dtype: torch.dtype, distributed: bool = False,
                   stats: MuonStats | None = None, keep: torch.Tensor | None = None,
                   plans: dict | None = None) -> None:
    """ZeRO 1/2: `flat` is this rank's fp32 partition of the group; `lp_params` are the model's matrices.
    `plans`: a dict the caller keeps for the optimizer's life, caching `_flat_plan` per partition."""
    u = momentum_update(flat, state, beta, keep)
    delta = torch.zeros_like(flat)
    groups = [getattr(lp, "_dp_group", None) or dp_group for lp in lp_params]
    world, rank = _group_size_rank(groups[0] if groups else dp_group)
    if distributed and world > 1 and all(g is groups[0] for g in groups):
        plans = {} if plans is None else plans
        key = (id(flat), flat.numel(), tuple(id(lp) for lp in lp_params))
        if key not in plans:
            plans[key] = _flat_plan(flat, lp_params, infos, groups[0], world, tp, steps, stats)
        pieces, owners, local_at = plans[key]
        _owner_exchange(u, delta, infos, local_at, pieces, owners, groups[0], tp, steps, ns_dtype, stats)
        apply_update_(flat, delta, lr, wd, keep)
        return
    for lp, info in zip(lp_params, infos, strict=True):
        frag = getattr(lp, "_hp_mapping", None)
        whole = torch.zeros(info.local_shape.numel(), dtype=flat.dtype, device=flat.device)
        if frag is not None:
            lo, hi = frag.hp_fragment_address.start, frag.hp_fragment_address.start + frag.hp_fragment_address.numel
            at = frag.lp_fragment_address.start
            whole[at:at + hi - lo] = u[lo:hi]
        group = getattr(lp, "_dp_group", None) or dp_group
        size, _ = _group_size_rank(group)
        if size > 1:
            dist.all_reduce(whole, group=group)  # disjoint fragments: the sum is the assembled matrix
            _count(stats, dp_bytes=2 * (size - 1) * whole.numel() * whole.element_size() // size)
        o = orthogonalize(whole.view(info.local_shape), info, tp, steps, ns_dtype, stats)
        if frag is not None:
            delta[lo:hi] = o.reshape(-1)[at:at + hi - lo]
    apply_update_(flat, delta, lr, wd, keep)


@dataclass(frozen=True)
class Zero3Matrix:
    """Where one matrix's ZeRO-3 partition sits in its sub-group's flat fp32 partition."""

    info: MatrixInfo
    offset: int  # start of this rank's chunk in the flat partition
    chunk: int  # elements per rank (the last rank's chunk is zero-padded)
    numel: int  # elements of the (TP-local) matrix


@torch.no_grad()
def muon_step_zero3(flat: torch.Tensor, matrices: list[Zero3Matrix], state: dict, lr: float, wd: float,
                    beta: float, dp_group: dist.ProcessGroup | None, tp: TPContext, steps: int,
                    ns_dtype: torch.dtype, distributed: bool = False, stats: MuonStats | None = None,
                    keep: torch.Tensor | None = None) -> None:
    """ZeRO 3: `flat` is this rank's fp32 partition of one sub-group; `matrices` say where each matrix is."""
    u = momentum_update(flat, state, beta, keep)
    world, rank = _group_size_rank(dp_group)
    delta = torch.zeros_like(flat)
    if distributed and world > 1:
        # rank r holds elements [r * chunk, (r + 1) * chunk) of each matrix, clipped at numel (the rest is padding)
        pieces = [[(r * m.chunk, max(0, min(m.chunk, m.numel - r * m.chunk))) for r in range(world)]
                  for m in matrices]
        infos = [m.info for m in matrices]
        owners = assign_owners([i.full_shape(tp.size) for i in infos], world, steps)
        _owner_exchange(u, delta, infos, [m.offset for m in matrices], pieces, owners, dp_group, tp, steps, ns_dtype,
                        stats)
        apply_update_(flat, delta, lr, wd, keep)
        return
    for m in matrices:
        mine = u[m.offset:m.offset + m.chunk]
        if world > 1:
            gathered = torch.empty(m.chunk * world, dtype=flat.dtype, device=flat.device)
            dist.all_gather_into_tensor(gathered, mine.contiguous(), group=dp_group)
            _count(stats, dp_bytes=(world - 1) * mine.numel() * mine.element_size())
        else:
            gathered = mine
        o = orthogonalize(gathered[:m.numel].view(m.info.local_shape), m.info, tp, steps, ns_dtype,
                          stats).reshape(-1)
        lo, hi = rank * m.chunk, min((rank + 1) * m.chunk, m.numel)  # padding past numel stays zero
        if hi > lo:
            delta[m.offset:m.offset + hi - lo] = o[lo:hi]
    apply_update_(flat, delta, lr, wd, keep)

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
tensors: no DP traffic is needed, gradients are already averaged.

Cost per step, per Muon matrix: under ZeRO 1/2 one DP all-reduce of the local shard, under ZeRO 3 one DP
all-gather, under TP one TP all-gather; matrices go one at a time, so the extra memory is one full matrix.
Newton-Schulz runs redundantly on every rank (fp32 on CPU, bf16 on CUDA as in Keller's recipe); spreading
matrices over ranks would cut that compute at the price of one more gather.
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


class TPContext:
    """The tensor-parallel group Muon gathers over (None or size 1 = no gather)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0


def orthogonalize(update: torch.Tensor, info: MatrixInfo, tp: TPContext, steps: int,
                  ns_dtype: torch.dtype) -> torch.Tensor:
    """The scaled Newton-Schulz image of the *whole* matrix, restricted to this rank's shard."""
    if info.partition_dim is None or tp.size == 1:
        return newton_schulz(update, steps, ns_dtype) * aspect_scale(*update.shape)
    shards = [torch.empty_like(update) for _ in range(tp.size)]
    dist.all_gather(shards, update.contiguous(), group=tp.group)
    full = torch.cat(shards, dim=info.partition_dim)
    out = newton_schulz(full, steps, ns_dtype) * aspect_scale(*full.shape)
    return out.chunk(tp.size, dim=info.partition_dim)[tp.rank]


def nesterov_(momentum: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    """EMA momentum in place, then the Nesterov blend (Keller's form); elementwise, so shards commute."""
    momentum.lerp_(grad, 1 - beta)
    return grad.lerp(momentum, beta)


def momentum_update(p: torch.Tensor, state: dict, beta: float) -> torch.Tensor:
    """The Nesterov momentum update of `p` (a matrix, or a flat ZeRO partition), from its gradient (none =
    zero) and its `momentum_buffer` in the optimizer's `state` (created on first use)."""
    grad = p.grad if p.grad is not None else torch.zeros_like(p)
    st = state[p]
    if "momentum_buffer" not in st:
        st["momentum_buffer"] = torch.zeros_like(p)
    return nesterov_(st["momentum_buffer"], grad.to(p.dtype), beta)


@torch.no_grad()
def muon_step_shaped(params: list[torch.Tensor], infos: list[MatrixInfo], state: dict, lr: float, wd: float,
                     beta: float, tp: TPContext, steps: int, ns_dtype: torch.dtype) -> None:
    """ZeRO 0: params are the matrices themselves (or same-shaped fp32 masters), grads already DP-averaged."""
    for p, info in zip(params, infos, strict=True):
        o = orthogonalize(momentum_update(p, state, beta), info, tp, steps, ns_dtype)
        p.mul_(1 - lr * wd).add_(o.to(p.dtype), alpha=-lr)


@torch.no_grad()
def muon_step_flat(flat: torch.Tensor, lp_params: list[torch.Tensor], infos: list[MatrixInfo], state: dict,
                   lr: float, wd: float, beta: float, dp_group: dist.ProcessGroup | None, tp: TPContext,
                   steps: int, ns_dtype: torch.dtype) -> None:
    """ZeRO 1/2: `flat` is this rank's fp32 partition of the group; `lp_params` are the model's matrices."""
    u = momentum_update(flat, state, beta)
    delta = torch.zeros_like(flat)
    for lp, info in zip(lp_params, infos, strict=True):
        frag = getattr(lp, "_hp_mapping", None)
        whole = torch.zeros(info.local_shape.numel(), dtype=flat.dtype, device=flat.device)
        if frag is not None:
            lo, hi = frag.hp_fragment_address.start, frag.hp_fragment_address.start + frag.hp_fragment_address.numel
            at = frag.lp_fragment_address.start
            whole[at:at + hi - lo] = u[lo:hi]
        group = getattr(lp, "_dp_group", None) or dp_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(whole, group=group)  # disjoint fragments: the sum is the assembled matrix
        o = orthogonalize(whole.view(info.local_shape), info, tp, steps, ns_dtype)
        if frag is not None:
            delta[lo:hi] = o.reshape(-1)[at:at + hi - lo]
    flat.mul_(1 - lr * wd).add_(delta, alpha=-lr)


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
                    ns_dtype: torch.dtype) -> None:
    """ZeRO 3: `flat` is this rank's fp32 partition of one sub-group; `matrices` say where each matrix is."""
    u = momentum_update(flat, state, beta)
    world = dist.get_world_size(dp_group) if dp_group is not None else 1
    rank = dist.get_rank(dp_group) if dp_group is not None else 0
    delta = torch.zeros_like(flat)
    for m in matrices:
        mine = u[m.offset:m.offset + m.chunk]
        if world > 1:
            gathered = torch.empty(m.chunk * world, dtype=flat.dtype, device=flat.device)
            dist.all_gather_into_tensor(gathered, mine.contiguous(), group=dp_group)
        else:
            gathered = mine
        o = orthogonalize(gathered[:m.numel].view(m.info.local_shape), m.info, tp, steps, ns_dtype).reshape(-1)
        lo, hi = rank * m.chunk, min((rank + 1) * m.chunk, m.numel)  # padding past numel stays zero
        if hi > lo:
            delta[m.offset:m.offset + hi - lo] = o[lo:hi]
    flat.mul_(1 - lr * wd).add_(delta, alpha=-lr)

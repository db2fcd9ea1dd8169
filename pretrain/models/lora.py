"""Relaxed sharing: per-loop LoRA adapters on the shared core block (Relaxed Recursive Transformers, Bae et al.
2024). At loop t (0-based) a core projection W computes

    y = W x + (alpha / r) B_t A_t x,      A_t [r, in], B_t [out, r],   t -> min(t, bank - 1)

with one (A_t, B_t) per loop index, core layer and adapted projection (`model.loop_lora_targets`). The bank holds
`config.lora_bank` adapters (the sampler's largest loop count); deeper loops reuse the last one. Init: A_t as
PEFT's default (kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))), B_t = 0, so at init every delta is
exactly zero and the model equals the shared one. The whole A bank is drawn from the default RNG and split, so the
unsharded weights do not depend on TP.

Tensor parallelism (see layers.py for the base layers):
- column-parallel W (output split; wq wk wv w_gate w_up): A replicated [bank, r, in], B split along the output
  [bank, out/tp, r] (partition dim 1). u = A_t x is computed on the replicated layer input (outside the TP region)
  and enters it through `copy_to_tensor_model_parallel_region` (identity forward, all-reduce of du backward, so A's
  gradient and the input's are whole on every rank); B_t u is this rank's output slice.
- row-parallel W (input split; wo w_down): A split along the input [bank, r, in/tp] (partition dim 2), B
  replicated [bank, out, r]. u = all-reduce(A_t x_local) through `reduce_from_tensor_model_parallel_region`
  (all-reduce forward, identity backward); B_t u is added to W's (already reduced, replicated) output.
The extra communication is one all-reduce of [batch, seq, r] per adapted projection per loop. Parameters carry
megatron's `tensor_model_parallel` / `partition_dim`, so checkpoints re-split them like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import nn

from pretrain.models.config import LoopConfig, ModelConfig, lora_bank, lora_targets, projection_dims
from pretrain.models.layers import replicated, sharded, to_tp, tp_group, tp_world

ROW_PARALLEL = ("wo", "w_down")  # the rest are column-parallel


class LoopLoRA(nn.Module):
    """The per-loop adapters of one projection: banks A [bank, r, in(/tp)] and B [bank, out(/tp), r].
    `forward(x, loop)` returns the delta to add to the projection's output on this rank: x is the layer's
    replicated input for a column-parallel projection, this rank's input slice for a row-parallel one."""

    def __init__(self, d_in: int, d_out: int, *, row_parallel: bool, rank: int, bank: int, scale: float,
                 dtype: torch.dtype):
        super().__init__()
        tp = tp_world()
        if (d_in if row_parallel else d_out) % tp:
            raise ValueError(f"LoRA: width {d_in if row_parallel else d_out} is not divisible by TP = {tp}")
        self.row_parallel, self.bank, self.scale = row_parallel, bank, scale
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(bank, rank, d_in, dtype=dtype).uniform_(-bound, bound)  # whole bank, from the default RNG
        if row_parallel:
            a = a.chunk(tp, dim=2)[ps.get_tensor_model_parallel_rank()].clone()
            self.A = sharded(nn.Parameter(a), 2, "lora")
            self.B = replicated(nn.Parameter(torch.zeros(bank, d_out, rank, dtype=dtype)), "lora")
        else:
            self.A = replicated(nn.Parameter(a), "lora")
            self.B = sharded(nn.Parameter(torch.zeros(bank, d_out // tp, rank, dtype=dtype)), 1, "lora")

    def forward(self, x: torch.Tensor, loop: int) -> torch.Tensor:
        t = min(loop, self.bank - 1)
        u = F.linear(x, self.A[t]) * self.scale
        u = reduce_from_tensor_model_parallel_region(u, group=tp_group()) if self.row_parallel else to_tp(u)
        return F.linear(u, self.B[t])


class LayerLoRA(nn.ModuleDict):
    """One core layer's adapters, by projection name (the module names in layers.py)."""

    def at(self, loop: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Projection name -> delta function at loop `loop`, what `Layer.forward(lora=)` takes. Each calls the
        adapter module, so module hooks (ZeRO-3's parameter gathering) run."""
        return {name: partial(adapter, loop=loop) for name, adapter in self.items()}


def build_loop_lora(cfg: ModelConfig, loop_cfg: LoopConfig, dtype: torch.dtype) -> nn.ModuleList | None:
    """Adapters for every core layer (in layer order, then `lora_targets` order: the order of the RNG draws), or
    None when model.loop_lora_rank is 0."""
    targets, bank, dims = lora_targets(cfg), lora_bank(cfg, loop_cfg), projection_dims(cfg)
    if not targets:
        return None
    r = cfg.loop_lora_rank
    scale = (r if cfg.loop_lora_alpha is None else cfg.loop_lora_alpha) / r
    return nn.ModuleList(
        LayerLoRA({name: LoopLoRA(*dims[name], row_parallel=name in ROW_PARALLEL, rank=r, bank=bank, scale=scale,
                                  dtype=dtype) for name in targets})
        for _ in range(cfg.n_core))


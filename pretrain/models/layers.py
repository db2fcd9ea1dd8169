"""Transformer building blocks on megatron-core's tensor-parallel layers: norms (RMSNorm, LayerNorm), rotary
embeddings, learned position embeddings, causal attention through torch SDPA, MLPs (SwiGLU, ReLU^2, GELU), and the
layer that combines them (pre-norm or sandwich).

Every norm of the model (the layers', the loop's in recurrence.py, the final one) is built by `make_norm`, so
`model.norm_kind` (rms | layer) applies everywhere; the per-head QK-norm stays RMS. `model.position: learned`
(GPT-2) replaces rotary by a position embedding added to the token embedding (looped.py): attention then gets
`rope=None`. Biases: `qkv_bias` on wq/wk/wv, `proj_bias` on wo and the MLP projections (column-parallel biases are
split with the output, row-parallel ones replicated and added after the all-reduce, as megatron does).

Tensor parallelism (Megatron style): Q/K/V and MLP up/gate projections are column-parallel (each rank holds
a slice of the heads / hidden units), output projections are row-parallel (their all-reduce returns a full,
replicated hidden state). Every rank sees the whole residual stream, so norms, rotary and everything in
`recurrence.py` are plain replicated modules. Each sublayer input enters the TP region through one explicit
`copy_to_tensor_model_parallel_region` (identity forward, all-reduce of the input gradient backward), shared
by the projections that read it (one all-reduce for Q, K and V instead of three).

Parameters are created on the CPU with megatron's `use_cpu_initialization`: the full master matrix is drawn
from the default torch RNG and split, so the unsharded initial weights are identical for every TP size given
the same seed (on GPU too; the model is moved to the device afterwards). `model.init` picks the projections' init
methods (`projection_inits`: default normal, or nanochat's uniform inputs and zero outputs). Nothing here draws
random numbers in forward (no dropout), so activation checkpointing needs no RNG bookkeeping.

The projections are megatron's parallel linears with one addition (`ColumnLinear`, `RowLinear`): under CPU
autocast (train.dtype: bf16_autocast) they cast their operands first, since megatron's linear function re-enters
autocast in backward only on CUDA.

Per-loop LoRA (lora.py) enters through the `lora` argument of the forwards: a mapping from projection name to the
delta of that projection's output on this rank, given its input (the replicated input for the column-parallel
projections, this rank's slice for the row-parallel ones); the core layers receive one per loop.

Tensors are [batch, seq, d_model] (megatron's linears accept any 3-D layout); attention runs on
[batch, heads, seq, head_dim] through `F.scaled_dot_product_attention` (flash kernels on CUDA when no explicit
mask is needed), or through FlexAttention when the mask is a block mask (`model.attention: flex`, attention.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from pretrain.models.attention import flex_attend, is_block_mask
from pretrain.models.config import ModelConfig, mlp_hidden

# megatron-core 0.16 warns on every linear call that tp_group "will be mandatory" although our layers pass it
# (its inner autograd function does not forward it); thousands of identical lines per run help nobody.
warnings.filterwarnings("ignore", message="Warning: tp_group is None", category=DeprecationWarning)

NORM_EPS = 1e-6


def tp_world() -> int:
    return ps.get_tensor_model_parallel_world_size()


def tp_group():
    return ps.get_tensor_model_parallel_group()


def parallel_config(dtype: torch.dtype) -> ModelParallelConfig:
    """The settings under which megatron's parallel layers work on CPU (gloo) and GPU alike."""
    return ModelParallelConfig(tensor_model_parallel_size=tp_world(), use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=dtype,
                               gradient_accumulation_fusion=False, sequence_parallel=False)


def normal_init(std: float):
    return partial(nn.init.normal_, mean=0.0, std=std)


def uniform_init(bound: float):
    return partial(nn.init.uniform_, a=-bound, b=bound)


def projection_inits(cfg: ModelConfig, out_std: float) -> tuple[Callable, Callable]:
    """The init methods of a layer's input projections (wq, wk, wv, w_up, w_gate) and output projections (wo,
    w_down) under `model.init`. default: N(0, init_std) and N(0, out_std). nanochat (its `init_weights`): uniform in
    +-sqrt(3 / d_model) (std 1 / sqrt(d_model), for the MLP's input projections too) and zero. megatron applies them
    to the whole master matrix before splitting it (`use_cpu_initialization`), so every TP size gets the same
    matrices."""
    if cfg.init == "nanochat":
        return uniform_init(math.sqrt(3.0 / cfg.d_model)), nn.init.zeros_
    return normal_init(cfg.init_std), normal_init(out_std)


def declare_role(p: nn.Parameter | None, role: str) -> nn.Parameter | None:
    """Declare a parameter's optimizer role where it is created (`pretrain.optim.ROLES`: matrix, embedding, head,
    norm, injection, lora, bias); `param_roles` reads it, and a parameter without one is an error. None passes
    through (an absent weight: a weightless norm, a tied head)."""
    from pretrain.optim import ROLES

    if role not in ROLES:
        raise ValueError(f"unknown optimizer role {role!r}; the roles are {ROLES} (pretrain.optim.ROLES)")
    if p is not None:
        p.optim_role = role
    return p


def replicated(p: nn.Parameter, role: str) -> nn.Parameter:
    """Mark a parameter as identical on every TP rank (megatron's default attributes), with its optimizer role."""
    set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    return declare_role(p, role)


def sharded(p: nn.Parameter, dim: int, role: str) -> nn.Parameter:
    """Mark a parameter as split across TP ranks along `dim` (as megatron's own layers do), with its role."""
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
    return declare_role(p, role)


class _CPUAutocast:
    """megatron's linear autograd function enters autocast in backward for CUDA only (`custom_bwd(device_type=
    "cuda")`): under CPU autocast its forward saves an fp32 weight and its backward meets a bf16 output gradient
    (a dtype error). On CPU under autocast this casts the input, weight and bias to the autocast dtype before the
    function, as autocast itself would for the matmul: the function then runs wholly in that dtype, and the casts'
    backward returns fp32 gradients to the fp32 parameters. Elsewhere (CUDA, or no autocast) nothing changes."""

    def _forward_impl(self, input, weight, *args, **kwargs):  # noqa: A002 - megatron's signature
        if input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            input, weight = input.to(dtype), weight.to(dtype)
            if kwargs.get("bias") is not None:
                kwargs["bias"] = kwargs["bias"].to(dtype)
        return super()._forward_impl(input, weight, *args, **kwargs)


class ColumnLinear(_CPUAutocast, ColumnParallelLinear):
    """megatron's ColumnParallelLinear, usable under CPU autocast (`_CPUAutocast`)."""


class RowLinear(_CPUAutocast, RowParallelLinear):
    """megatron's RowParallelLinear, usable under CPU autocast (`_CPUAutocast`)."""


# per-loop LoRA (lora.py): projection name -> the delta of its output on this rank, given the projection's input
LoRA = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]


def adapt(lora: LoRA | None, name: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y plus the adapter delta of projection `name` on input x, when `lora` adapts that projection."""
    return y + lora[name](x) if lora is not None and name in lora else y


def to_tp(x: torch.Tensor) -> torch.Tensor:
    """Enter the tensor-parallel region: identity forward, all-reduce of the gradient backward."""
    return copy_to_tensor_model_parallel_region(x, group=tp_group())


# --- norms, rotary and position embeddings -------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm over the last dim, with or without a learnable scale (the FLT recipes use none)."""

    def __init__(self, dim: int, affine: bool = True, dtype: torch.dtype = torch.float32, eps: float = NORM_EPS):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = replicated(nn.Parameter(torch.ones(dim, dtype=dtype)), "norm") if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim (torch semantics: `F.layer_norm`), with a learnable weight and bias when affine
    (GPT-2), neither otherwise."""

    def __init__(self, dim: int, affine: bool = True, dtype: torch.dtype = torch.float32, eps: float = NORM_EPS):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = replicated(nn.Parameter(torch.ones(dim, dtype=dtype)), "norm") if affine else None
        self.bias = replicated(nn.Parameter(torch.zeros(dim, dtype=dtype)), "bias") if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


NORMS: dict[str, type[nn.Module]] = {"rms": RMSNorm, "layer": LayerNorm}


def make_norm(kind: str, dim: int, affine: bool = True, dtype: torch.dtype = torch.float32,
              eps: float = NORM_EPS) -> nn.Module:
    """The model's norm of kind `model.norm_kind` (rms | layer): every norm but the QK-norm is built here."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {', '.join(NORMS)}")
    return NORMS[kind](dim, affine, dtype, eps)


class PositionEmbedding(nn.Module):
    """Learned absolute position embeddings [max_positions, d] (model.position: learned), replicated on every TP
    rank; `forward(positions)` of any shape returns their rows. Drawn N(0, std) from the default RNG."""

    def __init__(self, max_positions: int, dim: int, std: float, dtype: torch.dtype):
        super().__init__()
        self.max_positions = max_positions
        self.weight = replicated(nn.Parameter(torch.empty(max_positions, dim, dtype=dtype)), "embedding")
        nn.init.normal_(self.weight, std=std)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


class HeadNorm(nn.Module):
    """QK-norm: RMSNorm over head_dim with one scale vector per head. Per-head scales shard with the heads,
    so their gradients need no TP all-reduce (a scale shared by all heads would)."""

    def __init__(self, n_local_heads: int, head_dim: int, affine: bool, dtype: torch.dtype, eps: float = NORM_EPS):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.weight = (sharded(nn.Parameter(torch.ones(n_local_heads, head_dim, dtype=dtype)), 0, "norm")
                       if affine else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, T, hd]
        x = F.rms_norm(x, (self.head_dim,), None, self.eps)
        return x if self.weight is None else x * self.weight[:, None, :]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [T, head_dim / 2] for the given absolute positions (computed in fp64: the table is
    small, and large positions times frequencies lose digits in fp32)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + hd/2}) by position-dependent angles; x is [B, H, T, hd]."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


# --- attention and MLP -----------------------------------------------------------------------------------

class Attention(nn.Module):
    """Causal multi-head (or grouped-query) attention. Queries may come from a different tensor than keys and
    values (the FLT family reads queries from the previous loop); with neither, it is ordinary self-attention."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, affine: bool, out_std: float):
        super().__init__()
        tp, d = tp_world(), cfg.d_model
        n_kv = cfg.n_kv_heads or cfg.n_heads
        if cfg.n_heads % tp or n_kv % tp:
            raise ValueError(f"n_heads = {cfg.n_heads} and n_kv_heads = {n_kv} must be divisible by TP = {tp}")
        self.head_dim = d // cfg.n_heads
        self.n_local, self.n_local_kv = cfg.n_heads // tp, n_kv // tp
        in_init, out_init = projection_inits(cfg, out_std)
        col = partial(ColumnLinear, config=mp, init_method=in_init,
                      disable_grad_reduce=True, tp_group=tp_group())  # gradient all-reduce: once, in to_tp()
        self.wq = col(d, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = col(d, n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.wv = col(d, n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.wo = RowLinear(cfg.n_heads * self.head_dim, d, config=mp, init_method=out_init,
                                    bias=cfg.proj_bias, input_is_parallel=True, skip_bias_add=False,
                                    tp_group=tp_group())
        for proj in (self.wq, self.wk, self.wv, self.wo):
            declare_role(proj.weight, "matrix")  # megatron creates them: the role is declared right after
            declare_role(proj.bias, "bias")  # None without qkv_bias / proj_bias
        eps = cfg.norm_eps
        self.q_norm = HeadNorm(self.n_local, self.head_dim, affine, mp.params_dtype, eps) if cfg.qk_norm else None
        self.k_norm = HeadNorm(self.n_local_kv, self.head_dim, affine, mp.params_dtype, eps) if cfg.qk_norm else None

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, rope, mask: torch.Tensor | None = None,
                kv_cache=None, lora: LoRA | None = None) -> torch.Tensor:
        """`rope`: the rotary tables, None with learned positions (no rotary). `mask`: None = causal with queries
        aligned to the last keys; a boolean [B or 1, 1, Tq, Tk] (True = may attend) through SDPA; or a FlexAttention
        block mask (model.attention = flex, packed documents: attention.py) through `flex_attend`. `kv_cache`: a
        `generate.LayerKV` that appends this call's keys/values. `lora`: per-loop adapter deltas by projection name
        (lora.py)."""
        B, T, _ = x_q.shape
        kv_in = to_tp(x_kv)
        q_in = kv_in if x_q is x_kv else to_tp(x_q)
        q = adapt(lora, "wq", self.wq(q_in)[0], x_q)  # column-parallel adapters read the replicated inputs
        k = adapt(lora, "wk", self.wk(kv_in)[0], x_kv)
        v = adapt(lora, "wv", self.wv(kv_in)[0], x_kv)
        q = q.view(B, T, self.n_local, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_local_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_local_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        gqa = self.n_local_kv != self.n_local
        if is_block_mask(mask):  # model.attention = flex with packed documents (attention.py)
            y = flex_attend(q, k, v, mask, enable_gqa=gqa)
        else:
            # a single query (decode) attends to every cached key: no mask; T queries on T keys: causal
            causal = mask is None and T > 1
            if mask is None and T > 1 and k.shape[2] != T:
                raise ValueError("a multi-token chunk after cached tokens needs an explicit mask")
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_local * self.head_dim)
        return adapt(lora, "wo", self.wo(y)[0], y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x); ReLU^2: down(relu(up x)^2); GELU (GPT-2): down(gelu(up x)) with the tanh
    approximation (transformers' gelu_new). Biases on every projection with `proj_bias`."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, out_std: float):
        super().__init__()
        hidden, tp = mlp_hidden(cfg), tp_world()
        if hidden % tp:
            raise ValueError(f"MLP width {hidden} is not divisible by TP = {tp}")
        in_init, out_init = projection_inits(cfg, out_std)
        col = partial(ColumnLinear, config=mp, init_method=in_init, bias=cfg.proj_bias,
                      disable_grad_reduce=True, tp_group=tp_group())
        self.kind = cfg.mlp
        self.w_up = col(cfg.d_model, hidden)
        self.w_gate = col(cfg.d_model, hidden) if cfg.mlp == "swiglu" else None
        self.w_down = RowLinear(hidden, cfg.d_model, config=mp, init_method=out_init,
                                        bias=cfg.proj_bias, input_is_parallel=True, skip_bias_add=False,
                                        tp_group=tp_group())
        for proj in (self.w_up, self.w_gate, self.w_down):
            if proj is not None:
                declare_role(proj.weight, "matrix")
                declare_role(proj.bias, "bias")  # None without proj_bias

    def forward(self, x: torch.Tensor, lora: LoRA | None = None) -> torch.Tensor:
        x_tp = to_tp(x)
        up = adapt(lora, "w_up", self.w_up(x_tp)[0], x)  # column-parallel adapters read the replicated input
        if self.kind == "swiglu":
            h = F.silu(adapt(lora, "w_gate", self.w_gate(x_tp)[0], x)) * up
        elif self.kind == "gelu":
            h = F.gelu(up, approximate="tanh")
        else:
            h = F.relu(up).square()
        return adapt(lora, "w_down", self.w_down(h)[0], h)


# --- the layer --------------------------------------------------------------------------------------------

class Layer(nn.Module):
    """One transformer layer.

    pre-norm:  x = x + attn(n1 x);      x = x + mlp(n3 x)
    sandwich:  x = n2(x + attn(n1 x));  x = n4(x + mlp(n3 x))     (the output is always normalised)

    (n1 attn_norm, n2 attn_out_norm, n3 mlp_norm, n4 mlp_out_norm: `make_norm` of model.norm_kind.)

    Optional inputs from the loop: `query` (queries read n1(query) instead of n1(x): FLT), `recall` (the
    input embedding added to the stream before the layer, before the MLP, or both: internal recall) and `lora`
    (this loop's adapter deltas by projection name, core layers only: `lora.LayerLoRA.at(loop)`).
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, *, norm: str, affine: bool, out_std: float,
                 recall_at: str = "none"):
        super().__init__()
        d, dtype = cfg.d_model, mp.params_dtype
        self.recall_at = recall_at
        norm_of = partial(make_norm, cfg.norm_kind, d, affine, dtype, cfg.norm_eps)
        self.attn_norm = norm_of()
        self.attn = Attention(cfg, mp, affine, out_std)
        self.mlp_norm = norm_of()
        self.mlp = MLP(cfg, mp, out_std)
        sandwich = norm == "sandwich"
        self.attn_out_norm = norm_of() if sandwich else None
        self.mlp_out_norm = norm_of() if sandwich else None

    def forward(self, x: torch.Tensor, rope, *, mask: torch.Tensor | None = None, query: torch.Tensor | None = None,
                recall: torch.Tensor | None = None, kv_cache=None, lora: LoRA | None = None) -> torch.Tensor:
        if recall is not None and self.recall_at in ("layer", "sublayer"):
            x = x + recall
        kv_in = self.attn_norm(x)
        q_in = kv_in if query is None else self.attn_norm(query)
        x = x + self.attn(q_in, kv_in, rope, mask, kv_cache, lora)
        if self.attn_out_norm is not None:
            x = self.attn_out_norm(x)
        if recall is not None and self.recall_at in ("mlp", "sublayer"):
            x = x + recall
        x = x + self.mlp(self.mlp_norm(x), lora)
        if self.mlp_out_norm is not None:
            x = self.mlp_out_norm(x)
        return x

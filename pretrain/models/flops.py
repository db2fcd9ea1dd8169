"""FLOPs per token of a looped model, for model-FLOPs and hardware-FLOPs utilisation.

Counting (matrix multiplies only; norms, rotary, softmax, biases, position-embedding lookups and elementwise work
are ignored, as usual):
- a matmul with an n x m weight costs 2 n m FLOPs per token forward and twice that backward (input and weight
  gradients), so a backpropagated pass costs 3x its forward;
- attention scores and values cost 4 * seq * d_q per token per layer for the full T x T products; with the default
  `attention="causal"` only half is counted (2 * seq * d_q), since a query attends on average to half the
  sequence and flash kernels skip the masked blocks; `attention="full"` counts the full square (PaLM-style MFU,
  and what a math-kernel FLOP counter measures);
- loops under no_grad (truncated backprop) cost their forward only; the last `backprop_loops` cost 3x;
- one loss head (coda + output head) per loss-feeding loop: `loss_on` counts them with the model's own rule
  (`depth.loss_loop_indices`), or `loss_loops` gives the count;
- activation checkpointing adds one more forward of what it recomputes: each backpropagated loop ("loop"), or
  every backpropagated layer ("layer"); with more than one loss-feeding loop the loss heads (coda + head) are
  recomputed too.
- Mixture-of-Recursions routing (`model.router`, routing.py): `capacities` gives the share of the tokens active at
  each loop (a shorter list reuses its last entry); loop r's projections, MLP, injection and LoRA cost its share f_r
  and its attention f_r^2 (queries and keys both shrink), the routers add 2 d per token per loop (expert choice,
  applied to every token) or 2 d N_r once (token choice), under the same forward/backward/recompute rules (the
  routers sit outside a loop checkpoint). Exact for expert choice in training with capacities int(c_r T) / T;
  for token choice (or the inference rule) the share is data-dependent: pass the expected one (e.g. the logged
  router/selected_frac_r{r}) and the count is approximate. Without `capacities`: expert choice counts its
  training top-k shares max(1, int(c_r T)) / T of the configured capacities (exact), token choice every loop
  as full (an upper bound).
model_flops = what the maths needs (forward-only loops 1x, the rest 3x); hardware_flops = model_flops +
recomputation (what the device executes). Both per token; multiply by tokens per second over peak FLOP/s for MFU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pretrain.models.config import (
    ModelConfig,
    lora_targets,
    mlp_hidden,
    padded_vocab,
    projection_dims,
    resolve_switches,
    router_capacities,
)
from pretrain.models.depth import loss_loop_indices


@dataclass(frozen=True)
class FlopsBreakdown:
    seq_len: int
    loops: int
    backprop_loops: int
    loss_loops: int
    attention: str  # "causal" (half the T x T products counted) or "full"
    layer_forward: float  # one layer, forward (projections + MLP + attention)
    attention_forward: float  # the attention-products part of layer_forward
    core_forward: float  # one loop: n_core layers + injection, forward
    prelude_forward: float
    head_forward: float  # coda + output head, once per loss-feeding loop, forward
    forward_only: float  # loops under no_grad
    backprop: float  # prelude, backpropagated loops and loss heads: forward + backward
    recompute: float  # activation-checkpoint re-forwards
    model_flops: float
    hardware_flops: float


def loop_lora_flops(model_cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one loop's per-loop LoRA adapters (`model.loop_lora_rank` r): x -> A_t x -> B_t u
    costs 2 r (in + out) per adapted projection of every core layer (counted in `core_forward`, so backpropagated
    loops cost 3x and recomputation adds one more forward, like the layers); 0 without adapters."""
    dims = projection_dims(model_cfg)
    return float(model_cfg.n_core * sum(2 * model_cfg.loop_lora_rank * sum(dims[t]) for t in lora_targets(model_cfg)))


def flops_per_token(model_cfg: ModelConfig, seq_len: int, loops: int, backprop_loops: int = 0,
                    activation_checkpointing: str = "none", *, vocab_size: int = 0, loss_loops: int = 1,
                    attention: str = "causal", loss_on: str | None = None,
                    capacities: Sequence[float] | None = None) -> FlopsBreakdown:
    """FLOPs per token of one training step (forward + backward). `backprop_loops` 0 = all; `vocab_size` is used
    when model.vocab_size is 0; `loss_on` (loop.loss_on) counts the loss-feeding loops as the model does;
    without it `loss_loops` is their count (1 for loss_on: last; at most the backpropagated loops). `capacities`:
    the active share of each loop under `model.router` (see the module docstring; `core_forward` stays one full
    loop)."""
    vocab = model_cfg.vocab_size or vocab_size
    if vocab <= 0:
        raise ValueError("vocabulary size unknown: set model.vocab_size or pass vocab_size")
    if attention not in ("causal", "full"):
        raise ValueError(f"attention must be causal or full, not {attention!r}")
    sw, d = resolve_switches(model_cfg), model_cfg.d_model
    hd, n_kv = d // model_cfg.n_heads, model_cfg.n_kv_heads or model_cfg.n_heads
    d_q, d_kv = model_cfg.n_heads * hd, n_kv * hd
    k = loops if backprop_loops <= 0 else min(backprop_loops, loops)
    n_loss = len(loss_loop_indices(loss_on, loops, k)) if loss_on is not None else max(1, min(loss_loops, k))

    attn = 4 * seq_len * d_q * (0.5 if attention == "causal" else 1.0)
    proj = 2 * (d * d_q + 2 * d * d_kv + d_q * d)
    mlp = 2 * (3 if model_cfg.mlp == "swiglu" else 2) * d * mlp_hidden(model_cfg)  # relu2, gelu: up and down
    layer = proj + mlp + attn
    inject = {"concat": 2 * 2 * d * d, "parcae": 2 * d * d}.get(sw.injection, 0)
    lora = loop_lora_flops(model_cfg)  # per-loop adapters: part of every loop, recomputed with its layers
    core = model_cfg.n_core * layer + inject + lora
    prelude = model_cfg.n_prelude * layer
    head = model_cfg.n_coda * layer + 2 * d * padded_vocab(vocab)

    forward_only = (loops - k) * core
    backprop = 3 * (prelude + k * core + n_loss * head)
    heads_recomputed = n_loss * head if n_loss > 1 else 0.0
    coda = heads_recomputed if n_loss > 1 else n_loss * model_cfg.n_coda * layer  # what "layer" re-runs of the heads
    if activation_checkpointing == "loop":
        recompute = k * core + heads_recomputed
    elif activation_checkpointing == "layer":
        recompute = prelude + k * (model_cfg.n_core * layer + lora) + coda
    elif activation_checkpointing == "none":
        recompute = 0.0
    else:
        raise ValueError(f"activation_checkpointing must be none, loop or layer, not {activation_checkpointing!r}")
    if capacities is None and model_cfg.router == "expert_choice":  # training's top-k: k_r = max(1, int(c_r T))
        capacities = [max(1, int(c * seq_len)) / seq_len for c in router_capacities(model_cfg, loops)]
    if capacities is not None or model_cfg.router != "none":  # routing: each loop costs its active share
        forward_only, backprop, recompute = _routed(
            model_cfg, loops, k, capacities, activation_checkpointing, n_core_layer=model_cfg.n_core * (proj + mlp),
            attn=attn, inject=inject, lora=lora, prelude=prelude, heads=n_loss * head,
            recompute_heads={"loop": heads_recomputed, "layer": coda}.get(activation_checkpointing, 0.0))
    model_flops = forward_only + backprop
    return FlopsBreakdown(seq_len=seq_len, loops=loops, backprop_loops=k, loss_loops=n_loss, attention=attention,
                          layer_forward=layer, attention_forward=attn, core_forward=core, prelude_forward=prelude,
                          head_forward=head, forward_only=forward_only, backprop=backprop, recompute=recompute,
                          model_flops=model_flops, hardware_flops=model_flops + recompute)


def _routed(cfg: ModelConfig, loops: int, k: int, capacities: Sequence[float] | None, ckpt: str, *,
            n_core_layer: float, attn: float, inject: float, lora: float, prelude: float, heads: float,
            recompute_heads: float) -> tuple[float, float, float]:
    """(forward-only, backprop, recompute) FLOPs per token with loop r at active share f_r (routing); `heads`: the
    loss heads' forward, `recompute_heads`: what the checkpointing mode re-runs of them."""
    caps = list(capacities) if capacities else [1.0]
    shares = [caps[min(r, len(caps) - 1)] for r in range(loops)]
    d = cfg.d_model
    per_loop_router = 2 * d if cfg.router == "expert_choice" else 0.0
    once_router = 2 * d * cfg.loops if cfg.router == "token_choice" else 0.0
    layers = [f * (n_core_layer + lora) + f * f * cfg.n_core * attn for f in shares]  # what "layer" re-runs
    core = [x + f * inject for x, f in zip(layers, shares, strict=True)]
    forward_only = sum(c + per_loop_router for c in core[:loops - k])
    backprop = 3 * (prelude + once_router + sum(c + per_loop_router for c in core[loops - k:]) + heads)
    if ckpt == "loop":
        recompute = sum(core[loops - k:]) + recompute_heads
    elif ckpt == "layer":
        recompute = prelude + sum(layers[loops - k:]) + recompute_heads
    else:
        recompute = 0.0
    return forward_only, backprop, recompute


def per_sequence_flops(model_cfg: ModelConfig, seq_len: int, depths, backprop_loops: int = 0,
                       activation_checkpointing: str = "none", *, vocab_size: int = 0,
                       attention: str = "causal") -> tuple[float, float]:
    """(model, hardware) FLOPs per token of one training step with per-sequence depth (`loop.per_sequence`,
    loss on the last loop). `depths`: the global batch's loop counts, one row per micro batch ([micro batches,
    micro_batch], every row the same number of tokens). Model FLOPs: the mean over sequences of each one's own
    count (d loops, its last min(backprop_loops, d) backpropagated). Hardware FLOPs: what runs, the mean over
    micro batches of the cost of running max(d) loops for every row, with a graph from the earliest gradient
    window on (see `looped._PerSequence`), recomputation included."""
    import numpy as np

    rows = np.asarray(depths, dtype=np.int64).reshape(-1, np.shape(depths)[-1])
    k = backprop_loops
    kw = dict(vocab_size=vocab_size, attention=attention, loss_on="last")

    def count(loops: int, backprop: int) -> FlopsBreakdown:
        return flops_per_token(model_cfg, seq_len, loops, backprop, activation_checkpointing, **kw)

    values, freq = np.unique(rows, return_counts=True)
    model = sum(int(c) * count(int(d), k).model_flops for d, c in zip(values, freq, strict=True)) / rows.size
    starts = rows - np.minimum(rows, k) if k > 0 else np.zeros_like(rows)
    hardware = [count(int(r.max()), int(r.max() - s.min())).hardware_flops for r, s in zip(rows, starts, strict=True)]
    return float(model), float(sum(hardware) / len(hardware))

"""The looped language model: embedding -> prelude -> core block x loops -> coda -> norm -> head.

    e = Prelude(E(x))                      # n_prelude ordinary layers
    h = h_0(e)                             # zeros | e | noise (None when every loop restarts from e)
    for t in 1..loops:                     # the same n_core layers every time
        h = outer_norm(Core(enter(h, e)))  # the recurrence (recurrence.py) says how h and e meet
    logits = Head(Norm(Coda(h)))

Structure: `self.injection` is the recurrence (`recurrence.REGISTRY[family]`, built once from the switches; its
`loop` is one loop). `_loops` is the loop driver: it runs the loops, owns the truncated-backprop window (and
per-sequence depth) and yields each loop's `Step`. The training forward consumes it for the loss heads;
diagnostics (`Recorder.observe`) watch it; early exit (`_run_with_exit`) and the KV cache are the inference path.

`LoopedLM.forward(tokens, labels, loops=, backprop_loops=, diagnostics=, doc_ids=, exit_epsilon=)`:
- loss: mean cross-entropy over the tokens (labels < 0 ignored) of every loss-feeding loop (`loop.loss_on`: the
  last, all, or the last third; loops outside the truncated-backprop window never feed the loss), averaged over
  those loops. Computed with megatron's `vocab_parallel_cross_entropy`, so the vocabulary stays sharded and the
  value is identical on every TP rank.
- chunked loss (`loss_chunk` = train.loss_chunk_tokens > 0): the head and cross-entropy run on that many tokens at
  a time, each chunk checkpointed (its logits recomputed in backward), so the fp32 logits of the whole micro batch
  never exist at once; still vocabulary-parallel under TP.
- logits: this rank's vocabulary shard [B, T, V_padded / tp] of the final state, soft-capped, padding ids at
  -inf. Only returned when no labels are given (or with return_logits=True): the loss path never materialises
  a second copy of the logits.
- truncated backprop: only the last `backprop_loops` loops build a graph (0 = all); earlier loops run under
  no_grad, and the state they hand on is a constant.
- depths (training, `loop.per_sequence`): a [B] tensor of per-sequence loop counts (`loops` is then ignored).
  The batch runs max(depths) loops; sequence b's state stops changing after its own loop d_b, its loss is taken
  on that final state (loss_on must be last), and truncated backprop counts from its own last loop (its last
  min(backprop_loops, d_b) loops carry gradient); see `_PerSequence`. Not with a KV cache or early exit.
- activation checkpointing ("loop" or "layer", set at build): non-reentrant torch.utils.checkpoint around each
  grad-carrying loop iteration or each layer, so activation memory does not grow with the loop count; with
  several loss-feeding loops each loss head (coda + head + cross-entropy) is checkpointed too.
- diagnostics=True: a `LoopDiagnostics` (per-loop state norms, relative change, gradient norm reaching each
  loop; the gradient norms are filled in by backward hooks when backward runs).
- exit_epsilon (inference): a sequence stops looping once ||h_t - h_{t-1}|| / ||h_{t-1}|| < epsilon (its state is
  frozen, later loops leave it unchanged; the batch stops when all have exited); `exit_loops` says where each
  stopped. The loss, if labels are given, is taken on the final states. With exit_per_token=True the rule is per
  position (norms over d_model), `exit_loops` is [B, T]: a token's state, and so every (loop, layer) key/value it
  produces, depends only on tokens <= it, so this form is also exact with a KV cache. A stopped token offers every
  later loop the keys/values of its exit loop (`generate.ExitKV`, with or without a cache), so once every token of
  the chunk has stopped the remaining loops are skipped, their cache slots filled by copies: compute is saved.
- exit gate (`model.exit_gate`, exit_gate.py): in training mode with labels the loss is the gate's objective over
  every loop (Stage I: the expected loss over exit steps minus loop.exit_entropy x its entropy; loop.exit_gate_only:
  Stage II, the gate alone), its parts in `stats`; in eval mode the loss is the ordinary one. exit_threshold=q
  (inference): a token stops once its cumulative exit probability reaches q (per token, like exit_per_token; q = 1
  is the fixed-depth forward bit for bit); `exit_loops` [B, T] says where.
- cache (inference): a `generate.KVCache`; `tokens` are then the next chunk after the cached positions.
- kv_sharing (models with model.router only): recursive KV sharing, loops >= 1 attend to loop 0's keys/values
  (routing.py), cached or not.
- attention_mask (inference, batched prompts of different lengths): [B, cached + T], 1 for a real token, 0 for
  (left) padding. Positions (rotary, or the rows of a learned position embedding) count real tokens only
  (position = number of real tokens before), padded keys are masked, and a padding query attends to itself only
  (so nothing is NaN). With it, each row computes exactly what it computes alone.
- doc_ids (packed rows): each token attends within its own document only. `model.attention: sdpa` builds a dense
  [B, 1, T, T] mask, `flex` one FlexAttention block mask (attention.py) in `_context`, reused by every layer of every
  loop; flex applies only there (not with attention_mask or a router, which keep the dense path; without doc_ids
  attention is plain causal SDPA either way).
- positions (`model.position`): rotary inside attention (relative: packed documents under doc_ids see what they see
  alone), or learned absolute embeddings added to the token embedding before the prelude (GPT-2; no rotary; a
  packed document keeps its offset in the row, as GPT-2 was trained; at most model.max_positions positions, a
  ValueError beyond, cached ones included).
- autocast (`autocast_dtype`, train.dtype: bf16_autocast): the whole forward, loss included, runs under
  torch.autocast to that dtype over fp32 parameters (`_under_autocast`); the trainer, `loopstack eval` and
  `load_run` set it from the run's train.dtype, so evaluation and generation compute as training did.
- random h_0 (Huginn, Parcae): fresh truncated-normal noise every call in training mode, from a generator seeded
  at build (identical on every TP rank; not in the state_dict: the trainer saves it per rank with
  `noise_state()` and restores it, so a resumed run draws what an uninterrupted one would);
  in eval mode a fixed function of position, so evaluation is deterministic and the KV cache exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import Any

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.attention import BlockMask, document_block_mask
from pretrain.models.config import LoopConfig, ModelConfig, Switches, padded_vocab, resolve_switches
from pretrain.models.depth import loss_loop_indices
from pretrain.models.diagnostics import EarlyExit, ExitRule, LoopDiagnostics, Recorder
from pretrain.models.exit_gate import ExitGate, GateExit, exit_objective, gate_only_objective
from pretrain.models.generate import ExitKV, KVCache, generate
from pretrain.models.layers import (
    ColumnLinear,
    Layer,
    PositionEmbedding,
    declare_role,
    make_norm,
    normal_init,
    parallel_config,
    rotary_tables,
    tp_group,
    tp_world,
)
from pretrain.models.lora import build_loop_lora
from pretrain.models.recurrence import Recurrence, build_recurrence
from pretrain.models.routing import build_router, routed_forward


@dataclass
class LoopedOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    diagnostics: LoopDiagnostics | None = None
    exit_loops: torch.Tensor | None = None  # [B] loops each sequence ran (early exit only)
    # scalar tensors the trainer logs next to the loss (averaged over micro batches and data-parallel ranks): the
    # parts of an objective with extra terms (exit gate, router losses) and what they decided (mean exit loop, ...)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Context:
    """What every layer of one forward shares: rotary tables (None with learned positions), positions (the learned
    position embedding's rows, the random h_0's), attention mask, KV cache, loop count."""

    rope: tuple[torch.Tensor, torch.Tensor] | None
    positions: torch.Tensor
    mask: torch.Tensor | BlockMask | None  # dense boolean [B or 1, 1, T, keys], a flex block mask, or None = causal
    cache: KVCache | None
    loops: int
    # the core layers' K/V hook `layer(t, i)`: per-token early exit's stopped tokens' keys/values (generate.ExitKV),
    # or Mixture-of-Recursions KV sharing's loop-0 keys/values (routing._SharedKV)
    core_kv: ExitKV | Any = None  # anything with layer(t, i) -> a LayerKV-like `update(k, v)`


@dataclass
class Step:
    """One loop as the driver yields it: 0-based index t, the state before (`prev`), the state after (`state`,
    which a consumer may replace: early exit freezes exited sequences) and its value before the outer norm."""

    t: int
    prev: torch.Tensor | None
    state: torch.Tensor
    pre_norm: torch.Tensor


class _PerSequence:
    """Per-sequence depth in one forward. Sequence b runs its own loops 1..d_b at batch loops 1..d_b (so a loop-
    index-dependent block sees each sequence's own index), then keeps its state unchanged while the batch runs on
    to max(d): the new state is taken only where t < d_b (torch.where), so nothing computed in a frozen loop
    reaches it, forward or backward. Truncated backprop counts from each sequence's own last loop: with
    backprop_loops = k > 0, sequence b's gradient window is its loops d_b - min(k, d_b) + 1 .. d_b; a loop before
    the window hands on a detached state. The batch builds a graph from the earliest window start on."""

    def __init__(self, depths: torch.Tensor, k: int, batch: int, device: torch.device):
        host = depths.detach().to("cpu", torch.long)
        if host.shape != (batch,) or int(host.min()) < 1:
            raise ValueError(f"depths must be [{batch}] loop counts >= 1, got {tuple(host.shape)} {host.tolist()}")
        start = host - host.clamp(max=k) if k > 0 else torch.zeros_like(host)  # 0-based first loop with gradient
        self.loops, self._min_depth, self._min_start = int(host.max()), int(host.min()), int(start.min())
        self._max_start = int(start.max())
        self.backprop = self.loops - self._min_start
        self.depths, self.start = host.to(device)[:, None, None], start.to(device)[:, None, None]

    def step(self, t: int, h: torch.Tensor | None, h_next: torch.Tensor) -> torch.Tensor:
        """The batch state after 0-based loop t, given the state before it and the block's output."""
        if h_next.requires_grad and t < self._max_start:  # some sequences are still before their window
            h_next = torch.where(t >= self.start, h_next, h_next.detach())
        if t >= self._min_depth:  # some sequences are done: they keep their state
            h_next = torch.where(t < self.depths, h_next, h)
        return h_next


def _under_autocast(forward: Callable) -> Callable:
    """Run `forward` under torch.autocast(model.autocast_dtype) on the tokens' device when the model has one set and
    autocast is not already on (train.dtype: bf16_autocast, as nanochat runs its forward and loss). Backward, outside
    the forward, is not autocast (as torch recommends); activation checkpointing recomputes under the same state."""

    @wraps(forward)
    def wrapped(self: LoopedLM, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> LoopedOutput:
        dtype = self.autocast_dtype
        if dtype is None or torch.is_autocast_enabled(tokens.device.type):
            return forward(self, tokens, *args, **kwargs)
        with torch.autocast(tokens.device.type, dtype=dtype):
            return forward(self, tokens, *args, **kwargs)

    return wrapped


class LoopedLM(nn.Module):
    """The looped LM; see the module docstring for the forward contract. Build it with `build_model`."""

    def __init__(self, cfg: ModelConfig, loop_cfg: LoopConfig, vocab_size: int, *,
                 activation_checkpointing: str = "none", dtype: torch.dtype = torch.float32):
        super().__init__()
        if activation_checkpointing not in ("none", "loop", "layer"):
            raise ValueError(f"activation_checkpointing must be none, loop or layer, not {activation_checkpointing!r}")
        self.cfg, self.loop_cfg = cfg, loop_cfg
        self.switches: Switches = resolve_switches(cfg)
        self.activation_checkpointing = activation_checkpointing
        self.vocab_size = vocab_size
        sw, d, mp = self.switches, cfg.d_model, parallel_config(dtype)
        out_std = cfg.init_std / math.sqrt(2 * (cfg.n_prelude + cfg.n_core + cfg.n_coda))

        cfg.check_init()
        # model.init: nanochat draws the embedding N(0, 1) and the (untied) head N(0, 0.001); layers.projection_inits
        nanochat = cfg.init == "nanochat"
        # construction order fixes the RNG stream: keep it independent of TP
        self.embed = VocabParallelEmbedding(padded_vocab(vocab_size), d,
                                            init_method=normal_init(1.0 if nanochat else cfg.init_std),
                                            config=mp, tp_group=tp_group())
        # learned absolute positions (GPT-2), replicated; drawn only when present, so rotary models are unchanged
        self.pos_embed = (PositionEmbedding(cfg.max_positions, d, cfg.init_std, dtype)
                          if cfg.position == "learned" else None)
        layer = partial(Layer, cfg, mp, norm=sw.norm, affine=sw.norm_affine, out_std=out_std)
        self.prelude = nn.ModuleList(layer() for _ in range(cfg.n_prelude))
        self.core = nn.ModuleList(layer(recall_at=sw.internal_recall) for _ in range(cfg.n_core))
        self.coda = nn.ModuleList(layer() for _ in range(cfg.n_coda))
        # the recurrence (recurrence.py; registered as `injection`: its parameters are named injection.*)
        self.injection: Recurrence = build_recurrence(sw, d, cfg.n_core, cfg.init_std, dtype, cfg.norm_eps,
                                                      cfg.norm_kind)
        self.outer_norm = make_norm(cfg.norm_kind, d, sw.norm_affine, dtype, cfg.norm_eps) if sw.outer_norm else None
        self.injection.bind_exit(self.outer_norm)
        self.norm = make_norm(cfg.norm_kind, d, sw.norm_affine, dtype, cfg.norm_eps)
        self.lm_head = ColumnLinear(d, padded_vocab(vocab_size), config=mp, bias=False,
                                    init_method=normal_init(1e-3 if nanochat else cfg.init_std),
                                    skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp_group())
        declare_role(self.embed.weight, "embedding")
        declare_role(self.lm_head.weight, "head")  # None when tied
        # the random initial state has its own generator, seeded from the default RNG (same on every TP rank)
        self._noise_seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        self._noise_gen: torch.Generator | None = None
        self._eval_noise = torch.empty(0, d)
        # per-loop LoRA on the core (lora.py), created last: its A draws leave every other initial weight and the
        # noise seed as they are without it, so at init (B = 0) the model is the shared one exactly
        self.loop_lora = build_loop_lora(cfg, loop_cfg, dtype)
        # the learned exit gate (exit_gate.py), after everything else for the same reason
        self.exit_gate = ExitGate(d, cfg.init_std, dtype) if cfg.exit_gate else None
        # the loss computes the logits of at most this many tokens at a time (0 = all at once): set from outside
        # by the trainer (train.loss_chunk_tokens), like compilation; the same loss to fp32 rounding
        self.loss_chunk = 0
        # the forward (and its loss) runs under torch.autocast to this dtype when set (train.dtype: bf16_autocast,
        # parameters in fp32): set from outside, by the engine and the checkpoint loaders; None = no autocast
        self.autocast_dtype: torch.dtype | None = None
        # Mixture-of-Recursions routers (routing.py), created after everything else so that without them (router
        # none) and with them every other initial weight is the same
        cfg.check_router(loop_cfg)
        self.router = build_router(cfg, dtype)

    @property
    def recurrence(self) -> Recurrence:
        return self.injection

    # --- the forward pass -------------------------------------------------------------------------------------

    @_under_autocast
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, *, loops: int | None = None,
                backprop_loops: int | None = None, diagnostics: bool = False, doc_ids: torch.Tensor | None = None,
                exit_epsilon: float | None = None, loss_on: str | None = None, return_logits: bool = False,
                cache: KVCache | None = None, depths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, exit_per_token: bool = False,
                exit_threshold: float | None = None, kv_sharing: bool = False) -> LoopedOutput:
        if kv_sharing and self.router is None:
            raise ValueError("kv_sharing (recursive KV sharing) is a Mixture-of-Recursions semantics: it needs "
                             "model.router")
        if self.router is not None:  # Mixture-of-Recursions: the router decides each token's depth (routing.py)
            if exit_threshold is not None:
                raise ValueError("exit_threshold is the learned exit gate's rule: not with model.router (the router "
                                 "decides each token's depth)")
            return routed_forward(self, tokens, labels, loops=loops, backprop_loops=backprop_loops,
                                  diagnostics=diagnostics, doc_ids=doc_ids, exit_epsilon=exit_epsilon, loss_on=loss_on,
                                  return_logits=return_logits, cache=cache, depths=depths,
                                  attention_mask=attention_mask, exit_per_token=exit_per_token,
                                  kv_sharing=kv_sharing)
        n = loops or self.cfg.loops
        if exit_threshold is not None:  # the learned gate's rule: always per token
            if self.exit_gate is None:
                raise ValueError("exit_threshold needs the learned exit gate (model.exit_gate: true)")
            if exit_epsilon is not None:
                raise ValueError("one exit rule at a time: exit_threshold (learned gate) or exit_epsilon (convergence)")
            exit_per_token = True
        adaptive = exit_epsilon is not None or exit_threshold is not None
        k = self.loop_cfg.backprop_loops if backprop_loops is None else backprop_loops
        per_seq = None
        if depths is not None:  # per-sequence depth (training): n = max(depths), k = loops with any gradient
            if cache is not None or adaptive:
                raise ValueError("per-sequence depths are a training path: not with a KV cache or early exit")
            if (loss_on or self.loop_cfg.loss_on) != "last":
                raise ValueError("per-sequence depths need loss_on = last (each sequence's loss is on its final state)")
            per_seq = _PerSequence(depths, k, tokens.shape[0], tokens.device)
            n, k = per_seq.loops, per_seq.backprop
        k = n if k <= 0 else min(k, n)
        if cache is not None and (cache.loops != n or (adaptive and not exit_per_token)
                                  or doc_ids is not None):
            raise ValueError(f"a KV cache allocated for {cache.loops} loops serves exactly that loop count, "
                             "without per-sequence early exit or document masks")
        ctx = self._context(tokens, doc_ids, cache, n, attention_mask)
        e = self.injection.prepare(self._prelude(tokens, ctx))
        h = self.injection.init_state(e, self._initial_noise(e, ctx))
        steps = self._loops(h, e, ctx, n, k, per_seq)
        recorder = Recorder(n) if diagnostics else None
        if recorder is not None:
            steps = recorder.observe(steps)

        early_exit, losses, stats = None, [], {}
        if adaptive:  # inference: the loss, if any, on the final states
            valid = attention_mask[:, -tokens.shape[1]:].bool() if attention_mask is not None else None
            B, T = tokens.shape
            if exit_threshold is not None:
                early_exit = GateExit(self._exit_logit, exit_threshold, B, T, n, tokens.device, valid=valid)
            else:
                early_exit = EarlyExit(exit_epsilon, B, n, tokens.device, per_token=exit_per_token, length=T,
                                       valid=valid)
            if exit_per_token:  # a stopped token's later-loop keys/values: its exit loop's
                ctx.core_kv = ExitKV(cache, len(self.prelude), len(self.core))
            h = self._run_with_exit(steps, early_exit, h, ctx, n, T)
            if labels is not None:
                losses.append(self._loss_head(h, labels, ctx, checkpointed=False))
        elif self.exit_gate is not None and labels is not None and self.training:  # the gate's training objective
            h, loss, stats = self._exit_gate_loss(steps, labels, ctx)
            losses.append(loss)
        else:
            loss_loops = range(0) if labels is None else self._loss_loops(n, k, loss_on)
            for step in steps:
                h = step.state
                if step.t + 1 in loss_loops:
                    losses.append(self._loss_head(h, labels, ctx, checkpointed=len(loss_loops) > 1))

        logits = self._logits(h, ctx) if labels is None or return_logits else None
        if cache is not None:
            cache.advance(tokens.shape[1])
        return LoopedOutput(loss=torch.stack(losses).mean() if losses else None, logits=logits,
                            diagnostics=recorder.finish(self.injection.diagnostics()) if recorder else None,
                            exit_loops=early_exit.loops_run if early_exit else None, stats=stats)

    def _loops(self, h: torch.Tensor | None, e: torch.Tensor, ctx: _Context, n: int, k: int,
               per_seq: _PerSequence | None = None):
        """The loop driver: n loops from state h, only the last k building a graph (truncated backprop: the
        state an earlier loop hands on is a constant); yields each loop's `Step`, then continues from
        `step.state`."""
        grad_on = torch.is_grad_enabled()
        for t in range(n):
            with torch.set_grad_enabled(grad_on and t >= n - k):
                h_next, pre_norm = self._loop(t, h, e, ctx)
            if per_seq is not None:
                h_next = per_seq.step(t, h, h_next)
            step = Step(t, h, h_next, pre_norm)
            yield step
            h = step.state

    def _exit_gate_loss(self, steps, labels: torch.Tensor, ctx: _Context):
        """Every loop's per-token cross-entropy and gate logit, combined by the exit gate's objective (exit_gate.py):
        Stage I (the expected loss over exit steps minus loop.exit_entropy x its entropy) or, with
        loop.exit_gate_only, Stage II (the model under no_grad, the gate alone against the next loop's improvement).
        Returns the final state, the loss and its parts."""
        lc, only = self.loop_cfg, self.loop_cfg.exit_gate_only
        ces, logits, h = [], [], None
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and not only):  # Stage II: nothing of the model builds a graph
            for step in steps:
                h = step.state
                ces.append(self._loss_head(h, labels, ctx, checkpointed=True, per_token=True))
                if only:
                    normed = self.norm(h).detach()
                    with torch.set_grad_enabled(grad):
                        logits.append(self.exit_gate(normed))
                else:
                    logits.append(self._exit_logit(h))
        valid = labels >= 0
        if only:
            loss, stats = gate_only_objective(ces, logits, valid, lc.exit_gate_sharpness, lc.exit_gate_margin)
        else:
            loss, stats = exit_objective(ces, logits, valid, lc.exit_entropy)
        return h, loss, stats

    def _exit_logit(self, h: torch.Tensor) -> torch.Tensor:
        """The exit gate's logit [B, T] on a loop state: it reads the state through the final norm."""
        return self.exit_gate(self.norm(h))

    @staticmethod
    def _run_with_exit(steps, early_exit: ExitRule, h: torch.Tensor | None, ctx: _Context, n: int,
                       length: int) -> torch.Tensor:
        """Early exit (inference): freeze each sequence (token) once its rule says stop; once all have, skip the
        remaining loops (with a KV cache their slots get the exit loop's keys/values: `generate.ExitKV`)."""
        for step in steps:
            step.state = h = early_exit.step(step.t, step.prev, step.state)
            if early_exit.all_done():
                if ctx.cache is not None and step.t + 1 < n:
                    ctx.core_kv.fill_skipped(step.t + 1, n, length)
                break
            if ctx.core_kv is not None:  # before the next loop runs: who offers it their exit loop's keys/values
                ctx.core_kv.frozen = early_exit.exited()
        return h

    def _loop(self, t: int, h: torch.Tensor | None, e: torch.Tensor, ctx: _Context):
        # checkpoints keep only their inputs (the loop state); nothing inside a loop draws random numbers (no
        # dropout, h_0 noise is drawn before the loop), so there is no RNG state to preserve for recomputation
        if self.activation_checkpointing == "loop" and torch.is_grad_enabled():
            return checkpoint(self._iterate, t, h, e, ctx, use_reentrant=False, preserve_rng_state=False)
        return self._iterate(t, h, e, ctx)

    def _iterate(self, t: int, h: torch.Tensor | None, e: torch.Tensor, ctx: _Context):
        """One pass through the core block (the recurrence's `loop`): loop state in, next loop state out (and its
        value before the outer norm, for diagnostics)."""
        return self.injection.loop(h, e, partial(self._core_layer, t, ctx))

    def _core_layer(self, t: int, ctx: _Context, i: int, x: torch.Tensor, **kw) -> torch.Tensor:
        """Core layer i in loop t: its KV-cache slot and this loop's LoRA adapters."""
        slot = len(self.prelude) + t * len(self.core) + i
        lora = self.loop_lora[i].at(t) if self.loop_lora is not None else None
        kv = ctx.core_kv.layer(t, i) if ctx.core_kv is not None else None
        return self._layer(self.core[i], x, ctx, slot, lora=lora, kv=kv, **kw)

    def _layer(self, layer: Layer, x: torch.Tensor, ctx: _Context, slot: int, checkpointed: bool = True, kv=None,
               **kw):
        if kv is None and ctx.cache is not None:
            kv = ctx.cache.layer(slot)
        if checkpointed and self.activation_checkpointing == "layer" and torch.is_grad_enabled():
            return checkpoint(layer, x, ctx.rope, mask=ctx.mask, kv_cache=kv, use_reentrant=False,
                              preserve_rng_state=False, **kw)
        return layer(x, ctx.rope, mask=ctx.mask, kv_cache=kv, **kw)

    def _prelude(self, tokens: torch.Tensor, ctx: _Context) -> torch.Tensor:
        x = self.embed(tokens)
        if self.switches.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)
        if self.pos_embed is not None:  # learned positions: [T, d] or per row [B, T, d] (padding, cache offset)
            x = x + self.pos_embed(ctx.positions)
        for i, layer in enumerate(self.prelude):
            x = self._layer(layer, x, ctx, i)
        return x

    def _logits(self, h: torch.Tensor, ctx: _Context, checkpointed: bool = True) -> torch.Tensor:
        """Coda -> final norm -> head on this rank's vocabulary shard, soft-capped, padding ids at -inf."""
        return self._head(self._coda(h, ctx, checkpointed))

    def _coda(self, h: torch.Tensor, ctx: _Context, checkpointed: bool = True) -> torch.Tensor:
        first = len(self.prelude) + ctx.loops * len(self.core)
        for j, layer in enumerate(self.coda):
            h = self._layer(layer, h, ctx, first + j, checkpointed)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm -> head on this rank's vocabulary shard, soft-capped, padding ids at -inf."""
        weight = self.embed.weight if self.cfg.tie_embeddings else None
        logits = self.lm_head(self.norm(h), weight=weight)[0]
        if torch.is_autocast_enabled(logits.device.type):  # bf16_autocast: soft-cap and loss in fp32, as nanochat
            logits = logits.float()
        c = self.cfg.logit_softcap
        if c > 0:
            logits = c * torch.tanh(logits / c)
        pad = self._padding_mask(logits)
        return logits if pad is None else logits.masked_fill(pad, float("-inf"))

    def _loss_head(self, h: torch.Tensor, labels: torch.Tensor, ctx: _Context, checkpointed: bool,
                   per_token: bool = False) -> torch.Tensor:
        """The mean cross-entropy of the head on state h (per_token: each token's, [B, T], 0 where labels < 0)."""
        if checkpointed and self.activation_checkpointing != "none" and torch.is_grad_enabled():
            # several loss loops would each keep a [B, T, V/tp] softmax alive: recompute instead
            return checkpoint(self._loss_of, h, labels, ctx, False, per_token, use_reentrant=False,
                              preserve_rng_state=False)
        return self._loss_of(h, labels, ctx, True, per_token)

    def _loss_of(self, h, labels, ctx, layer_ckpt: bool, per_token: bool = False) -> torch.Tensor:
        h = self._coda(h, ctx, layer_ckpt)
        valid = labels >= 0
        n = labels.numel()
        if 0 < self.loss_chunk < n:  # chunked: at most loss_chunk tokens' logits exist at a time
            B, T, d = h.shape
            flat_h, flat_y = h.reshape(1, n, d), labels.reshape(1, n)
            parts = []
            for lo in range(0, n, self.loss_chunk):
                hi = min(lo + self.loss_chunk, n)
                if torch.is_grad_enabled():  # backward recomputes this chunk's logits instead of keeping them
                    parts.append(checkpoint(self._token_ce, flat_h[:, lo:hi], flat_y[:, lo:hi], use_reentrant=False,
                                            preserve_rng_state=False))
                else:
                    parts.append(self._token_ce(flat_h[:, lo:hi], flat_y[:, lo:hi]))
            ce = torch.cat(parts, dim=1).view(B, T) * valid
        else:
            ce = self._token_ce(h, labels) * valid
        return ce if per_token else ce.sum() / valid.sum().clamp_min(1)

    def _token_ce(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each token's cross-entropy of the head on h (labels < 0 read as 0: the caller masks them), computed
        vocabulary-parallel in fp32 (in place on the fp32 logits)."""
        return vocab_parallel_cross_entropy(self._head(h).float(), labels.clamp_min(0))

    # --- helpers ----------------------------------------------------------------------------------------------

    def _loss_loops(self, n: int, k: int, loss_on: str | None) -> range:
        """1-based loops feeding the loss: the chosen ones among those that carry gradient (the last k); the rule
        is `depth.loss_loop_indices`, which the FLOP count uses too."""
        return loss_loop_indices(loss_on or self.loop_cfg.loss_on, n, k)

    def _context(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None, cache: KVCache | None,
                 loops: int, attention_mask: torch.Tensor | None = None) -> _Context:
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        head_dim, dtype = self.cfg.d_model // self.cfg.n_heads, self.embed.weight.dtype
        learned = self.pos_embed is not None
        if learned and start + T > self.cfg.max_positions:  # positions never exceed start + T - 1
            raise ValueError(f"{start + T} positions (cached {start} + new {T}) exceed model.max_positions = "
                             f"{self.cfg.max_positions} of the learned position embedding")
        if attention_mask is not None:  # padded prompts: per-row positions, padded keys masked
            if doc_ids is not None or tuple(attention_mask.shape) != (B, start + T):
                raise ValueError(f"attention_mask must be [batch, cached + new] = [{B}, {start + T}] (and not "
                                 f"with doc_ids), got {tuple(attention_mask.shape)}")
            real = attention_mask.to(device=tokens.device, dtype=torch.bool)
            positions = (real.long().cumsum(1) - 1).clamp_min(0)[:, start:]  # [B, T]
            rope = None
            if not learned:
                cos, sin = rotary_tables(positions.reshape(-1), head_dim, self.cfg.rope_theta, dtype)
                rope = (cos.view(B, 1, T, -1), sin.view(B, 1, T, -1))
            q_at = torch.arange(start, start + T, device=tokens.device)[:, None]
            k_at = torch.arange(start + T, device=tokens.device)[None, :]
            mask = ((real[:, None, None, :] & (k_at <= q_at)) | (k_at == q_at))  # [B, 1, T, start + T]
            return _Context(rope=rope, positions=positions, mask=mask, cache=cache, loops=loops)
        positions = torch.arange(start, start + T, device=tokens.device)
        rope = None if learned else rotary_tables(positions, head_dim, self.cfg.rope_theta, dtype)
        mask = None
        if doc_ids is not None and self.cfg.attention == "flex" and self.router is None:
            # FlexAttention (attention.py): one block mask, built here once, for every layer of every loop. The
            # router (routing.py) gathers rows of the dense mask for its token subsets: it keeps the dense path
            mask = document_block_mask(doc_ids.to(tokens.device))
        elif doc_ids is not None:  # attend only within the same document (packed sequences)
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
        elif start > 0 and T > 1:  # a chunk after cached tokens: causal with an offset
            mask = torch.ones(T, start + T, dtype=torch.bool, device=tokens.device).tril(start)[None, None]
        return _Context(rope=rope, positions=positions, mask=mask, cache=cache, loops=loops)

    def _padding_mask(self, logits: torch.Tensor) -> torch.Tensor | None:
        local = logits.shape[-1]
        first = self.embed.vocab_start_index
        if first + local <= self.vocab_size:
            return None
        return torch.arange(first, first + local, device=logits.device) >= self.vocab_size

    def num_parameters(self) -> int:
        """Parameters of the whole model, any TP: the module tree's, a TP-split parameter counted for every rank."""
        tp = tp_world()
        return sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in self.parameters())

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module uses a parameter it does not own: the tied head reads the
        embedding matrix. ZeRO-3 must be told, or the head sees the embedding still partitioned."""
        return [(self.lm_head, self.embed.weight)] if self.cfg.tie_embeddings else []

    def noise_state(self) -> dict:
        """The training-time h_0 noise stream (random state init), so a resumed run draws what an uninterrupted
        one would; the trainer stores it with each rank's checkpoint state."""
        return {"seed": self._noise_seed, "gen": None if self._noise_gen is None else self._noise_gen.get_state()}

    def load_noise_state(self, state: dict) -> None:
        self._noise_seed = state["seed"]
        self._noise_gen = None
        if state["gen"] is not None:
            device = next(self.parameters()).device
            self._noise_gen = torch.Generator(device=device)
            self._noise_gen.set_state(state["gen"])

    def _initial_noise(self, e: torch.Tensor, ctx: _Context) -> torch.Tensor | None:
        """Truncated-normal h_0 (random state init). Training: fresh noise every call. Eval: a fixed function
        of position, so evaluation is deterministic and a KV cache reproduces the uncached forward."""
        if not self.injection.random_start:
            return None
        std = self.switches.state_init_std
        if self.training:
            if self._noise_gen is None or self._noise_gen.device != e.device:
                self._noise_gen = torch.Generator(device=e.device).manual_seed(self._noise_seed)
            noise = torch.empty(e.shape, device=e.device, dtype=torch.float32)
            return nn.init.trunc_normal_(noise, std=std, a=-3 * std, b=3 * std, generator=self._noise_gen)
        need = int(ctx.positions.max()) + 1
        if self._eval_noise.shape[0] < need:  # one seeded row per position: extending keeps earlier rows
            rows = [self._eval_noise]
            for p in range(self._eval_noise.shape[0], need):
                gen = torch.Generator().manual_seed((self._noise_seed + 7919 * p) % 2**63)
                rows.append(nn.init.trunc_normal_(torch.empty(1, e.shape[-1]), std=std, a=-3 * std, b=3 * std,
                                                  generator=gen))
            self._eval_noise = torch.cat(rows)
        return self._eval_noise[ctx.positions.cpu()].to(e.device).expand(e.shape)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, *, loops: int | None = None,
                 use_cache: bool = True, temperature: float = 0.0, seed: int = 0) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation; see generate.py for the cache design."""
        return generate(self, tokens, max_new_tokens, loops=loops, use_cache=use_cache, temperature=temperature,
                        seed=seed)


# --- building, parameter roles, counting ----------------------------------------------------------------------

def build_model(model_cfg: ModelConfig, loop_cfg: LoopConfig, vocab_size: int, *,
                activation_checkpointing: str = "none", dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> LoopedLM:
    """The looped LM for `model_cfg` (vocabulary: model.vocab_size, else `vocab_size`). Call after
    `init_distributed(tp, seed)`: the default RNG must be seeded identically on every rank. Parameters are
    initialised on the CPU and moved to `device` (default: the current CUDA device, else CPU)."""
    vocab = model_cfg.vocab_size or vocab_size
    if vocab <= 0:
        raise ValueError("vocabulary size unknown: set model.vocab_size or pass the tokenizer's")
    model = LoopedLM(model_cfg, loop_cfg, vocab, activation_checkpointing=activation_checkpointing, dtype=dtype)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return model.to(device)


def param_roles(model: LoopedLM) -> dict[str, str]:
    """Each parameter's optimizer role, as declared where it was created (`layers.declare_role`): matrix (2-D
    block matrices: Muon-eligible, decayed), embedding, head, norm, injection (Parcae / adapter parameters: AdamW,
    no decay), lora (per-loop LoRA banks: AdamW, no decay), bias. A parameter without a declared role, or with one
    not in `pretrain.optim.ROLES`, is an error. TP-sharded parameters carry megatron's `tensor_model_parallel` /
    `partition_dim` attributes."""
    from pretrain.optim import ROLES

    roles, bad = {}, []
    for name, p in model.named_parameters():
        role = getattr(p, "optim_role", None)
        if role not in ROLES:
            bad.append(f"{name} ({'no role declared' if role is None else f'unknown role {role!r}'})")
        roles[name] = role
    if bad:
        raise ValueError(f"parameters without a valid optimizer role: {', '.join(bad)}; declare one where the "
                         f"parameter is created (pretrain.models.layers.declare_role), one of {ROLES}")
    return roles


def count_parameters(model_cfg: ModelConfig, vocab_size: int, loop_cfg: LoopConfig | None = None) -> int:
    """Parameters of the model (padded vocabulary included), counted on its module tree (`LoopedLM.num_parameters`)
    built on the meta device: nothing is allocated or initialised, and the default RNG is left as it was.
    Independent of TP, and of the loop count except for the per-loop LoRA bank (`config.lora_bank`, from
    `loop_cfg`; default: a fixed depth of model.loops). Needs megatron's parallel state (`init_distributed`), as
    `build_model` does."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("count_parameters builds the model's module tree: call init_distributed(tp, seed) first")
    vocab = model_cfg.vocab_size or vocab_size
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = LoopedLM(model_cfg, loop_cfg or LoopConfig(), vocab)
    return model.num_parameters()


__all__ = ["LoopedLM", "LoopedOutput", "LoopDiagnostics", "build_model", "param_roles", "count_parameters"]

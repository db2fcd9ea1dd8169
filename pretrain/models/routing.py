"""Mixture-of-Recursions token routing (Bae et al. 2025, "MoR"): a router decides how many loops each token runs.

Sharing schedule. loopstack's prelude / core / coda layout is MoR's sharing schedule: n_prelude = n_coda = 1 is the
paper's default Middle-Cycle (first and last layer unique, the core block cycled), n_prelude = n_coda = 0 is Cycle.
Recursion r is loop r (0-based) of the core block; F(h) below is one whole loop of the recurrence
(`Recurrence.loop`, the outer norm included), so routing works for every recurrence family. A state h that does not
exist yet (the restart family's h_0 = None) reads as the recurrence's input e wherever a value is needed (router
input, a token never selected).

Expert choice (`model.router: expert_choice`, one Linear(d, 1) router per loop; a deeper loop than model.loops
reuses the last): at loop r the router reads the state entering it, z = w_r . h, g = alpha sigmoid(z). Training
(uncached, model.train()): the top k_r = max(1, int(c_r T)) of the tokens selected at loop r - 1 (hierarchical;
all tokens at r = 0) by z, re-sorted into causal order. Selected tokens: h <- h + g F(h) (g F(e) where h is None);
the others keep their state and drop out of every later loop. Capacities c_r: `model.router_capacity`, default
(N - r) / N with N the forward's loop count. Aux loss: BCE-with-logits of z towards 1 for the selected tokens, 0
for the other candidates, mean over the candidates, summed over loops (x router_aux_coeff); z-loss: mean z^2 over
the candidates (x router_z_coeff, default 0). Inference (model.eval(), and always with a KV cache): top-k over the
whole sequence is not causal, so a token is selected iff sigmoid(z) >= 0.5 (what the aux loss trains the router to
say), still hierarchical; a loop with capacity 1 keeps every candidate, as its top-k does in training.

Token choice (`model.router: token_choice`, one Linear(d, N_r), N_r = model.loops): the router reads e (the first
loop's input), g = alpha softmax(z), depth i = argmax + 1 (capped at the forward's loop count; loops past N_r run
no token). Loops r < i: h <- F(h) (ungated); loop i: h <- e + g_i F(h) (the official code's form); after i the
state stays. Balancing loss sum_i f_i P_i (f_i = N_r x share of tokens choosing i, P_i = mean gate g_i) x
router_aux_coeff, z-loss mean(logsumexp(z)^2) x router_z_coeff.

Compute falls for real (training; inference, cached or not): each loop gathers its active tokens, [B, k_r, d] for
expert choice in training (the same k in every row, no padding), else per row padded to the longest row with a
validity mask. Rotary uses the tokens' original positions, attention is causal among the tokens active at that
loop (and within a document under doc_ids), a padding query attends to itself only; the updated states are
scattered back. `Routers.dense = True` selects the dense reference instead (every token computed, the selection
applied by a key mask and torch.where): the tests check both agree. LoRA per loop, activation checkpointing
("loop": each loop's compute is checkpointed; "layer" as usual) and truncated backprop (earlier loops, their
routers included, under no_grad) keep working.

Loss: the LM loss on the final state (routing takes the loss on the last loop only: loop.loss_on must be last),
plus, in training mode, the router losses; in eval mode `loss` is the LM loss alone (evaluation perplexity). Parts
in `LoopedOutput.stats`: router/lm_loss, router/aux_loss, router/z_loss (unweighted), router/mean_depth (mean loops
run per token), router/selected_frac_r{r} (share of the tokens active at loop r, r < model.loops).

KV cache (recursion-wise caching): a prefill or decode chunk runs loop t on its tokens active at t only (gathered
per row, padded), and the layers write their K/V at those tokens' positions of loop t's slots (`KVCache.scatter`);
`KVCache.active[t]` ([B, max_len] bool) records which positions were active at loop t and attention masks the
others out, so a token's K/V at loop t is written and attended only if it was active there: exactly the uncached
inference forward. (A padding slot of a gathered row writes at an inactive position, which nothing attends.) With
`dense` the chunk is computed whole and the inactive tokens masked.
Per-sequence depth and early exit are refused (the router decides depth).

Recursive KV sharing (MoR §2.2.2, `forward(..., kv_sharing=True)`): every token runs loop 0 (token choice's depth
is >= 1; expert choice needs router_capacity[0] = 1, else a ValueError), and the keys/values of loop 0 at core
layer i are reused by every later loop: at loop t >= 1, layer i, the active tokens' queries attend to the loop-0
K/V of all tokens at positions <= their own (causal, within a document under doc_ids, padding masked); the K/V
that loop t computes are discarded. Queries shrink with the routing, keys/values stay full length. It is another
model, not an approximation of recursion-wise caching, so it is defined for the uncached forward too (training
included: gradients reach loop 0 through the shared K/V), and cached == uncached holds for it. The keys/values
reach the layers through `_SharedKV`, the core layers' K/V hook (`_Context.core_kv`, which the routed forward
does not otherwise use: early exit is refused with a router): uncached it keeps loop 0's K/V in memory for the
forward; with a cache it reads loop 0's slots, so the slots of loops >= 1 are never written
(`KVCache.allocate(kv_sharing=True)` does not even allocate them: 1/N of the core's cache memory). A cache serves
one mode (`KVCache.kv_sharing`, fixed at allocation or by its first forward). Why a forward argument and not a
model attribute (like `loss_chunk`): it is a per-call choice of semantics like `loops`, the cached and uncached
calls of `generate_batch` pass the same value, and no state is left on the model to leak into a later forward
(an evaluation after a generation). The K/V projections of loop t >= 1 are still computed (the layer computes
them with the queries) and dropped; the memory is saved, not those FLOPs.

Tensor parallelism: the routers are replicated (role injection), read the replicated residual stream and compute in
fp32, so every rank takes the same top-k without communication.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.config import ModelConfig, router_capacities, router_settings
from pretrain.models.layers import replicated


class Routers(nn.Module):
    """The router weights [N, d], fp32 math. Expert choice: row r is loop r's Linear(d, 1) (`forward(x, r)` gives
    z [B, T]); token choice: the whole matrix is one Linear(d, N) (`forward(x)` gives z [B, T, N])."""

    def __init__(self, kind: str, d: int, n: int, init_std: float, dtype: torch.dtype):
        super().__init__()
        self.kind, self.n = kind, n
        self.dense = False  # tests: the dense reference path instead of gathering the active tokens
        self.weight = replicated(nn.Parameter(torch.empty(n, d, dtype=dtype)), "injection")
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor, r: int | None = None) -> torch.Tensor:
        w = self.weight.float()
        if self.kind == "expert_choice":
            return F.linear(x.float(), w[min(r, self.n - 1)][None])[..., 0]
        return F.linear(x.float(), w)


def build_router(cfg: ModelConfig, dtype: torch.dtype) -> Routers | None:
    """The routers of `model.router`, or None (router none: nothing is created, the RNG stream is untouched)."""
    if cfg.router == "none":
        return None
    return Routers(cfg.router, cfg.d_model, cfg.loops, cfg.init_std, dtype)


@dataclasses.dataclass
class _Pick:
    """One loop's selection: active tokens [B, T], their gates (fp32 [B, T]), token choice's `last` (the token's
    final, gated loop) and expert choice's sorted top-k indices [B, k] in training (None: variable per row)."""

    active: torch.Tensor
    gate: torch.Tensor
    last: torch.Tensor | None = None
    idx: torch.Tensor | None = None


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [B, m] of x [B, T, ...] along dim 1."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _compact(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, m] of each row's active tokens in ascending order, padded to the longest row m with (distinct)
    inactive ones, and the validity mask [B, m]."""
    counts = active.sum(1)
    m = int(counts.max())
    idx = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :m]
    return idx, torch.arange(m, device=active.device)[None] < counts[:, None]


def _gathered_context(ctx, idx: torch.Tensor, valid: torch.Tensor | None):
    """The context of the gathered tokens idx [B, m]: rotary at their original positions, attention causal among
    them (and the document / padding mask gathered), a padding slot attending to itself only."""
    B, m = idx.shape
    rope = None
    if ctx.rope is not None:
        def rows(t):  # [T, hd/2] or [B, 1, T, hd/2] -> [B, 1, m, hd/2]
            t = t[None].expand(B, -1, -1) if t.dim() == 2 else t[:, 0]
            return _take(t, idx)[:, None]
        rope = (rows(ctx.rope[0]), rows(ctx.rope[1]))
    pos = ctx.positions if ctx.positions.dim() == 2 else ctx.positions[None].expand(B, -1)
    mask = None
    if ctx.mask is not None or valid is not None:
        if ctx.mask is None:
            base = idx[:, None, :] <= idx[:, :, None]
        else:
            full = ctx.mask[:, 0].expand(B, -1, -1)
            base = _take(full, idx).gather(2, idx[:, None, :].expand(-1, m, -1))
        if valid is not None:
            base = base & valid[:, None, :] & valid[:, :, None]
        mask = (base | torch.eye(m, dtype=torch.bool, device=idx.device))[:, None]
    return dataclasses.replace(ctx, rope=rope, positions=pos.gather(1, idx), mask=mask, cache=None)


class _SharedKV:
    """Recursive KV sharing: the core layers' K/V hook (`layer(t, i)`, the interface of `generate.ExitKV`). Loop 0
    stores (uncached) or writes to its cache slot (cached) the K/V of every token; a later loop's layer gets loop
    0's K/V of all positions up to the chunk's end in place of its own, which are dropped."""

    def __init__(self, cache, n_prelude: int, n_core: int):
        self.cache, self.n_prelude, self.n_core = cache, n_prelude, n_core
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # uncached: loop 0's K/V of core layer i
        self.length = 0  # tokens of the current chunk

    def layer(self, t: int, i: int) -> _SharedLayerKV:
        return _SharedLayerKV(self, t, i)


class _SharedLayerKV:
    """The `kv_cache` of core layer i in loop t under `_SharedKV` (the interface of `generate.LayerKV`)."""

    def __init__(self, owner: _SharedKV, t: int, i: int):
        self.owner, self.t, self.i = owner, t, i

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o, c = self.owner, self.owner.cache
        slot = o.n_prelude + self.i  # loop 0's slot of core layer i
        if self.t == 0:  # every token of the chunk, in order (loop 0 runs them all)
            if c is not None:
                return c.layer(slot).update(k, v)
            o.kv[self.i] = (k, v)
            return k, v
        if c is None:
            return o.kv[self.i]
        end = c.pos + o.length
        return c.k[slot][:, :, :end], c.v[slot][:, :, :end]


def _shared_context(ctx, idx: torch.Tensor):
    """The context of gathered tokens idx [B, m] at a loop t >= 1 under KV sharing: rotary at their positions, the
    keys are loop 0's of every position (cached ones included) up to their own (and ctx.mask's rows: documents,
    padding), each query attending at least to itself."""
    B, m = idx.shape
    start = ctx.cache.pos if ctx.cache is not None else 0
    q_at = (idx + start)[:, None, :, None]  # [B, 1, m, 1]
    k_at = torch.arange(start + ctx.positions.shape[-1], device=idx.device)
    base = k_at <= q_at if ctx.mask is None else _take(ctx.mask[:, 0].expand(B, -1, -1), idx)[:, None]
    gathered = _gathered_context(dataclasses.replace(ctx, mask=None, cache=None), idx, None)
    return dataclasses.replace(gathered, mask=base | (k_at == q_at), cache=ctx.cache)


def check_kv_sharing(cfg: ModelConfig, loops: int) -> None:
    """A ValueError unless every token runs loop 0, which recursive KV sharing needs: expert choice with
    router_capacity[0] < 1 leaves some tokens out of loop 0 (they would have no K/V to share)."""
    if cfg.router == "expert_choice" and router_capacities(cfg, loops)[0] < 1.0:
        raise ValueError(f"KV sharing reuses loop 0's K/V, so every token must run loop 0: model.router_capacity[0] = "
                         f"{router_capacities(cfg, loops)[0]} < 1")


def _record(cache, active: torch.Tensor, t: int) -> torch.Tensor:
    """Record the chunk's tokens active at loop t in `cache.active[t]`; the keys a query at loop t may see
    [B, cached + T] (the positions active at t)."""
    B, T = active.shape
    if t not in cache.active:
        cache.active[t] = torch.zeros(B, cache.max_len, dtype=torch.bool, device=active.device)
    cache.active[t][:, cache.pos:cache.pos + T] = active
    return cache.active[t][:, :cache.pos + T]


def _dense_context(ctx, active: torch.Tensor, t: int):
    """The context of the dense form: the keys restricted to the tokens active at loop t (with a KV cache: the
    positions recorded active at t), every query attending to itself."""
    T = active.shape[1]
    start = ctx.cache.pos if ctx.cache is not None else 0
    keys = _record(ctx.cache, active, t) if ctx.cache is not None else active
    q_at = torch.arange(start, start + T, device=active.device)[:, None]
    k_at = torch.arange(keys.shape[1], device=active.device)[None, :]
    base = ctx.mask if ctx.mask is not None else (k_at <= q_at)[None, None]
    return dataclasses.replace(ctx, mask=(base & keys[:, None, None, :]) | (k_at == q_at))


def _cached_context(ctx, idx: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor):
    """The context of gathered chunk tokens idx [B, m] with a KV cache: rotary at their positions, attention to
    the positions active at this loop (`keys` [B, cached + T]) up to their own, a padding slot to itself only."""
    B, m = idx.shape
    q_at = (idx + ctx.cache.pos)[:, None, :, None]  # [B, 1, m, 1]
    k_at = torch.arange(keys.shape[1], device=idx.device)
    base = k_at <= q_at if ctx.mask is None else _take(ctx.mask[:, 0].expand(B, -1, -1), idx)[:, None]
    mask = (base & keys[:, None, None, :] & valid[:, None, :, None]) | (k_at == q_at)
    gathered = _gathered_context(dataclasses.replace(ctx, mask=None, cache=None), idx, None)
    return dataclasses.replace(gathered, mask=mask, cache=ctx.cache)


class _Routing:
    """One routed forward: selections, per-loop compute (gathered or dense), losses and stats."""

    def __init__(self, model, n: int, training: bool, kv_sharing: bool = False):
        self.model, self.router, self.n, self.sharing = model, model.router, n, kv_sharing
        self.kind = self.router.kind
        self.alpha, self.aux_coeff, self.z_coeff = router_settings(model.cfg)
        self.topk = training  # expert choice's top-k rule (training, uncached); else the inference rule
        self.caps = router_capacities(model.cfg, n) if self.kind == "expert_choice" else None
        self.aux, self.zl = [], []
        self.frac: list[torch.Tensor] = []

    # --- selection ------------------------------------------------------------------------------------------

    def token_choice(self, e: torch.Tensor) -> None:
        """The token-choice router on e: each token's depth and gate, the balancing and z losses."""
        z = self.router(e)  # [B, T, N] fp32
        probs = torch.softmax(z, dim=-1)
        choice = probs.argmax(dim=-1)  # [B, T], 0-based
        N = z.shape[-1]
        share = F.one_hot(choice, N).float().mean(dim=(0, 1))
        self.aux.append((N * share * (self.alpha * probs).mean(dim=(0, 1))).sum())
        self.zl.append(torch.logsumexp(z, dim=-1).square().mean())
        self.depth = (choice + 1).clamp(max=self.n)
        self.tc_gate = self.alpha * probs.gather(-1, (self.depth - 1)[..., None])[..., 0]

    def pick(self, t: int, h: torch.Tensor | None, e: torch.Tensor, cand: torch.Tensor) -> _Pick:
        """Loop t's selection among the candidates `cand` [B, T] (the tokens active at loop t - 1)."""
        if self.kind == "token_choice":
            return _Pick(self.depth > t, self.tc_gate, last=self.depth == t + 1)
        z = self.router(e if h is None else h, t)  # [B, T] fp32, the state entering loop t
        idx = None
        if self.caps[t] >= 1.0:
            chosen = cand
            if self.topk and bool(cand.all()):
                idx = torch.arange(cand.shape[1], device=cand.device)[None].expand(cand.shape[0], -1)
        elif self.topk:
            k = max(1, int(self.caps[t] * cand.shape[1]))
            idx = z.masked_fill(~cand, float("-inf")).topk(k, dim=1).indices.sort(dim=1).values
            chosen = torch.zeros_like(cand).scatter(1, idx, True)
        else:
            chosen = cand & (z >= 0)  # sigmoid(z) >= 0.5
        w = cand.float()
        bce = F.binary_cross_entropy_with_logits(z, chosen.float(), reduction="none")
        self.aux.append((bce * w).sum() / w.sum().clamp_min(1))
        self.zl.append((z.square() * w).sum() / w.sum().clamp_min(1))
        return _Pick(chosen, self.alpha * torch.sigmoid(z), idx=idx)

    # --- one loop -------------------------------------------------------------------------------------------

    def update(self, h, e, f, gate, last):
        """The new state of computed tokens: expert choice h + g F (g F where h is None); token choice F before
        the token's last loop, e + g F at it."""
        g = gate.to(f.dtype)[..., None]
        if self.kind == "expert_choice":
            return g * f if h is None else h + g * f
        return torch.where(last[..., None], e + g * f, f)

    def compute(self, t: int, ctx, h, e, active, gate, last, idx):
        """Loop t on the active tokens; returns the whole new state."""
        old = e if h is None else h
        layer = self.model._core_layer
        shared = self.sharing and t > 0  # KV sharing: loop 0's K/V in place of this loop's (nothing written)
        if self.router.dense:
            if shared:  # every query computed, the keys loop 0's (ctx.mask: causal, documents, padding)
                if ctx.cache is not None:
                    _record(ctx.cache, active, t)
                ctx_d = ctx
            else:
                ctx_d = _dense_context(ctx, active, t)
            f, _ = self.model.injection.loop(h, e, partial(layer, t, ctx_d))
            return torch.where(active[..., None], self.update(h, e, f, gate, last), old)
        valid = None
        if idx is None:
            idx, valid = _compact(active)
        take = partial(_take, idx=idx)
        h_a, e_a = (None if h is None else take(h)), take(e)
        cache = None if shared else ctx.cache  # the cache the layers write to (KV sharing: none after loop 0)
        if shared:
            if ctx.cache is not None:
                _record(ctx.cache, active, t)  # who ran loop t (its K/V slots stay unwritten)
            ctx_a = _shared_context(ctx, idx)
        elif cache is not None:  # inference: the layers write the K/V of the gathered tokens at their positions
            ctx_a = _cached_context(ctx, idx, valid, _record(cache, active, t))
            cache.scatter = (idx + cache.pos, cache.pos + active.shape[1])
        else:
            ctx_a = _gathered_context(ctx, idx, valid)
        try:
            f, _ = self.model.injection.loop(h_a, e_a, partial(layer, t, ctx_a))
        finally:
            if cache is not None:
                cache.scatter = None
        new = self.update(h_a, e_a, f, take(gate), None if last is None else take(last))
        if valid is not None:
            new = torch.where(valid[..., None], new, take(old))
        return old.scatter(1, idx[..., None].expand(-1, -1, old.shape[-1]), new)

    def run_loop(self, t: int, ctx, h, e, cand: torch.Tensor):
        """Select, then compute loop t (checkpointed with activation_checkpointing: loop)."""
        p = self.pick(t, h, e, cand)
        self.frac.append(p.active.float().mean())
        if not bool(p.active.any()):
            if ctx.cache is not None:
                _record(ctx.cache, p.active, t)  # nothing is active at t
            return (e if h is None else h), p.active
        args = (t, ctx, h, e, p.active, p.gate, p.last, p.idx)
        if self.model.activation_checkpointing == "loop" and torch.is_grad_enabled():
            return checkpoint(self.compute, *args, use_reentrant=False, preserve_rng_state=False), p.active
        return self.compute(*args), p.active

    # --- losses and stats -----------------------------------------------------------------------------------

    def stats(self, lm: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zero = torch.zeros((), device=device)
        aux = torch.stack(self.aux).sum() if self.aux else zero
        zl = torch.stack(self.zl).sum() if self.zl else zero
        stats = {"router/lm_loss": (lm if lm is not None else zero).detach(), "router/aux_loss": aux.detach(),
                 "router/z_loss": zl.detach(),
                 "router/mean_depth": torch.stack(self.frac).sum().detach() if self.frac else zero}
        for r in range(self.router.n):
            stats[f"router/selected_frac_r{r}"] = self.frac[r].detach() if r < len(self.frac) else zero
        return self.aux_coeff * aux + self.z_coeff * zl, stats


def routed_forward(model, tokens: torch.Tensor, labels: torch.Tensor | None = None, *, loops: int | None = None,
                   backprop_loops: int | None = None, diagnostics: bool = False, doc_ids: torch.Tensor | None = None,
                   exit_epsilon: float | None = None, loss_on: str | None = None, return_logits: bool = False,
                   cache=None, depths: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   exit_per_token: bool = False, kv_sharing: bool = False):
    """`LoopedLM.forward` with a router (see the module docstring): the same contract, loss on the last loop, the
    router losses added in training mode and reported in `stats`; `exit_loops` [B, T] = the loops each token ran
    (what generation reports per new token). kv_sharing: recursive KV sharing (loops >= 1 attend to loop 0's K/V)
    instead of recursion-wise K/V, cached or not."""
    from pretrain.models.diagnostics import Recorder
    from pretrain.models.looped import LoopedOutput

    if depths is not None or exit_epsilon is not None:
        raise ValueError("model.router decides each token's depth: no per-sequence depths or early exit with it")
    if (loss_on or model.loop_cfg.loss_on) != "last":
        raise ValueError("model.router takes its loss on the last loop: loss_on must be last")
    n = loops or model.cfg.loops
    k = model.loop_cfg.backprop_loops if backprop_loops is None else backprop_loops
    k = n if k <= 0 else min(k, n)
    if cache is not None and (cache.loops != n or doc_ids is not None):
        raise ValueError(f"a KV cache allocated for {cache.loops} loops serves exactly that loop count, without "
                         "document masks")
    if kv_sharing:
        check_kv_sharing(model.cfg, n)
    if cache is not None:  # one cache, one K/V semantics
        if cache.kv_sharing is None:
            cache.kv_sharing = kv_sharing
        elif cache.kv_sharing != kv_sharing:
            raise ValueError(f"this KV cache holds {'shared' if cache.kv_sharing else 'recursion-wise'} K/V "
                             f"(kv_sharing={cache.kv_sharing}): a forward with kv_sharing={kv_sharing} cannot use it")
    ctx = model._context(tokens, doc_ids, cache, n, attention_mask)
    if kv_sharing:
        ctx.core_kv = _SharedKV(cache, len(model.prelude), len(model.core))
        ctx.core_kv.length = tokens.shape[1]
    e = model.injection.prepare(model._prelude(tokens, ctx))
    h = model.injection.init_state(e, model._initial_noise(e, ctx))
    run = _Routing(model, n, training=model.training and cache is None, kv_sharing=kv_sharing)
    if run.kind == "token_choice":
        run.token_choice(e)
    recorder = Recorder(n) if diagnostics else None
    grad_on = torch.is_grad_enabled()
    cand = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    ran = torch.zeros(tokens.shape, dtype=torch.long, device=tokens.device)  # loops each token ran
    for t in range(n):
        with torch.set_grad_enabled(grad_on and t >= n - k):
            h_next, cand = run.run_loop(t, ctx, h, e, cand)
        ran += cand
        if recorder is not None:
            recorder.record(t, h, h_next, h_next)
        h = h_next
    lm = model._loss_head(h, labels, ctx, checkpointed=False) if labels is not None else None
    extra, stats = run.stats(lm, e.device)
    logits = model._logits(h, ctx) if labels is None or return_logits else None
    if cache is not None:
        cache.advance(tokens.shape[1])
    loss = None if lm is None else (lm + extra if model.training else lm)
    return LoopedOutput(loss=loss, logits=logits,
                        diagnostics=recorder.finish(model.injection.diagnostics()) if recorder else None, stats=stats,
                        exit_loops=ran)

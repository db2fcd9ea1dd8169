"""Generation with a key/value cache that stays exact across loop iterations.

Design. Attention is causal at every (loop, layer), so the keys and values that position i produces in loop t at
core layer l depend only on tokens <= i. A looped model with T loops is therefore, for caching, an ordinary
transformer of depth n_prelude + T * n_core + n_coda: the cache keeps one K/V buffer per *(loop, layer) slot*
(slot = n_prelude + t * n_core + l for the core, prelude and coda slots before and after), and a decode step runs
the new token through every loop, appending its K/V to each slot and attending to that slot's past. The FLT family
fits the same scheme: its queries come from the new token's own previous-loop state (computed earlier in the same
step) and its keys/values from the current stream, which is what each slot caches. The cost is memory linear in
the loop count (T * n_core slots). The alternatives are not offered: caching only the last loop means recomputing
the earlier loops over the whole prefix every step (exact, but the cost of an uncached forward), and sharing one
loop's cache across loops (Huginn-style) is approximate unless the recurrence has converged (Mixture-of-Recursions
models offer it as a model semantics of its own, recursive KV sharing: `kv_sharing`, routing.py, exact with the
cache because the uncached forward shares the same way). A cache is tied to
the loop count it was allocated for. Per-token early exit is exact with it: a stopped token offers later loops its
exit loop's keys/values (`ExitKV`, the same with and without the cache), so a step whose tokens have all stopped
skips the remaining loops and copies those slots; per-sequence early exit is not combined with caching.

    cache = KVCache.allocate(model, batch=B, max_len=T0 + n, loops=8)
    out = model(prompt, loops=8, cache=cache)            # prefill: logits for every prompt position
    out = model(next_tok[:, None], loops=8, cache=cache)  # one position at a time afterwards

`generate_batch` wraps this for prompts of different lengths (left padding and an attention mask, sampling with
temperature / top-k / top-p, end-of-sequence, per-token early exit); with use_cache=False it reruns the whole
sequence each step (the reference the cache is tested against). `generate` is its equal-length tensor form.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LayerKV:
    """The cache slot of one (loop, layer): appends keys/values at the cache position, returns the whole past."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, start = self.cache, self.cache.pos
        if c.scatter is not None:  # routing: k, v are gathered tokens [B, H, m, hd] at positions [B, m] of the chunk
            at, end = c.scatter
            idx = at[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            c.k[self.slot][:, :, :end].scatter_(2, idx, k)
            c.v[self.slot][:, :, :end].scatter_(2, idx, v)
            return c.k[self.slot][:, :, :end], c.v[self.slot][:, :, :end]
        end = start + k.shape[2]
        if end > c.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {c.max_len}")
        c.k[self.slot][:, :, start:end] = k
        c.v[self.slot][:, :, start:end] = v
        return c.k[self.slot][:, :, :end], c.v[self.slot][:, :, :end]


class KVCache:
    """Preallocated K/V buffers, one per (loop, layer) slot; `pos` = tokens already cached. Under recursive KV
    sharing (Mixture-of-Recursions, routing.py) the core slots of loops >= 1 are None: never allocated, never
    written."""

    def __init__(self, k: list[torch.Tensor | None], v: list[torch.Tensor | None], loops: int, max_len: int,
                 kv_sharing: bool | None = None):
        self.k, self.v, self.loops, self.max_len, self.pos = k, v, loops, max_len, 0
        # Mixture-of-Recursions: whether the cache holds shared K/V (loop 0's, reused by later loops) or
        # recursion-wise K/V; None until the first routed forward fixes it (a cache serves one of the two)
        self.kv_sharing = kv_sharing
        # Mixture-of-Recursions (routing.py): loop t -> [batch, max_len] bool, the positions active at loop t (their
        # K/V in loop t's slots are attended; the others are masked out)
        self.active: dict[int, torch.Tensor] = {}
        # set while a routed loop runs on gathered tokens: (their absolute positions [batch, m], end of the chunk)
        self.scatter: tuple[torch.Tensor, int] | None = None

    @classmethod
    def allocate(cls, model, batch: int, max_len: int, loops: int | None = None,
                 kv_sharing: bool = False) -> KVCache:
        """Zeroed slots for `loops` loops (default model.loops). kv_sharing (routed models): only loop 0's core
        slots are allocated, so the core's cache memory is 1/loops of the recursion-wise cache's."""
        loops = loops or model.cfg.loops
        attn = model.core[0].attn
        n_pre, n_core = len(model.prelude), len(model.core)
        n_slots = n_pre + loops * n_core + len(model.coda)
        ref = model.embed.weight
        shape = (batch, attn.n_local_kv, max_len, attn.head_dim)

        def buffer(slot: int) -> torch.Tensor | None:
            if kv_sharing and n_pre + n_core <= slot < n_pre + loops * n_core:
                return None
            return torch.zeros(shape, dtype=ref.dtype, device=ref.device)

        k = [buffer(s) for s in range(n_slots)]
        v = [buffer(s) for s in range(n_slots)]
        return cls(k, v, loops, max_len, kv_sharing=True if kv_sharing else None)

    def layer(self, slot: int) -> LayerKV:
        return LayerKV(self, slot)

    def advance(self, n: int) -> None:
        self.pos += n


class ExitKV:
    """Keys/values under per-token early exit: a token that stopped looping offers every later loop the keys and
    values of its exit loop (at each core layer), instead of running on. Later tokens attend to exactly that, with or
    without a KV cache, so the rule stays exact with the cache; and a decode step whose tokens have all stopped
    skips its remaining loops, filling their cache slots by copying the exit loop's (`fill_skipped`): the compute
    after an exit is really saved.

    `frozen` ([B, T] bool, set by the exit driver before each loop) marks the chunk's tokens that stopped at an
    earlier loop. Without a cache the previous loop's keys/values of each core layer are kept here; with one they
    are read back from the previous loop's cache slot."""

    def __init__(self, cache: KVCache | None, n_prelude: int, n_core: int):
        self.cache, self.n_prelude, self.n_core = cache, n_prelude, n_core
        self.frozen: torch.Tensor | None = None
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, t: int, i: int) -> _ExitLayerKV:
        return _ExitLayerKV(self, t, i)

    def slot(self, t: int, i: int) -> int:
        return self.n_prelude + t * self.n_core + i

    def fill_skipped(self, first: int, loops: int, length: int) -> None:
        """Cache slots of loops first..loops-1 (0-based) for the chunk: copies of the loop before (every token of
        the chunk has stopped)."""
        c = self.cache
        start, end = c.pos, c.pos + length
        for t in range(first, loops):
            for i in range(self.n_core):
                to, at = self.slot(t, i), self.slot(t - 1, i)
                c.k[to][:, :, start:end] = c.k[at][:, :, start:end]
                c.v[to][:, :, start:end] = c.v[at][:, :, start:end]


class _ExitLayerKV:
    """The `kv_cache` of core layer i in loop t under `ExitKV` (the interface of `LayerKV`)."""

    def __init__(self, owner: ExitKV, t: int, i: int):
        self.owner, self.t, self.i = owner, t, i

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.owner
        if o.frozen is not None and self.t > 0 and bool(o.frozen.any()):
            if o.cache is not None:
                at, start = o.slot(self.t - 1, self.i), o.cache.pos
                prev = (o.cache.k[at][:, :, start:start + k.shape[2]], o.cache.v[at][:, :, start:start + k.shape[2]])
            else:
                prev = o._last[self.i]
            keep = o.frozen[:, None, :, None]
            k, v = torch.where(keep, prev[0], k), torch.where(keep, prev[1], v)
        if o.cache is None:
            o._last[self.i] = (k, v)
            return k, v
        return o.cache.layer(o.slot(self.t, self.i)).update(k, v)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this rank's vocabulary shard (all-gather over the TP group)."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                gen: torch.Generator) -> torch.Tensor:
    """The next token of each row from fp32 logits [B, V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all) and then to the smallest set
    whose probability reaches top_p (1 = all; the most likely token always stays)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(order.values, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order.indices, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]


def check_positions(model, longest: int, max_new_tokens: int) -> None:
    """A ValueError when the longest prompt plus the new tokens need more positions than a learned position
    embedding has (model.max_positions; rotary models have no bound). The last new token is never fed back."""
    limit = model.cfg.max_positions if model.cfg.position == "learned" else 0
    if limit and longest + max_new_tokens - 1 > limit:
        raise ValueError(f"the longest prompt ({longest} tokens) + {max_new_tokens} new tokens need "
                         f"{longest + max_new_tokens - 1} positions, more than the learned position embedding's "
                         f"model.max_positions = {limit}")


@dataclass
class Generation:
    """What `generate_batch` produced, per prompt: the new tokens (up to and without the end-of-sequence token),
    the loops each new token used (the loop count, or where it exited under exit_epsilon / exit_threshold), whether
    it ended with end-of-sequence, and the wall time of the prompt pass and of the decoding."""

    tokens: list[list[int]]
    loops_used: list[list[int]]
    finished: list[bool]
    prefill_s: float = 0.0
    decode_s: float = 0.0


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, *, loops: int | None = None,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   eos_id: int | None = None, pad_id: int = 0, use_cache: bool = True,
                   exit_epsilon: float | None = None, exit_threshold: float | None = None,
                   stop: Callable[[int, list[int]], bool] | None = None, kv_sharing: bool = False) -> Generation:
    """Continue prompts of any lengths in one batch: left-padded with `pad_id` and masked (the model's `attention_mask`:
    positions, rotary or learned, count real tokens, padding is never attended), so each row generates what it would
    alone (learned positions: at most model.max_positions positions, a ValueError first). Greedy at temperature 0, else
    sampled (`sample_next`) from a generator seeded with `seed` (every TP rank draws the same). A row stops at `eos_id`,
    or once `stop(row, its new tokens)` is true (e.g. a stop string decoded; the tokens are kept); the batch stops when
    every row has. `exit_epsilon`: per-token early exit by convergence (`LoopedLM.forward(exit_per_token=True)`);
    `exit_threshold`: per-token exit by the learned exit gate (models with model.exit_gate; see exit_gate.py). Both are
    exact with the cache (`ExitKV`), and a decode step whose tokens have all stopped skips its remaining loops.
    `kv_sharing` (models with model.router): recursive KV sharing, later loops attend to loop 0's keys/values
    (routing.py); the cache then holds loop 0's core slots only, and cached equals uncached as without it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    loops = loops or model.cfg.loops
    device = model.embed.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    check_positions(model, longest, max_new_tokens)
    padded = any(len(p) != longest for p in prompts)
    tokens = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((B, longest), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        real[b, longest - len(p):] = 1
    was_training = model.training
    model.eval()  # eval mode: a random initial state is a fixed function of position, so the cache stays exact
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        cache = KVCache.allocate(model, B, longest + max_new_tokens, loops, kv_sharing) if use_cache else None
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        used: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        seq, chunk, mask = tokens, tokens, real
        times, t0 = [], time.perf_counter()
        for _ in range(max_new_tokens):
            out = model(chunk if use_cache else seq, loops=loops, cache=cache,
                        attention_mask=mask if padded else None, exit_epsilon=exit_epsilon,
                        exit_per_token=exit_epsilon is not None, exit_threshold=exit_threshold,
                        kv_sharing=kv_sharing)
            logits = gather_vocab(out.logits[:, -1])[:, :model.vocab_size].float()
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            depth = out.exit_loops[:, -1].tolist() if out.exit_loops is not None else [loops] * B
            times.append(time.perf_counter())
            for b, tok in enumerate(nxt.tolist()):
                if finished[b]:
                    continue
                if eos_id is not None and tok == eos_id:
                    finished[b] = True
                    continue
                out_tokens[b].append(tok)
                used[b].append(int(depth[b]))
                if stop is not None and stop(b, out_tokens[b]):
                    finished[b] = True
            if all(finished):
                break
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            chunk = nxt[:, None]
        prefill = times[0] - t0 if times else 0.0
        return Generation(out_tokens, used, finished, prefill, (times[-1] - times[0]) if times else 0.0)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int, *, loops: int | None = None, use_cache: bool = True,
             temperature: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Append `max_new_tokens` tokens to `tokens` [B, T0] (equal-length prompts, no end-of-sequence stop): greedy at
    temperature 0, else sampled with a generator seeded with `seed`. Returns [B, T0 + max_new_tokens]."""
    result = generate_batch(model, tokens.tolist(), max_new_tokens, loops=loops, temperature=temperature, seed=seed,
                            use_cache=use_cache)
    new = torch.tensor(result.tokens, dtype=tokens.dtype, device=tokens.device).view(tokens.shape[0], -1)
    return torch.cat((tokens, new), dim=1)

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
loop's cache across loops (Huginn-style) is approximate unless the recurrence has converged. A cache is tied to
the loop count it was allocated for; early exit (a per-sequence loop count) is not combined with caching.

    cache = KVCache.allocate(model, batch=B, max_len=T0 + n, loops=8)
    out = model(prompt, loops=8, cache=cache)            # prefill: logits for every prompt position
    out = model(next_tok[:, None], loops=8, cache=cache)  # one position at a time afterwards

`generate` wraps this (or, with use_cache=False, reruns the whole sequence each step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LayerKV:
    """The cache slot of one (loop, layer): appends keys/values at the cache position, returns the whole past."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, start = self.cache, self.cache.pos
        end = start + k.shape[2]
        if end > c.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {c.max_len}")
        c.k[self.slot][:, :, start:end] = k
        c.v[self.slot][:, :, start:end] = v
        return c.k[self.slot][:, :, :end], c.v[self.slot][:, :, :end]


class KVCache:
    """Preallocated K/V buffers, one per (loop, layer) slot; `pos` = tokens already cached."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], loops: int, max_len: int):
        self.k, self.v, self.loops, self.max_len, self.pos = k, v, loops, max_len, 0

    @classmethod
    def allocate(cls, model, batch: int, max_len: int, loops: int | None = None) -> KVCache:
        loops = loops or model.cfg.loops
        attn = model.core[0].attn
        n_slots = len(model.prelude) + loops * len(model.core) + len(model.coda)
        ref = model.embed.weight
        shape = (batch, attn.n_local_kv, max_len, attn.head_dim)
        k = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(n_slots)]
        v = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(n_slots)]
        return cls(k, v, loops, max_len)

    def layer(self, slot: int) -> LayerKV:
        return LayerKV(self, slot)

    def advance(self, n: int) -> None:
        self.pos += n


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this rank's vocabulary shard (all-gather over the TP group)."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int, *, loops: int | None = None, use_cache: bool = True,
             temperature: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Append `max_new_tokens` tokens to `tokens` [B, T0]: greedy at temperature 0, else sampled from a generator
    seeded with `seed` (every TP rank draws the same token). Returns [B, T0 + max_new_tokens]."""
    loops = loops or model.cfg.loops
    was_training = model.training
    model.eval()  # eval mode: a random initial state is a fixed function of position, so the cache stays exact
    try:
        gen = torch.Generator(device=tokens.device).manual_seed(seed)
        B, T0 = tokens.shape
        cache = KVCache.allocate(model, B, T0 + max_new_tokens, loops) if use_cache else None
        out, chunk = tokens, tokens
        for _ in range(max_new_tokens):
            logits = model(chunk if use_cache else out, loops=loops, cache=cache).logits[:, -1]
            logits = gather_vocab(logits)[:, :model.vocab_size].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)[:, 0]
            out = torch.cat((out, nxt[:, None]), dim=1)
            chunk = nxt[:, None]
        return out
    finally:
        model.train(was_training)

"""A loopstack looped transformer for Hugging Face transformers (`trust_remote_code`): the inference forward of
loopstack's `LoopedLM` (pretrain/models/looped.py, recurrence.py, layers.py, lora.py) re-implemented in plain
torch, so an exported checkpoint runs wherever transformers does. `loopstack export hf` copies this file and
configuration_loopstack.py next to the weights; they import only torch and transformers.

    e = Prelude(E(x) + P(pos))               # x sqrt(d_model) first when embed_scale (Huginn); P: learned positions
                                             # (position learned, GPT-2), else rotary in attention; Parcae: e <- norm(e)
    h = h_0(e)                               # zeros | e | noise; None when every loop restarts from e (FLT family)
    for t in 0..loops-1:                     # the same core layers every loop
        u = entry_norm(enter(h, e))          # none: h | add: h + e | concat: W[h; e] | parcae: a h + delta B e
                                             # restart: e (h enters inside the layers)
        for each core layer i:               # state_inject: queries from h (first / every layer), or u <- norm(u + h)
            u = layer_i(u, query, recall=e)  # internal recall adds e inside the layer; loop t's LoRA deltas
        h = outer_norm(u)
    logits = softcap(Head(Norm(Coda(h))))    # ids >= tokenizer_vocab_size (padding) at -inf

Parameter names are loopstack's (`core.0.attn.wq.weight`, `injection.parcae.A_log`, `loop_lora.0.wq.A`, ...), so
the weights file is loopstack's TP=1 state dict as it is. What must match loopstack bit for bit is written the way
loopstack computes it: RMSNorm through `F.rms_norm` (LayerNorm, norm_kind layer, through `F.layer_norm`); rotary
tables in float64 then cast, rotating the pairs (x_i, x_{i + hd/2}) as (x1 cos + x2 sin, x2 cos - x1 sin); the
random h_0 of Huginn / Parcae as a fixed function of the position: row p drawn from a generator seeded with
(noise_seed + 7919 p) mod 2^63, truncated normal with std state_init_std cut at 3 std (loopstack's eval-mode
`_initial_noise`).

KV cache (transformers' `Cache`, `forward(cache=)`): attention is causal at every (loop, layer), so a looped
model caches like a transformer of depth n_prelude + loops * n_core + n_coda, one slot per (loop, layer):
slot = n_prelude + t * n_core + i for core layer i in loop t (`config.num_hidden_layers` counts them). A cache is
tied to the loop count it was filled with. Padding: a 2-D `attention_mask` (1 = token, 0 = padding, left padding
as `generate` makes it) gives each token its position among the real tokens (cumsum - 1) and hides padded keys,
so a padded batch gives each sequence what it gives alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_loopstack import LoopstackConfig

ROW_PARALLEL = ("wo", "w_down")


# --- building blocks ---------------------------------------------------------------------------------------------

class LoopstackRMSNorm(nn.Module):
    """RMSNorm over the last dim, with or without a learnable scale."""

    def __init__(self, dim: int, affine: bool, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


class LoopstackLayerNorm(nn.Module):
    """LayerNorm over the last dim, with a learnable weight and bias when affine (norm_kind layer: GPT-2)."""

    def __init__(self, dim: int, affine: bool, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


def make_norm(config: LoopstackConfig, dim: int, affine: bool) -> nn.Module:
    """Every norm but the QK-norm: RMSNorm or LayerNorm (config.norm_kind), with config.norm_eps."""
    cls = LoopstackLayerNorm if config.norm_kind == "layer" else LoopstackRMSNorm
    return cls(dim, affine, config.norm_eps)


class LoopstackHeadRMSNorm(nn.Module):
    """QK-norm: RMSNorm over head_dim, one scale vector per head (weight [heads, head_dim])."""

    def __init__(self, n_heads: int, head_dim: int, affine: bool, eps: float):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, T, hd]
        x = F.rms_norm(x, (self.head_dim,), None, self.eps)
        return x if self.weight is None else x * self.weight[:, None, :]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, 1, T, head_dim / 2] for positions [B, T], computed in float64 and cast."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.double()[..., None] * inv_freq
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i + hd/2}) of x [B, H, T, hd] by position-dependent angles (loopstack's sign)."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class LoopLoRA(nn.Module):
    """Per-loop LoRA of one projection: loop t adds scale * B_t A_t x, t -> min(t, bank - 1).
    A [bank, r, in], B [bank, out, r]."""

    def __init__(self, d_in: int, d_out: int, rank: int, bank: int, scale: float):
        super().__init__()
        self.bank, self.scale = bank, scale
        self.A = nn.Parameter(torch.zeros(bank, rank, d_in))
        self.B = nn.Parameter(torch.zeros(bank, d_out, rank))

    def forward(self, x: torch.Tensor, loop: int) -> torch.Tensor:
        t = min(loop, self.bank - 1)
        return F.linear(F.linear(x, self.A[t]) * self.scale, self.B[t])


def adapt(lora: dict | None, name: str, y: torch.Tensor, x: torch.Tensor, loop: int) -> torch.Tensor:
    """y plus the LoRA delta of projection `name` on its input x, when this layer adapts that projection."""
    return y + lora[name](x, loop) if lora is not None and name in lora else y


class LoopstackAttention(nn.Module):
    """Causal multi-head / grouped-query attention; queries may come from another tensor than keys and values."""

    def __init__(self, config: LoopstackConfig):
        super().__init__()
        d, self.n_heads, self.n_kv = config.d_model, config.n_heads, config.n_kv_heads
        self.head_dim = d // config.n_heads
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(d, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(d, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=config.proj_bias)
        affine, eps = config.norm_affine, config.norm_eps
        self.q_norm = LoopstackHeadRMSNorm(self.n_heads, self.head_dim, affine, eps) if config.qk_norm else None
        self.k_norm = LoopstackHeadRMSNorm(self.n_kv, self.head_dim, affine, eps) if config.qk_norm else None

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, ctx: _Context, slot: int, lora: dict | None,
                loop: int) -> torch.Tensor:
        B, T, _ = x_q.shape
        q = adapt(lora, "wq", self.wq(x_q), x_q, loop).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = adapt(lora, "wk", self.wk(x_kv), x_kv, loop).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = adapt(lora, "wv", self.wv(x_kv), x_kv, loop).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:  # None with learned positions
            q, k = apply_rotary(q, ctx.rope), apply_rotary(k, ctx.rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, slot)
        # no mask: T queries on T keys are causal, one query (decoding) sees every cached key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return adapt(lora, "wo", self.wo(y), y, loop)


class LoopstackMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x); ReLU^2: down(relu(up x)^2); GELU: down(gelu_tanh(up x)) (GPT-2's
    gelu_new). Biases with proj_bias."""

    def __init__(self, config: LoopstackConfig):
        super().__init__()
        d, hidden, bias = config.d_model, config.mlp_hidden, config.proj_bias
        self.kind = config.mlp
        self.w_up = nn.Linear(d, hidden, bias=bias)
        self.w_gate = nn.Linear(d, hidden, bias=bias) if config.mlp == "swiglu" else None
        self.w_down = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor, lora: dict | None, loop: int) -> torch.Tensor:
        up = adapt(lora, "w_up", self.w_up(x), x, loop)
        if self.kind == "swiglu":
            h = F.silu(adapt(lora, "w_gate", self.w_gate(x), x, loop)) * up
        elif self.kind == "gelu":
            h = F.gelu(up, approximate="tanh")
        else:
            h = F.relu(up).square()
        return adapt(lora, "w_down", self.w_down(h), h, loop)


class LoopstackLayer(nn.Module):
    """One transformer layer. pre-norm: x += attn(n1 x); x += mlp(n3 x). sandwich (Huginn): the sum after each
    sublayer is normalised too. `query`: queries read n1(query) (FLT); `recall`: e added before the layer, before
    the MLP, or both (internal recall); `lora`: this core layer's per-loop adapters."""

    def __init__(self, config: LoopstackConfig, recall_at: str = "none"):
        super().__init__()
        d, affine = config.d_model, config.norm_affine
        self.recall_at = recall_at
        self.attn_norm = make_norm(config, d, affine)
        self.attn = LoopstackAttention(config)
        self.mlp_norm = make_norm(config, d, affine)
        self.mlp = LoopstackMLP(config)
        sandwich = config.norm == "sandwich"
        self.attn_out_norm = make_norm(config, d, affine) if sandwich else None
        self.mlp_out_norm = make_norm(config, d, affine) if sandwich else None

    def forward(self, x: torch.Tensor, ctx: _Context, slot: int, *, query: torch.Tensor | None = None,
                recall: torch.Tensor | None = None, lora: dict | None = None, loop: int = 0) -> torch.Tensor:
        if recall is not None and self.recall_at in ("layer", "sublayer"):
            x = x + recall
        kv_in = self.attn_norm(x)
        q_in = kv_in if query is None else self.attn_norm(query)
        x = x + self.attn(q_in, kv_in, ctx, slot, lora, loop)
        if self.attn_out_norm is not None:
            x = self.attn_out_norm(x)
        if recall is not None and self.recall_at in ("mlp", "sublayer"):
            x = x + recall
        x = x + self.mlp(self.mlp_norm(x), lora, loop)
        if self.mlp_out_norm is not None:
            x = self.mlp_out_norm(x)
        return x


# --- the recurrence's parameters (registered as `injection`, loopstack's names) -------------------------------------

class LoopstackAdapter(nn.Module):
    """Huginn's adapter: u = W [h; e], bias-free, 2d -> d."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, 2 * d))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat((h, e), dim=-1), self.weight)


class LoopstackParcaeMap(nn.Module):
    """Parcae: u = exp(delta A) h + delta B e, A = -exp(A_log), delta = softplus(dt_bias)."""

    def __init__(self, d: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Parameter(torch.zeros(d, d))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        delta = F.softplus(self.dt_bias)
        return torch.exp(-delta * torch.exp(self.A_log)) * h + delta * F.linear(e, self.B)


class LoopstackRecurrence(nn.Module):
    """The parameters of how h and e meet: entry norm, per-layer stream norms (state_inject stream_all), Huginn's
    adapter, Parcae's input norm and map. The loop itself is `LoopstackForCausalLM._loop`."""

    def __init__(self, config: LoopstackConfig):
        super().__init__()
        d, affine = config.d_model, config.norm_affine
        self.entry_norm = make_norm(config, d, affine) if config.entry_norm else None
        if not config.restart and config.injection == "concat":
            self.adapter = LoopstackAdapter(d)
        if not config.restart and config.injection == "parcae":
            self.e_norm = make_norm(config, d, True)
            self.parcae = LoopstackParcaeMap(d)
        if config.state_inject == "stream_all":
            self.stream_norms = nn.ModuleList(make_norm(config, d, affine) for _ in range(config.n_core))


class _Context:
    """What every layer of one forward shares: rotary tables (None: learned positions), attention mask (None:
    causal), cache."""

    def __init__(self, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None, cache: Cache | None):
        self.rope, self.mask, self.cache = rope, mask, cache


# --- the model -----------------------------------------------------------------------------------------------------

class LoopstackPreTrainedModel(PreTrainedModel):
    config_class = LoopstackConfig
    config: LoopstackConfig
    base_model_prefix = "loopstack"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LoopstackLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Loopstack's initialisation, for a model built from a config alone (transformers' `init` functions leave
        loaded weights alone): matrices N(0, init_std), norm scales 1, LoRA A ~ U(+-1/sqrt(in)) and B = 0,
        Parcae's A_log = 0, exp(delta A) = sqrt(1/5), B = identity."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding, LoopstackAdapter)):
            init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (LoopstackRMSNorm, LoopstackHeadRMSNorm, LoopstackLayerNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LoopLoRA):
            bound = 1.0 / math.sqrt(module.A.shape[-1])
            init.uniform_(module.A, -bound, bound)
            init.zeros_(module.B)
        elif isinstance(module, LoopstackParcaeMap):
            init.zeros_(module.A_log)
            init.constant_(module.dt_bias, math.log(math.expm1(0.5 * math.log(5.0))))
            init.eye_(module.B)


class LoopstackForCausalLM(LoopstackPreTrainedModel, GenerationMixin):
    """The looped LM; `forward` and `generate` as any transformers causal LM (see the module docstring)."""

    def __init__(self, config: LoopstackConfig):
        super().__init__(config)
        d = config.d_model
        recall_at = config.internal_recall
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos_embed = nn.Embedding(config.max_positions, d) if config.position == "learned" else None
        self.prelude = nn.ModuleList(LoopstackLayer(config) for _ in range(config.n_prelude))
        self.core = nn.ModuleList(LoopstackLayer(config, recall_at) for _ in range(config.n_core))
        self.coda = nn.ModuleList(LoopstackLayer(config) for _ in range(config.n_coda))
        self.injection = LoopstackRecurrence(config)
        self.outer_norm = make_norm(config, d, config.norm_affine) if config.outer_norm else None
        self.norm = make_norm(config, d, config.norm_affine)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.loop_lora = self._build_lora(config) if config.loop_lora_rank else None
        # loopstack's learned exit gate, kept so the weights round-trip; never read (every loop runs)
        self.exit_gate = nn.Linear(d, 1) if config.exit_gate else None
        self._noise_rows = torch.empty(0, d, device="cpu")  # the random h_0, one row per position (grown on demand)
        self.post_init()

    @staticmethod
    def _build_lora(config: LoopstackConfig) -> nn.ModuleList:
        d, hd = config.d_model, config.d_model // config.n_heads
        d_q, d_kv, hidden = config.n_heads * hd, config.n_kv_heads * hd, config.mlp_hidden
        dims = dict(wq=(d, d_q), wk=(d, d_kv), wv=(d, d_kv), wo=(d_q, d), w_gate=(d, hidden), w_up=(d, hidden),
                    w_down=(hidden, d))
        return nn.ModuleList(
            nn.ModuleDict({name: LoopLoRA(*dims[name], config.loop_lora_rank, config.loop_lora_bank,
                                          config.loop_lora_scale) for name in config.loop_lora_targets})
            for _ in range(config.n_core))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    # --- forward ---------------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, loops: int | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab_size] of `input_ids` [B, T] (the tokens after those in `cache`). `loops`: this
        call's loop count (default config.loops; a cache serves the loop count it was filled with). `labels`:
        the mean next-token cross-entropy (transformers' convention: labels are the inputs, shifted here;
        -100 ignored)."""
        n = int(loops or self.config.loops)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config) if n == self.config.loops else DynamicCache()
        slots = self.config.n_prelude + n * self.config.n_core + self.config.n_coda
        if cache is not None and len(getattr(cache, "layers", ())) not in (0, slots):
            raise ValueError(f"this cache has {len(cache.layers)} slots, {n} loops need {slots}: a cache serves "
                             "one loop count (set model.config.loops before generating at another depth)")
        past = cache.get_seq_length() if cache is not None else 0
        ctx, positions = self._context(input_ids, attention_mask, position_ids, cache, past)

        e = self.embed(input_ids)
        if self.config.embed_scale:
            e = e * math.sqrt(self.config.d_model)
        if self.pos_embed is not None:  # learned absolute positions (GPT-2): the positions of the real tokens
            e = e + self.pos_embed(positions)
        for i, layer in enumerate(self.prelude):
            e = layer(e, ctx, i)
        if self.config.injection == "parcae" and not self.config.restart:
            e = self.injection.e_norm(e)
        h = self._initial_state(e, positions)
        for t in range(n):
            h = self._loop(t, h, e, ctx)
        first = self.config.n_prelude + n * self.config.n_core
        for j, layer in enumerate(self.coda):
            h = layer(h, ctx, first + j)
        logits = self._head(self.norm(h))

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return out if return_dict is None or return_dict else out.to_tuple()

    def _loop(self, t: int, h: torch.Tensor | None, e: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """One pass through the core block: the next loop state."""
        cfg, rec = self.config, self.injection
        x = e if h is None else self._enter(h, e)
        if rec.entry_norm is not None:
            x = rec.entry_norm(x)
        recall = e if cfg.internal_recall != "none" else None
        for i, layer in enumerate(self.core):
            query = None
            if h is not None and cfg.state_inject == "stream_all":
                x = rec.stream_norms[i](x + h)
            elif h is not None and (cfg.state_inject == "query_all" or (cfg.state_inject == "query_first" and i == 0)):
                query = h
            lora = self.loop_lora[i] if self.loop_lora is not None else None
            x = layer(x, ctx, cfg.n_prelude + t * cfg.n_core + i, query=query, recall=recall, lora=lora, loop=t)
        return self.outer_norm(x) if self.outer_norm is not None else x

    def _enter(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """How the previous state and the input meet at a loop's entry (the recurrence family)."""
        if self.config.restart:
            return e
        kind = self.config.injection
        if kind == "add":
            return h + e
        if kind == "concat":
            return self.injection.adapter(h, e)
        if kind == "parcae":
            return self.injection.parcae(h, e)
        return h

    def _initial_state(self, e: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """h_0: None (restart: the first loop has no previous state), zeros, e or noise; outer-normalised."""
        cfg = self.config
        if cfg.restart:
            return None
        if cfg.state_init == "zeros":
            h = torch.zeros_like(e)
        elif cfg.state_init == "embed":
            h = e
        else:
            h = self._noise(positions).to(device=e.device, dtype=e.dtype)
        return self.outer_norm(h) if self.outer_norm is not None else h

    def _noise(self, positions: torch.Tensor) -> torch.Tensor:
        """The random h_0 at these positions [B, T] -> [B, T, d]: row p from its own generator seeded with
        (noise_seed + 7919 p) mod 2^63, truncated normal (std state_init_std, cut at 3 std), so a token's h_0 depends
        only on its position and a cached forward reproduces the uncached one."""
        std, d = self.config.state_init_std, self.config.d_model
        need = int(positions.max()) + 1
        if self._noise_rows.shape[0] < need:
            rows = [self._noise_rows]
            for p in range(self._noise_rows.shape[0], need):
                gen = torch.Generator().manual_seed((self.config.noise_seed + 7919 * p) % 2**63)
                row = torch.empty(1, d, dtype=torch.float32, device="cpu")
                rows.append(nn.init.trunc_normal_(row, std=std, a=-3 * std, b=3 * std, generator=gen))
            self._noise_rows = torch.cat(rows)
        return self._noise_rows[positions.cpu()]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits: the head (the embedding matrix when tied), soft-capped, padding ids at -inf."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.matmul(h, weight.t())
        c = self.config.logit_softcap
        if c > 0:
            logits = c * torch.tanh(logits / c)
        if self.config.tokenizer_vocab_size < logits.shape[-1]:
            pad = torch.arange(logits.shape[-1], device=logits.device) >= self.config.tokenizer_vocab_size
            logits = logits.masked_fill(pad, float("-inf"))
        return logits

    def _context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None, cache: Cache | None, past: int) -> tuple[_Context, torch.Tensor]:
        """Positions [B, T] and the attention mask of this call. Without padding: positions past..past+T-1 and
        loopstack's masks (None = causal; a chunk after cached tokens: causal with an offset). With padding (a 2-D
        mask with zeros): positions count real tokens only, padded keys are hidden (a padded query sees itself,
        so no row is empty)."""
        B, T = input_ids.shape
        device, S = input_ids.device, past + T
        padded = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2-D [batch, past + new tokens] (1 = token, 0 = padding)")
        if padded and attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, cache + input are {S}")
        if position_ids is None:
            if padded:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, S, device=device)[None].expand(B, T)
        mask = None
        if padded:
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)
            own = torch.zeros(T, S, dtype=torch.bool, device=device)
            own[torch.arange(T, device=device), past + torch.arange(T, device=device)] = True
            mask = ((causal[None] & attention_mask.bool()[:, None, :]) | own[None])[:, None]
        elif past > 0 and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]
        rope = None
        if self.config.position == "learned":
            if S > self.config.max_positions:
                raise ValueError(f"{S} positions (cached {past} + new {T}) exceed max_positions = "
                                 f"{self.config.max_positions} of the learned position embedding")
        else:
            rope = rotary_tables(position_ids, self.config.d_model // self.config.n_heads, self.config.rope_theta,
                                 self.embed.weight.dtype)
        return _Context(rope, mask, cache), position_ids


# save_pretrained then writes the auto_map and copies both files (AutoModelForCausalLM, trust_remote_code)
LoopstackForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LoopstackForCausalLM", "LoopstackPreTrainedModel"]

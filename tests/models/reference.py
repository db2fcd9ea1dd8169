"""An independent plain-torch reference of the looped variants, written from the equations of docs/models.md
("Recurrences"), not from the model code: manual RMSNorm / LayerNorm, rotary or learned positions, softmax attention,
MLPs (SwiGLU, ReLU^2, GELU with its tanh formula), biases where the weights hold them.
It reads a dict of plain tensors taken from a TP=1 model's parameters (by name) so the outputs must agree.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6


def rms(x, w=None):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return y if w is None else y * w


def layer_norm(x, w=None, b=None, eps=EPS):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps)
    y = y if w is None else y * w
    return y if b is None else y + b


def gelu_tanh(x):  # GPT-2's gelu_new
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def rotate(x, theta):  # x [B, H, T, hd], positions 0..T-1
    hd, T = x.shape[-1], x.shape[-2]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos + b * sin, b * cos - a * sin], -1)


class Reference:
    def __init__(self, W: dict[str, torch.Tensor], cfg, vocab: int):
        self.W, self.cfg, self.vocab = W, cfg, vocab
        self.hd = cfg.d_model // cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.t = 0  # current loop index (per-loop LoRA)

    def w(self, name):
        return self.W.get(name)

    def norm(self, x, name):
        """The model's norm `name` (e.g. core.0.attn_norm; weightless when the weights have none): RMSNorm, or
        LayerNorm with weight and bias under norm_kind layer."""
        if getattr(self.cfg, "norm_kind", "rms") == "layer":
            return layer_norm(x, self.w(name + ".weight"), self.w(name + ".bias"), self.cfg.norm_eps)
        return rms(x, self.w(name + ".weight"))

    def attn(self, p, xq, xkv):
        B, T, _ = xq.shape
        hd, H, Hkv = self.hd, self.cfg.n_heads, self.n_kv
        q = self.proj(p, "wq", xq).view(B, T, H, hd).transpose(1, 2)
        k = self.proj(p, "wk", xkv).view(B, T, Hkv, hd).transpose(1, 2)
        v = self.proj(p, "wv", xkv).view(B, T, Hkv, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            qw, kw = self.w(p + "q_norm.weight"), self.w(p + "k_norm.weight")
            q = rms(q, None if qw is None else qw[:, None, :])
            k = rms(k, None if kw is None else kw[:, None, :])
        if getattr(self.cfg, "position", "rope") == "rope":
            q, k = rotate(q, self.cfg.rope_theta), rotate(k, self.cfg.rope_theta)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
        return self.proj(p, "wo", y)

    def mlp(self, p, x):
        if self.cfg.mlp == "swiglu":
            g = self.proj(p, "w_gate", x)
            h = g * torch.sigmoid(g) * self.proj(p, "w_up", x)
        elif self.cfg.mlp == "gelu":
            h = gelu_tanh(self.proj(p, "w_up", x))
        else:
            h = torch.relu(self.proj(p, "w_up", x)) ** 2
        return self.proj(p, "w_down", h)

    def proj(self, p, name, x):
        """x W^T, plus the per-loop LoRA delta (alpha / r) (x A_t^T) B_t^T in core layers when the weights hold
        adapters `loop_lora.<layer>.<name>.A/B` (banks [N, r, in], [N, out, r]); loop t uses min(t, N - 1)."""
        y = x @ self.W[p + name + ".weight"].T
        if p + name + ".bias" in self.W:
            y = y + self.W[p + name + ".bias"]
        layer = p.split(".")[1] if p.startswith("core.") else None
        A = self.W.get(f"loop_lora.{layer}.{name}.A")
        if A is None:
            return y
        B, t = self.W[f"loop_lora.{layer}.{name}.B"], min(self.t, A.shape[0] - 1)
        r = A.shape[1]
        alpha = self.cfg.loop_lora_alpha if self.cfg.loop_lora_alpha is not None else r
        return y + (alpha / r) * (x @ A[t].T) @ B[t].T

    def layer(self, p, x, *, q_src=None, sandwich=False, recall=None):
        if recall is not None:
            x = x + recall
        n1 = self.norm(x, p + "attn_norm")
        q_in = n1 if q_src is None else self.norm(q_src, p + "attn_norm")
        x = x + self.attn(p + "attn.", q_in, n1)
        if sandwich:
            x = self.norm(x, p + "attn_out_norm")
        x = x + self.mlp(p + "mlp.", self.norm(x, p + "mlp_norm"))
        if sandwich:
            x = self.norm(x, p + "mlp_out_norm")
        return x

    def stack(self, prefix, n, x, **kw):
        for i in range(n):
            x = self.layer(f"{prefix}.{i}.", x, **kw)
        return x

    def logits(self, tokens, variant: str, loops: int, backprop_loops: int = 0):
        """Logits [B, T, vocab] of `variant` (huginn/parcae with h_0 = 0); loops before the last
        `backprop_loops` run without gradient."""
        cfg, W = self.cfg, self.W
        sandwich = variant == "huginn"
        e = W["embed.weight"][tokens]
        if variant == "huginn":
            e = e * math.sqrt(cfg.d_model)
        if getattr(cfg, "position", "rope") == "learned":  # absolute positions 0..T-1 added to the input
            e = e + W["pos_embed.weight"][: tokens.shape[1]]
        e = self.stack("prelude", cfg.n_prelude, e, sandwich=sandwich)
        if variant == "parcae":
            e = self.norm(e, "injection.e_norm")
        k = backprop_loops or loops
        h = None
        for t in range(loops):
            with torch.set_grad_enabled(t >= loops - k):
                h = self.loop(variant, t, h, e, sandwich)
            if t < loops - k:
                h = h.detach()
        y = self.norm(self.stack("coda", cfg.n_coda, h, sandwich=sandwich), "norm")
        head = W["embed.weight"] if cfg.tie_embeddings else W["lm_head.weight"]
        z = y @ head.T
        if cfg.logit_softcap:
            z = cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)
        return z[..., : self.vocab]

    def logits_per_sequence(self, tokens, variant: str, depths, backprop_loops: int = 0):
        """Per-sequence depth, by definition: every sequence run alone at its own loop count d (its last
        min(backprop_loops, d) loops with gradient), the logits stacked back into [B, T, vocab]."""
        return torch.cat([self.logits(tokens[b:b + 1], variant, int(d), backprop_loops)
                          for b, d in enumerate(depths)])

    def loop(self, variant, t, h, e, sandwich):
        """One loop, straight from the equations of docs/models.md ("Recurrences")."""
        self.t = t  # the loop index that selects the per-loop LoRA adapters (proj)
        n, W = self.cfg.n_core, self.W
        first = h is None
        if variant == "looped":  # h_0 = e, h_t = B(h)
            return self.stack("core", n, e if first else h)
        norm = self.norm  # norm(x, name): weightless in the FLT family (no weights under `name`)
        if variant == "lt":  # loop 1 from norm(e), then from h^(t-1) = norm(out)
            return norm(self.stack("core", n, norm(e, "outer_norm") if first else h), "outer_norm")
        if variant == "lt_i":  # norm(e + h^(t-1)), h^(0) = 0
            return norm(self.stack("core", n, norm(e if first else e + h, "injection.entry_norm")), "outer_norm")
        if variant in ("lt_ia", "flt", "flt_res"):  # residual stream restarts from norm(e)
            x = norm(e, "injection.entry_norm")
            for i in range(n):
                p = f"core.{i}."
                if variant == "flt_res":
                    x = x if first else norm(x + h, f"injection.stream_norms.{i}")
                    x = self.layer(p, x)
                else:
                    inject = not first and (variant == "flt" or i == 0)
                    x = self.layer(p, x, q_src=h if inject else None)
            return norm(x, "outer_norm")
        # h_0 = Norm(0), normalised like every state: 0 for RMSNorm, the bias for an affine LayerNorm
        h0 = norm(torch.zeros_like(e), "outer_norm")
        if variant == "recall":  # h_t = Norm(B(h_{t-1} + e))
            return norm(self.stack("core", n, (h0 if first else h) + e), "outer_norm")
        if variant == "recall_internal":  # e added before every core layer, outer norm
            return norm(self.stack("core", n, h0 if first else h, recall=e), "outer_norm")
        if variant == "huginn":  # h_t = Core(Adapter([h, e])), sandwich layers
            hp = torch.zeros_like(e) if first else h
            return self.stack("core", n, torch.cat([hp, e], -1) @ W["injection.adapter.weight"].T, sandwich=True)
        if variant == "parcae":  # u = exp(delta A) h + delta B e
            hp = torch.zeros_like(e) if first else h
            delta = torch.nn.functional.softplus(W["injection.parcae.dt_bias"])
            a_bar = torch.exp(-delta * torch.exp(W["injection.parcae.A_log"]))
            return self.stack("core", n, a_bar * hp + delta * (e @ W["injection.parcae.B"].T))
        raise ValueError(variant)

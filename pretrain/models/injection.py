"""How the input e and the previous loop state h reach the core block: the switches of `model.*`.

At each loop's entry (`Injection.enter`, switch `injection`):
    none     u = h                                   plain k x L loop (LT)
    add      u = h + e                               additive injection / recall (LT_i, recall)
    concat   u = W [h; e],  W: 2d -> d, bias-free   Huginn's adapter
    parcae   u = exp(delta A) h + delta B e          A = -exp(A_log) < 0, delta = softplus(dt_bias): every
                                                     channel of exp(delta A) lies in (0, 1), so the map h -> u
                                                     has spectral radius < 1 whatever the training does
then `entry_norm` optionally RMS-normalises u (LT_i: norm(e + h)). With `restart` (FLT family) the block input is
e itself every loop (normalised by `entry_norm`), and the previous state enters only inside the layers.

Inside the core layers (`Injection.at_layer`, switch `state_inject`; the first loop has no previous state):
    query_first  the first layer's attention takes its queries from h (LT_ia)
    query_all    every layer's attention takes its queries from h (FLT)
    stream_all   before every layer x <- norm(x + h) (FLT_res)

Internal recall (`internal_recall`): e is added to the stream inside every core layer, before the layer, before
the MLP, or before both sublayers (`layers.Layer`). It combines freely with the entry injection.

Default recall placement. The `recall` recipe uses entry recall, `h_t = Norm(B(h_{t-1} + e))` (injection=add,
outer_norm), and `recall_internal` puts e before every core layer instead. Entry recall is the default because
(1) it is the form whose stability argument the design note states (the input is re-added once per loop and the
outer norm bounds ||h_t||), (2) it leaves every core layer an ordinary transformer layer, so loops=1 without
injection is exactly a plain transformer and the same block serves every variant, and (3) the evidence for
internal recall (matching or beating entry recall) comes from sudoku/chess-style tasks with placements that are
not public; for language modelling it is an experiment, one switch away (`internal_recall: layer|mlp|sublayer`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.config import Switches
from pretrain.models.layers import RMSNorm, replicated

# Parcae's init: exp(delta * A) = sqrt(1/5) with A = -1 (A_log = 0)
_PARCAE_DELTA0 = 0.5 * math.log(5.0)


class Concat(nn.Module):
    """Huginn's adapter: u = W [h; e], a bias-free linear map from 2d to d."""

    def __init__(self, d: int, init_std: float, dtype: torch.dtype):
        super().__init__()
        self.weight = replicated(nn.Parameter(torch.empty(d, 2 * d, dtype=dtype)))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat((h, e), dim=-1), self.weight)


class Parcae(nn.Module):
    """Parcae's constrained injection: u = exp(delta A) h + delta B e with A = -exp(A_log), delta = softplus(dt_bias).
    Init A_log = 0, exp(delta A) = sqrt(1/5), B = identity."""

    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.A_log = replicated(nn.Parameter(torch.zeros(d, dtype=dtype)))
        self.dt_bias = replicated(nn.Parameter(torch.full((d,), math.log(math.expm1(_PARCAE_DELTA0)), dtype=dtype)))
        self.B = replicated(nn.Parameter(torch.eye(d, dtype=dtype)))
        self.max_a_bar: torch.Tensor | None = None  # of the last forward, for diagnostics

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        delta = F.softplus(self.dt_bias)
        a_bar = torch.exp(-delta * torch.exp(self.A_log))  # in (0, 1) per channel
        self.max_a_bar = a_bar.detach().max()
        return a_bar * h + delta * F.linear(e, self.B)


class Injection(nn.Module):
    """Every way e and the previous state enter the loop, chosen by the resolved switches. Parameters live in
    submodules called through forward (so ZeRO-3 gathers them)."""

    def __init__(self, sw: Switches, d: int, n_core: int, init_std: float, dtype: torch.dtype):
        super().__init__()
        self.sw = sw
        self.entry_norm = RMSNorm(d, sw.norm_affine, dtype) if sw.entry_norm else None
        if sw.injection == "concat":
            self.adapter = Concat(d, init_std, dtype)
        if sw.injection == "parcae":
            self.e_norm = RMSNorm(d, True, dtype)  # Parcae normalises the prelude output, learnable scale
            self.parcae = Parcae(d, dtype)
        if sw.state_inject == "stream_all":
            self.stream_norms = nn.ModuleList(RMSNorm(d, sw.norm_affine, dtype) for _ in range(n_core))

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        """The input as the loop sees it (Parcae: RMS-normalised prelude output)."""
        return self.e_norm(e) if self.sw.injection == "parcae" else e

    def enter(self, h: torch.Tensor | None, e: torch.Tensor) -> torch.Tensor:
        """The block input of one loop."""
        kind = self.sw.injection
        if self.sw.restart or h is None:
            u = e
        elif kind == "none":
            u = h
        elif kind == "add":
            u = h + e
        elif kind == "concat":
            u = self.adapter(h, e)
        else:
            u = self.parcae(h, e)
        return self.entry_norm(u) if self.entry_norm is not None else u

    def at_layer(self, i: int, x: torch.Tensor, prev: torch.Tensor | None):
        """(stream, queries) for core layer i given the previous loop's state `prev` (None in the first loop of
        a restarting variant)."""
        mode = self.sw.state_inject
        if prev is None or mode == "none":
            return x, None
        if mode == "stream_all":
            return self.stream_norms[i](x + prev), None
        if mode == "query_all" or i == 0:
            return x, prev
        return x, None

    def recall(self, e: torch.Tensor) -> torch.Tensor | None:
        return e if self.sw.internal_recall != "none" else None

    def diagnostics(self) -> dict[str, float]:
        if self.sw.injection == "parcae" and self.parcae.max_a_bar is not None:
            return {"parcae_max_a_bar": float(self.parcae.max_a_bar)}
        return {}


def init_state(sw: Switches, e: torch.Tensor, noise: torch.Tensor | None, outer_norm: nn.Module | None):
    """h_0: None for restarting variants (the first loop has no previous state), else zeros / e / noise;
    with outer normalisation the state is normalised everywhere, h_0 included."""
    if sw.restart:
        return None
    if sw.state_init == "zeros":
        h = torch.zeros_like(e)
    elif sw.state_init == "embed":
        h = e
    else:
        h = noise.to(e.dtype)
    return outer_norm(h) if outer_norm is not None else h

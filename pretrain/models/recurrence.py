"""Recurrences: what one loop does with the input e and the previous loop state h (docs/models.md, "Recurrences").

One module per family, built once from the resolved switches (`build_recurrence`): `REGISTRY` maps the family
name to its class; the family is `restart` when `model.restart` is set, else the `model.injection` switch.

    none     u = h                                   plain k x L loop (looped, LT)
    add      u = h + e                               additive injection / recall (LT_i, recall, recall_internal)
    concat   u = W [h; e],  W: 2d -> d, bias-free   Huginn's adapter
    parcae   u = exp(delta A) h + delta B e          Parcae's constrained system
    restart  u = e every loop; h enters inside the layers (state_inject): the FLT family (LT_ia, FLT_res, FLT)

One loop of every family is `Recurrence.loop`:

    u = entry_norm(enter(h, e))                      # entry_norm: switch entry_norm
    for each core layer i:
        x, q = at_layer(i, x, h)                     # switch state_inject: queries from h, or x <- norm(x + h)
        x = layer_i(x, queries=q, recall=e?)         # switch internal_recall: e added inside the layer
    h' = exit(x)                                     # switch outer_norm

A family overrides only what differs: `enter` (how h and e meet), `init_state` (h_0), `prepare` (e as the loop
sees it), `diagnostics`, and creates its own parameters in `create`. The other switches (entry_norm,
state_inject, internal_recall, outer_norm, state_init) are shared by every family, so ablations compose.

Adding a recurrence: subclass `Recurrence` in this file, override `enter` (and whatever else differs), declare the
role of every parameter it creates (`layers.declare_role`, or the `role` argument of `replicated` / `sharded`),
add one `REGISTRY` line and the name to `config.Injection` (so `model.injection: <name>` selects it), a recipe in
`config.RECIPES` if it is a named variant, and the equation to tests/models/reference.py.

Default recall placement. The `recall` recipe uses entry recall, `h_t = Norm(B(h_{t-1} + e))` (injection=add,
outer_norm), and `recall_internal` puts e before every core layer instead. Entry recall is the default because
(1) it is the form whose stability argument docs/models.md states (the input is re-added once per loop and the
outer norm bounds ||h_t||), (2) it leaves every core layer an ordinary transformer layer, so loops=1 without
injection is exactly a plain transformer and the same block serves every variant, and (3) the evidence for
internal recall (matching or beating entry recall) comes from sudoku/chess-style tasks with placements that are
not public; for language modelling it is an experiment, one switch away (`internal_recall: layer|mlp|sublayer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.config import Switches
from pretrain.models.layers import make_norm, replicated

# layer(i, x, query=, recall=) runs core layer i of the current loop (the model supplies it: KV-cache slot, LoRA,
# checkpointing)
CoreLayer = Callable[..., torch.Tensor]


class Recurrence(nn.Module):
    """The shared part of every family: entry norm, the previous state inside the layers (state_inject),
    internal recall, h_0 (state_init) and the outer norm. Parameters live in submodules called through forward
    (so ZeRO-3 gathers them); the parameter names (`injection.*`) are the checkpoints'."""

    def __init__(self, sw: Switches, d: int, n_core: int, init_std: float, dtype: torch.dtype, eps: float,
                 norm_kind: str = "rms"):
        super().__init__()
        self.sw, self.n_core, self.eps, self.norm_kind = sw, n_core, eps, norm_kind
        self.exit_norm: nn.Module | None = None  # the model's `outer_norm`, bound by `bind_exit`
        self.entry_norm = self.make_norm(d, sw.norm_affine, dtype) if sw.entry_norm else None
        self.create(d, init_std, dtype)  # the family's parameters: after the entry norm, before the layer hooks
        if sw.state_inject == "stream_all":
            self.stream_norms = nn.ModuleList(self.make_norm(d, sw.norm_affine, dtype) for _ in range(n_core))

    def make_norm(self, d: int, affine: bool, dtype: torch.dtype) -> nn.Module:
        """A norm of the model's kind (model.norm_kind: RMSNorm or LayerNorm) and epsilon."""
        return make_norm(self.norm_kind, d, affine, dtype, self.eps)

    def create(self, d: int, init_std: float, dtype: torch.dtype) -> None:
        """Create the family's own parameters (none by default)."""

    def bind_exit(self, outer_norm: nn.Module | None) -> None:
        """Use the model's outer norm (registered on the model, so its parameter keeps the name outer_norm.weight;
        held here without registering it twice)."""
        object.__setattr__(self, "exit_norm", outer_norm)

    # --- one loop ---------------------------------------------------------------------------------------------

    def loop(self, h: torch.Tensor | None, e: torch.Tensor, layer: CoreLayer):
        """One pass through the core block: the next state, and its value before the outer norm (diagnostics)."""
        x = self.entry(h, e)
        recall = self.recall(e)
        for i in range(self.n_core):
            x, query = self.at_layer(i, x, h)
            x = layer(i, x, query=query, recall=recall)
        return self.exit(x), x

    def entry(self, h: torch.Tensor | None, e: torch.Tensor) -> torch.Tensor:
        """The block input: `enter(h, e)` (e in a first loop without previous state), entry-normalised."""
        u = e if h is None else self.enter(h, e)
        return self.entry_norm(u) if self.entry_norm is not None else u

    def enter(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """How the previous state and the input meet at the loop's entry: the family's equation."""
        raise NotImplementedError

    def at_layer(self, i: int, x: torch.Tensor, h: torch.Tensor | None):
        """(stream, queries) for core layer i given the previous loop's state h (switch state_inject)."""
        mode = self.sw.state_inject
        if h is None or mode == "none":
            return x, None
        if mode == "stream_all":
            return self.stream_norms[i](x + h), None
        if mode == "query_all" or i == 0:
            return x, h
        return x, None

    def recall(self, e: torch.Tensor) -> torch.Tensor | None:
        """What internal recall adds inside every core layer (`layers.Layer`), or None."""
        return e if self.sw.internal_recall != "none" else None

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit_norm(x) if self.exit_norm is not None else x

    # --- before the loop, and after ---------------------------------------------------------------------------

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        """The input as the loop sees it."""
        return e

    @property
    def random_start(self) -> bool:
        """Whether h_0 is noise (the model then draws it and passes it to `init_state`)."""
        return self.sw.state_init == "random"

    def init_state(self, e: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor | None:
        """h_0: zeros / e / noise; with outer normalisation the state is normalised everywhere, h_0 included."""
        if self.sw.state_init == "zeros":
            h = torch.zeros_like(e)
        elif self.sw.state_init == "embed":
            h = e
        else:
            h = noise.to(e.dtype)
        return self.exit(h)

    def diagnostics(self) -> dict[str, float]:
        return {}


class Plain(Recurrence):
    """`none`: h_t = B(h_{t-1}) (looped: h_0 = e; LT: outer norm, loop 1 from norm(e))."""

    def enter(self, h, e):
        return h


class Additive(Recurrence):
    """`add`: h_t = B(h_{t-1} + e), the input re-added every loop (LT_i: norm(e + h) at entry; recall: outer
    norm)."""

    def enter(self, h, e):
        return h + e


class Adapter(nn.Module):
    """Huginn's adapter: u = W [h; e], a bias-free linear map from 2d to d."""

    def __init__(self, d: int, init_std: float, dtype: torch.dtype):
        super().__init__()
        self.weight = replicated(nn.Parameter(torch.empty(d, 2 * d, dtype=dtype)), role="injection")
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat((h, e), dim=-1), self.weight)


class Concat(Recurrence):
    """`concat` (Huginn): h_t = B(W [h_{t-1}; e]); h_0 ~ TN(0, 0.63), sandwich layers, e = Prelude(E x sqrt(d))."""

    def create(self, d, init_std, dtype):
        self.adapter = Adapter(d, init_std, dtype)

    def enter(self, h, e):
        return self.adapter(h, e)


# Parcae's init: exp(delta * A) = sqrt(1/5) with A = -1 (A_log = 0)
_PARCAE_DELTA0 = 0.5 * math.log(5.0)


class ParcaeMap(nn.Module):
    """u = exp(delta A) h + delta B e with A = -exp(A_log), delta = softplus(dt_bias): every channel of
    exp(delta A) lies in (0, 1), so h -> u has spectral radius < 1 whatever the training does.
    Init A_log = 0, exp(delta A) = sqrt(1/5), B = identity."""

    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.A_log = replicated(nn.Parameter(torch.zeros(d, dtype=dtype)), role="injection")
        self.dt_bias = replicated(nn.Parameter(torch.full((d,), math.log(math.expm1(_PARCAE_DELTA0)), dtype=dtype)),
                                  role="injection")
        self.B = replicated(nn.Parameter(torch.eye(d, dtype=dtype)), role="injection")
        self.max_a_bar: torch.Tensor | None = None  # of the last forward, for diagnostics

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        delta = F.softplus(self.dt_bias)
        a_bar = torch.exp(-delta * torch.exp(self.A_log))  # in (0, 1) per channel
        self.max_a_bar = a_bar.detach().max()
        return a_bar * h + delta * F.linear(e, self.B)


class Parcae(Recurrence):
    """`parcae`: e = Norm(Prelude(E x)) (learnable scale; the model's norm kind, RMSNorm by default);
    h_t = B(exp(delta A) h_{t-1} + delta B e)."""

    def create(self, d, init_std, dtype):
        self.e_norm = self.make_norm(d, True, dtype)
        self.parcae = ParcaeMap(d, dtype)

    def prepare(self, e):
        return self.e_norm(e)

    def enter(self, h, e):
        return self.parcae(h, e)

    def diagnostics(self):
        a = self.parcae.max_a_bar
        return {} if a is None else {"parcae_max_a_bar": float(a)}


class Restart(Recurrence):
    """`restart` (FLT family): every loop's stream restarts from norm(e) (entry_norm); the previous state h enters
    only inside the layers (state_inject): the first layer's queries (LT_ia), every layer's queries (FLT), or
    x <- norm(x + h) before every layer (FLT_res). The first loop has no previous state (h_0 = None)."""

    def enter(self, h, e):
        return e

    @property
    def random_start(self) -> bool:
        return False

    def init_state(self, e, noise):
        return None


REGISTRY: dict[str, type[Recurrence]] = {
    "none": Plain,
    "add": Additive,
    "concat": Concat,
    "parcae": Parcae,
    "restart": Restart,
}


def family(sw: Switches) -> str:
    """The registry key of the resolved switches: `restart`, else the `injection` switch."""
    return "restart" if sw.restart else sw.injection


def build_recurrence(sw: Switches, d: int, n_core: int, init_std: float, dtype: torch.dtype,
                     eps: float, norm_kind: str = "rms") -> Recurrence:
    return REGISTRY[family(sw)](sw, d, n_core, init_std, dtype, eps, norm_kind)

"""Config sections owned by the model family: `model` (architecture) and `loop` (depth in training).

`model.variant` names a recipe (`RECIPES`) that fixes the loop switches (`injection`, `norm`, `outer_norm`,
`state_init`, ...). Every switch defaults to null, meaning "the recipe's value"; a switch set explicitly
overrides the recipe, so `variant: looped` with every switch given is the fully manual form.
`resolve_switches(cfg)` returns the values the model uses. No torch here (the CLI imports this file).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from loopstack.errors import ConfigError
from loopstack.typed_config import param

Variant = Literal["looped", "lt", "lt_i", "lt_ia", "flt_res", "flt", "recall", "recall_internal", "huginn", "parcae"]
Injection = Literal["none", "add", "concat", "parcae"]
InternalRecall = Literal["none", "layer", "mlp", "sublayer"]
StateInject = Literal["none", "query_first", "query_all", "stream_all"]
NormStyle = Literal["pre", "sandwich"]
StateInit = Literal["zeros", "embed", "random"]
# the projections of a layer (names of the modules in layers.py), in the order the per-loop adapters are built
LoRATarget = Literal["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
LORA_TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass
class ModelConfig:
    """The looped LM: embedding -> prelude -> core x loops -> coda -> norm -> head."""

    variant: Variant = param("flt", help="named recipe: sets every loop switch left null (injection ... embed_scale); "
                                         "'looped' = plain k x L loop")
    loops: int = param(4, min=1, help="core-block iterations (mean depth when sampled)")
    d_model: int = param(256, min=8, help="hidden size")
    n_heads: int = param(4, min=1, help="attention heads")
    n_kv_heads: int = param(0, min=0, help="key/value heads for GQA; 0 = n_heads")
    n_prelude: int = param(0, min=0, help="ordinary layers before the loop")
    n_core: int = param(2, min=1, help="layers in the looped block")
    n_coda: int = param(0, min=0, help="ordinary layers after the loop")
    vocab_size: int = param(0, min=0, help="0 = the tokenizer's vocabulary size")
    mlp: Literal["swiglu", "relu2", "gelu"] = param(
        "relu2", help="MLP type: swiglu down(silu(gate x) * up x), relu2 down(relu(up x)^2), "
                      "gelu down(gelu_tanh(up x)) (GPT-2)")
    mlp_ratio: float = param(4.0, min=0.5, help="MLP hidden size / d_model (rounded up to a multiple of 16)")
    mlp_hidden: int = param(0, min=0, help="MLP hidden size given exactly (imported models); 0 = from mlp_ratio")
    qkv_bias: bool = param(False, help="biases on the query/key/value projections (Qwen2-style imported models)")
    proj_bias: bool = param(False, help="biases on the attention output and MLP projections (wo, w_gate, w_up, "
                                        "w_down: GPT-2-style imported models)")
    norm_kind: Literal["rms", "layer"] = param(
        "rms", help="every norm of the model (layers, loop norms, final norm; not the QK-norm): rms = RMSNorm, "
                    "layer = LayerNorm (mean removed, weight and bias when affine: GPT-2)")
    norm_eps: float = param(1e-6, min=0.0, help="epsilon of every norm")
    tie_embeddings: bool = param(True, help="head shares the embedding matrix")
    qk_norm: bool = param(True, help="RMSNorm on queries and keys (per head)")
    logit_softcap: float = param(0.0, min=0.0, help="c * tanh(z / c) on logits; 0 = off")
    position: Literal["rope", "learned"] = param(
        "rope", help="rope = rotary embeddings in attention; learned = absolute position embeddings [max_positions, "
                     "d_model] added to the token embedding (GPT-2), no rotary")
    max_positions: int = param(0, min=0, help="positions of the learned position embedding (position: learned, "
                                              "required there); sequences may not be longer")
    rope_theta: float = param(10000.0, min=1.0, help="rotary base")
    attention: Literal["sdpa", "flex"] = param(
        "sdpa", help="kernel for document-masked attention (packed rows with doc ids): sdpa = a dense [B, 1, T, T] "
                     "mask per forward; flex = FlexAttention with one block mask per forward (compiled on CUDA). "
                     "Same results; other attention (plain causal, padded prompts, KV cache, router) stays on sdpa")
    init_std: float = param(0.02, min=0.0, help="std of weight init (output projections: / sqrt(2 x layers))")
    init: Literal["default", "nanochat"] = param(
        "default", help="weight init rule. default: N(0, init_std), output projections N(0, init_std / sqrt(2 x "
                        "layers)). nanochat (the FLT paper's official code, nanochat init_weights): embedding N(0, 1), "
                        "head N(0, 0.001) (needs tie_embeddings: false), wq/wk/wv/w_up/w_gate U(+-sqrt(3 / d_model)), "
                        "wo and w_down zero; every other parameter (position embeddings, injection adapters, Parcae "
                        "A/B, exit gate, routers, LoRA) keeps the default rule")
    # --- loop switches: null = the variant's recipe (see RECIPES) ---
    injection: Injection | None = param(
        None, help="input into the loop state at each loop's entry: none | add (h+e) | concat (Huginn adapter) | "
                   "parcae (constrained diagonal system)")
    entry_norm: bool | None = param(None, help="RMS-normalise the block input after injection (LT_i: norm(h + e))")
    internal_recall: InternalRecall | None = param(
        None, help="also add e inside every core layer: before the layer, before the MLP, or before each sublayer")
    restart: bool | None = param(None, help="every loop restarts its residual stream from e (FLT family)")
    state_inject: StateInject | None = param(
        None, help="how the previous loop's state enters the layers: queries of the first / every layer's "
                   "attention (LT_ia / FLT), or x <- norm(x + h) before every layer (FLT_res)")
    norm: NormStyle | None = param(None, help="layer norm placement: pre-norm or sandwich (Huginn)")
    outer_norm: bool | None = param(None, help="RMS-normalise the loop state after every loop (and h_0)")
    norm_affine: bool | None = param(None, help="learnable norm weights (and LayerNorm biases; the FLT recipes use "
                                                "none)")
    state_init: StateInit | None = param(None, help="h_0: zeros, the embedded input, or truncated-normal noise")
    state_init_std: float | None = param(None, min=0.0, help="std of random h_0 (Huginn: 0.63)")
    embed_scale: bool | None = param(None, help="multiply the embedding by sqrt(d_model) (Huginn)")
    # --- relaxed sharing: per-loop LoRA on the core block (Relaxed Recursive Transformers) ---
    loop_lora_rank: int = param(0, min=0, help="rank r of a per-loop low-rank delta W + (alpha / r) B_t A_t on the "
                                               "core layers' projections (one adapter per loop index); 0 = off")
    loop_lora_alpha: float | None = param(None, min=0.0, help="LoRA alpha (scale alpha / r); null = r (scale 1)")
    loop_lora_targets: list[LoRATarget] = param(
        [], help="core projections that get per-loop adapters, among wq wk wv wo w_gate w_up w_down "
                 "(w_gate: swiglu only); [] = all of the model's")
    # --- adaptive depth ---
    exit_gate: bool = param(False, help="learned per-token exit gate (Ouro): sigmoid(Linear(d, 1)) on each loop's "
                                        "normalised state; trained with the expected loss over exit steps "
                                        "(loop.exit_entropy), used at inference with --exit-threshold")
    # --- Mixture-of-Recursions token routing (routing.py; docs/adaptive.md, "Mixture-of-Recursions routing") ---
    router: Literal["none", "expert_choice", "token_choice"] = param(
        "none", help="per-token recursion depth (MoR, Bae et al. 2025): expert_choice = a router per loop keeps the "
                     "top capacity share of the previous loop's tokens; token_choice = one router on e picks each "
                     "token's depth; none = every token runs every loop")
    router_capacity: list[float] = param(
        [], help="expert_choice: share of the sequence kept at loop r (0-based), non-increasing, each in (0, 1]; "
                 "[] = (N - r) / N with N the forward's loop count; a shorter list reuses its last entry")
    router_alpha: float | None = param(None, min=0.0, help="gate scale alpha; null = 0.1 (expert_choice) or 1.0 "
                                                           "(token_choice)")
    router_aux_coeff: float | None = param(
        None, min=0.0, help="weight of the router's auxiliary loss; null = 0.001 (expert_choice: BCE towards the "
                            "top-k choice) or 0.1 (token_choice: balancing loss)")
    router_z_coeff: float | None = param(None, min=0.0, help="weight of the router z-loss; null = 0 (expert_choice) "
                                                             "or 1e-5 (token_choice)")

    def check_router(self, loop_cfg: LoopConfig | None = None) -> None:
        """The router keys across keys and sections (a one-line ConfigError naming the key): a capacity list only
        with expert_choice; routing decides each token's depth, so not with per-sequence depth, and its loss is on
        the last loop. Run on the resolved config (and at build), so `--set` flags may come in any order."""
        if self.router == "none":
            if self.router_capacity:
                raise ConfigError("model.router_capacity applies to model.router: expert_choice only (router is none)")
            return
        if self.router_capacity and self.router != "expert_choice":
            raise ConfigError(f"model.router_capacity applies to model.router: expert_choice only, not "
                              f"{self.router!r}")
        if loop_cfg is not None and loop_cfg.per_sequence:
            raise ConfigError("loop.per_sequence does not combine with model.router (the router decides each "
                              "token's depth)")
        if loop_cfg is not None and loop_cfg.loss_on != "last":
            raise ConfigError(f"model.router takes its loss on the last loop: loop.loss_on must be last, not "
                              f"{loop_cfg.loss_on!r}")
        if self.exit_gate:
            raise ConfigError("model.exit_gate and model.router both decide each token's depth: use one")

    def check_positions(self, seq_len: int) -> None:
        """Learned positions need a table (max_positions >= 1) as long as the training sequences. Two keys (and the
        data section): checked on the resolved config, like `LoopConfig.check_depth`, so `--set` flags may come in
        any order."""
        if self.position != "learned":
            return
        if self.max_positions < 1:
            raise ConfigError("model.position = learned needs model.max_positions >= 1 (the rows of the position "
                              "embedding)")
        if seq_len > self.max_positions:
            raise ConfigError(f"data.seq_len = {seq_len} is longer than model.max_positions = {self.max_positions} "
                              f"(the learned position embedding has no rows past it)")

    def check_init(self) -> None:
        """`init: nanochat` draws an untied head N(0, 0.001): a tied head would be the N(0, 1) embedding. Two keys:
        checked on the resolved config (and at build), so `--set` flags may come in any order."""
        if self.init == "nanochat" and self.tie_embeddings:
            raise ConfigError("model.init = nanochat needs model.tie_embeddings: false (nanochat's head is untied, "
                              "drawn N(0, 0.001) apart from the N(0, 1) embedding)")

    def check(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}")
        if self.position == "rope" and (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head dim d_model / n_heads = {self.d_model // self.n_heads} must be even (rotary)")
        if self.n_heads % kv:
            raise ConfigError(f"n_kv_heads = {kv} does not divide n_heads = {self.n_heads}")
        resolve_switches(self)
        lora_targets(self)
        router_capacities(self, max(self.loops, len(self.router_capacity), 1))  # each in (0, 1], non-increasing


@dataclass
class LoopConfig:
    """How many loops a training step runs and which of them carry gradient and loss."""

    sampler: Literal["fixed", "poisson_lognormal", "uniform"] = param("fixed", help="depth per step")
    min_loops: int = param(1, min=1, help="lower bound for the uniform sampler")
    max_loops: int = param(0, min=0, help="upper bound for the samplers; 0 = unbounded (uniform: 2 x loops - min)")
    sigma: float = param(0.5, min=0.0, help="lognormal std of the Poisson rate (Huginn: 0.5)")
    backprop_loops: int = param(0, min=0, help="gradient through the last k loops only; 0 = all")
    loss_on: Literal["last", "all", "last_third"] = param(
        "last", help="which loops feed the loss (only loops that carry gradient count)")
    curriculum_start: int = param(
        0, min=0, help="depth curriculum: the loop cap at step 0; 0 = off. The cap ramps linearly to the target "
                       "over curriculum_steps, cap(s) = min(target, start + floor((target - start) s / steps)); "
                       "target = the sampler's upper bound: model.loops (fixed), max_loops or 2 x loops - min_loops "
                       "(uniform), max_loops (poisson_lognormal, required). Every draw is clamped to the cap")
    curriculum_steps: int = param(0, min=0, help="steps over which the curriculum cap ramps to its target (>= 1 when "
                                                 "curriculum_start is set)")
    exit_entropy: float = param(0.1, min=0.0, help="model.exit_gate: weight beta of the exit distribution's entropy "
                                                   "in the loss sum_t p(t) L_t - beta H(p) (Ouro: 0.1, then 0.05)")
    exit_gate_only: bool = param(False, help="model.exit_gate, stage II: freeze the model, train only the gate towards "
                                             "continuing where the next loop lowers the token's loss (Ouro)")
    exit_gate_sharpness: float = param(50.0, min=0.0, help="stage II: k in the target sigmoid(k (improvement - "
                                                           "margin)) (Ouro: 50)")
    exit_gate_margin: float = param(0.005, help="stage II: gamma, the loss improvement that counts as worth a loop "
                                                "(Ouro: 0.005)")
    per_sequence: bool = param(
        False, help="draw a loop count for every sequence of the global batch (Parcae), not one per step: the batch "
                    "runs the largest, a sequence past its own count keeps its state; needs loss_on: last")

    def depth_target(self, mean_loops: int) -> int | None:
        """The largest loop count the sampler can draw for mean depth `mean_loops` (model.loops); None when
        unbounded (poisson_lognormal without max_loops). The depth curriculum ramps up to it."""
        if self.sampler == "fixed":
            top = mean_loops
        elif self.sampler == "uniform":
            top = max(self.max_loops or 2 * mean_loops - self.min_loops, self.min_loops)
        elif self.sampler == "poisson_lognormal":
            top = None if mean_loops > 1 else 1
        else:
            raise ValueError(f"unknown loop.sampler {self.sampler!r}")
        if self.max_loops:
            top = self.max_loops if top is None else min(top, self.max_loops)
        return None if top is None else max(1, top)

    def check_adaptive(self, model: ModelConfig) -> None:
        """The exit gate's keys against the model's (two sections: on the resolved config, like `check_depth`)."""
        if self.exit_gate_only and not model.exit_gate:
            raise ConfigError("loop.exit_gate_only trains the learned exit gate alone: it needs model.exit_gate: true")
        if model.exit_gate and self.per_sequence:
            raise ConfigError("model.exit_gate and loop.per_sequence both decide where a token's loops end: use one "
                              "(the gate's objective runs every loop of the step for every sequence)")

    def check_depth(self, mean_loops: int) -> None:
        """The depth checks (curriculum; per-sequence depth needs loss_on: last), one-line ConfigErrors naming the
        key. They involve two keys or two
        sections (model.loops = `mean_loops`), so they run on the resolved config, not in `check`: `--set` flags
        are checked one at a time, and `--set loop.curriculum_start=1 --set loop.curriculum_steps=9` passes
        through a state with only the first set."""
        if self.per_sequence and self.loss_on != "last":
            raise ConfigError(f"loop.per_sequence needs loop.loss_on: last, not {self.loss_on!r} (each sequence's "
                              "loss is taken on its own final state)")
        start, steps = self.curriculum_start, self.curriculum_steps
        if not start:
            if steps:
                raise ConfigError(f"loop.curriculum_steps = {steps} has no effect without loop.curriculum_start "
                                  "(the loop count at step 0; 0 = no curriculum)")
            return
        if steps < 1:
            raise ConfigError(f"loop.curriculum_steps = {steps}: the depth curriculum (loop.curriculum_start = "
                              f"{start}) needs loop.curriculum_steps >= 1")
        target = self.depth_target(mean_loops)
        if target is None:
            raise ConfigError("loop.curriculum_start needs loop.max_loops with sampler poisson_lognormal: the "
                              "ramp's target is the sampler's cap, and this sampler has none")
        if start > target:
            where = "loop.max_loops" if self.max_loops == target else \
                {"fixed": "model.loops", "uniform": "2 x model.loops - loop.min_loops"}.get(self.sampler, "")
            raise ConfigError(f"loop.curriculum_start = {start} is above the curriculum's target {target} ({where}: "
                              "the largest loop count the sampler draws; the ramp goes from curriculum_start to it)")


@dataclass(frozen=True)
class Switches:
    """The resolved loop switches: what the model is built from."""

    injection: Injection = "none"
    entry_norm: bool = False
    internal_recall: InternalRecall = "none"
    restart: bool = False
    state_inject: StateInject = "none"
    norm: NormStyle = "pre"
    outer_norm: bool = False
    norm_affine: bool = True
    state_init: StateInit = "embed"
    state_init_std: float = 0.63
    embed_scale: bool = False


# Fully Looped Transformer family (docs/models.md, "Recurrences", restart): weightless norms, the inter-loop signal
# is the normalised loop output, logits come from it.
_FLT = dict(outer_norm=True, norm_affine=False)
_RESTART = dict(_FLT, restart=True, entry_norm=True)

RECIPES: dict[str, Switches] = {
    # plain k x L loop: h_0 = e, h_t = B(h_{t-1}); every switch at its generic default
    "looped": Switches(),
    # LT: loop 1 starts from norm(e), loop t > 1 from h^(t-1) = norm(output of loop t-1)
    "lt": Switches(**_FLT, state_init="embed"),
    # LT_i: loop t starts from norm(e + h^(t-1)); with h_0 = 0 loop 1 starts from norm(e)
    "lt_i": Switches(**_FLT, injection="add", entry_norm=True, state_init="zeros"),
    # LT_ia: stream restarts from norm(e); the first layer's queries come from h^(t-1)
    "lt_ia": Switches(**_RESTART, state_inject="query_first"),
    # FLT_res: stream restarts from norm(e); before every layer x <- norm(x + h^(t-1))
    "flt_res": Switches(**_RESTART, state_inject="stream_all"),
    # FLT: stream restarts from norm(e); every layer's queries come from h^(t-1)
    "flt": Switches(**_RESTART, state_inject="query_all"),
    # recall + outer norm, entry placement (the default placement, see recurrence.py): h_t = Norm(B(h + e))
    "recall": Switches(injection="add", outer_norm=True, state_init="zeros"),
    # internal recall + outer norm: e added to the stream before every core layer
    "recall_internal": Switches(internal_recall="layer", outer_norm=True, state_init="zeros"),
    # Huginn: e = Prelude(E(x) sqrt(d)); h_0 ~ TN(0.63); h_t = Core(Adapter([h, e])); sandwich layers
    "huginn": Switches(injection="concat", norm="sandwich", state_init="random", embed_scale=True),
    # Parcae: e = RMSNorm(Prelude(E x)); h_0 ~ TN; u = exp(delta A) h + delta B e; pre-norm core
    "parcae": Switches(injection="parcae", state_init="random"),
}


VOCAB_MULTIPLE = 128  # the padded vocabulary is the same for every TP size up to 128: TP does not change the model


def padded_vocab(vocab_size: int) -> int:
    return VOCAB_MULTIPLE * math.ceil(vocab_size / VOCAB_MULTIPLE)


def mlp_hidden(cfg: ModelConfig) -> int:
    """MLP width: `mlp_hidden` when given, else mlp_ratio x d_model rounded up to a multiple of 16 so it splits
    evenly for TP <= 16 (independent of TP)."""
    return cfg.mlp_hidden or 16 * math.ceil(cfg.mlp_ratio * cfg.d_model / 16)


def lora_targets(cfg: ModelConfig) -> tuple[str, ...]:
    """The core projections that get per-loop LoRA adapters (in LORA_TARGETS order); () when loop_lora_rank is 0."""
    if not cfg.loop_lora_rank:
        return ()
    present = tuple(t for t in LORA_TARGETS if t != "w_gate" or cfg.mlp == "swiglu")
    chosen = set(cfg.loop_lora_targets)
    if "w_gate" in chosen and cfg.mlp != "swiglu":
        raise ConfigError(f"loop_lora_targets names w_gate, which only a swiglu MLP has (mlp = {cfg.mlp})")
    return tuple(t for t in present if t in chosen) if chosen else present


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(input, output) width of each projection of a layer, by module name (whole, not per TP rank)."""
    hd, n_kv, hidden = cfg.d_model // cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, mlp_hidden(cfg)
    d, d_q, d_kv = cfg.d_model, cfg.n_heads * hd, n_kv * hd
    dims = dict(wq=(d, d_q), wk=(d, d_kv), wv=(d, d_kv), wo=(d_q, d), w_gate=(d, hidden), w_up=(d, hidden),
                w_down=(hidden, d))
    if cfg.mlp != "swiglu":
        del dims["w_gate"]
    return dims


def lora_bank(model_cfg: ModelConfig, loop_cfg: LoopConfig) -> int:
    """Adapters per (core layer, projection): one per loop index a training step can reach, i.e. the sampler's
    largest draw (`LoopConfig.depth_target`: model.loops for `fixed`, max_loops or 2 x loops - min_loops for
    `uniform`, max_loops for `poisson_lognormal`), or model.loops when the sampler is unbounded (poisson_lognormal
    without max_loops). Loop t (0-based) uses adapter min(t, bank - 1): deeper loops, in training or at test time,
    reuse the last one. 0 when loop_lora_rank is 0."""
    if not model_cfg.loop_lora_rank:
        return 0
    return loop_cfg.depth_target(model_cfg.loops) or model_cfg.loops


ROUTER_DEFAULTS = {  # (alpha, aux coeff, z coeff) when the key is null: the paper's chosen settings
    "expert_choice": (0.1, 0.001, 0.0),
    "token_choice": (1.0, 0.1, 1e-5),
}


def router_settings(cfg: ModelConfig) -> tuple[float, float, float]:
    """(alpha, aux coeff, z coeff) of `model.router`, nulls replaced by the router's defaults (`ROUTER_DEFAULTS`)."""
    alpha, aux, z = ROUTER_DEFAULTS[cfg.router]
    pick = [cfg.router_alpha, cfg.router_aux_coeff, cfg.router_z_coeff]
    return tuple(d if v is None else float(v) for v, d in zip(pick, (alpha, aux, z), strict=True))


def router_capacities(cfg: ModelConfig, loops: int) -> list[float]:
    """Expert-choice capacity of each of `loops` loops: `model.router_capacity` (a shorter list reuses its last
    entry), or the paper's default (loops - r) / loops for r = 0..loops-1. A ConfigError unless each is in (0, 1]
    and the list is non-increasing (the hierarchy: a loop keeps a subset of the previous loop's tokens)."""
    given = list(cfg.router_capacity)
    for i, c in enumerate(given):
        if not 0.0 < c <= 1.0:
            raise ConfigError(f"router_capacity[{i}] = {c} must be in (0, 1]")
        if i and c > given[i - 1]:
            raise ConfigError(f"router_capacity must be non-increasing: entry {i} ({c}) > entry {i - 1} "
                              f"({given[i - 1]})")
    if not given:
        return [(loops - r) / loops for r in range(loops)]
    return [given[min(r, len(given) - 1)] for r in range(loops)]


def require_exit_gate(cfg: ModelConfig, run) -> None:
    """`--exit-threshold` (eval, eval --task, generate) needs a run trained with the learned exit gate: a one-line
    UserError naming the run otherwise."""
    from loopstack.errors import UserError

    if not cfg.exit_gate:
        raise UserError(f"--exit-threshold: {run} was trained without the learned exit gate (model.exit_gate); "
                        "--exit-epsilon exits by convergence instead")


def resolve_switches(cfg: ModelConfig) -> Switches:
    """The recipe of `cfg.variant` with every explicitly set switch applied over it."""
    base = RECIPES[cfg.variant]
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Switches) if getattr(cfg, f.name) is not None}
    sw = dataclasses.replace(base, **given)
    if sw.restart and sw.injection != "none":
        raise ConfigError(f"injection = {sw.injection!r} has no effect when restart is true "
                          "(the stream restarts from e; the previous state enters through state_inject)")
    if sw.restart and sw.state_inject == "none":
        raise ConfigError("restart = true needs state_inject (otherwise loops after the first repeat the first)")
    return sw

"""`loopstack convert hf SRC OUT --n-core K ...`: a pretrained Llama-, Mistral-, Qwen2-, Qwen3- or GPT-2-style Hugging
Face checkpoint directory -> a loopstack run directory holding a looped model initialised from it.

    SRC layers:  [0 .. P-1]           [P .. P+M-1]                       [P+M .. L-1]
                 prelude (copied)     middle: M = n_core x G             coda (copied)
    middle layer j (0-based within the middle) is core layer j % n_core of source group j // n_core

The loop count defaults to G (the converted model then has the source's depth); `--loops L` may differ (a deeper
or shallower model to uptrain): the core is initialised from the G source groups all the same, and with per-loop
LoRA loop t starts from group min(t, G - 1)'s layers. Core layer i is shared by its group
{P + i + g * n_core : g < G}, initialised (`--init`) as

* `average`: the element-wise mean of the group's weights (projections, biases, norm weights);
* `select`: the group's first layer (P + i);
* `stepwise`: Relaxed Recursive Transformers' (Bae et al. 2024) "Stepwise" initialisation as their reference code
  implements it (`selection_initialize`): the middle layers at evenly spaced positions
  src = round(linspace(0, M - 1, n_core)) (numpy rounding, half to even), core layer i <- middle layer src[i]. The
  first and last middle layers are always picked (their paper: intermediate layers at regular intervals, the
  first and last kept); with n_core = 1 it is the first middle layer. Note that src[i] need not belong to group i.

Per-loop LoRA (`--loop-lora-rank r`, pretrain/models/lora.py: banks A [loops, r, in], B [loops, out, r], scale alpha / r
= 1 since loop_lora_alpha is left null): for loop t, core layer i and each projection W (wq wk wv wo w_gate w_up w_down;
GPT-2 has no w_gate), delta = W_layer(P + min(t, G - 1) n_core + i) - W_shared(i) (both after the RoPE sign flip below),
truncated SVD delta ~ U_r S_r V_r^T (computed in fp64), B_t = U_r sqrt(S_r), A_t = sqrt(S_r) V_r^T / scale; ranks beyond
min(out, in) stay zero. So at full rank every loop's projections equal the source layer's exactly. LoRA covers the
projection matrices only: biases and norm weights stay shared, so the looped model equals the source when those agree
within each group (or when nothing is shared: n_core = the middle layers, one loop).

Mapping to loopstack's TP=1 names (see layers.py), per layer: input_layernorm -> attn_norm, q/k/v/o_proj -> attn.wq/
wk/wv/wo (+ q/k/v biases, Qwen2), q_norm/k_norm (Qwen3: one [head_dim] vector) -> attn.q_norm/k_norm broadcast to
loopstack's per-head [n_heads, head_dim], post_attention_layernorm -> mlp_norm, gate/up/down_proj -> mlp.w_gate/w_up/
w_down; model.norm -> norm; embed_tokens -> embed (rows copied, padding rows up to the multiple of 128 zero: the
model masks them); lm_head -> lm_head unless tied.

GPT-2 (model_type gpt2; GPT2LMHeadModel's names, with or without the `transformer.` prefix that GPT2Model
checkpoints lack): wte -> embed, wpe -> pos_embed (model.position learned, max_positions = n_positions), per layer
ln_1 -> attn_norm, attn.c_attn -> attn.wq/wk/wv (split along the output into thirds), attn.c_proj -> attn.wo, ln_2 ->
mlp_norm, mlp.c_fc -> mlp.w_up, mlp.c_proj -> mlp.w_down, weights and biases each (GPT-2's Conv1D stores weights as
[in, out]: transposed); ln_f -> norm (weight and bias). The model gets norm_kind layer (LayerNorm with bias, eps
layer_norm_epsilon), mlp gelu (tanh approximation = gelu_new), qkv_bias and proj_bias, no qk-norm, no rotary (so no
sign flip); its MLP width is n_inner (default 4 x n_embd). Refused: an activation_function other than gelu_new /
gelu_pytorch_tanh, scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, scale_attn_weights false.

RoPE (the other families): HF rotates each head's halves as (x1 cos - x2 sin, x2 cos + x1 sin), loopstack's
`apply_rotary` as (x1 cos + x2 sin, x2 cos - x1 sin), the rotation by the opposite angle. Negating the second half of
every head's rows of wq and wk (and of their biases) maps one onto the other up to the sign of the second halves of q
and k, which cancels in q . k; RMS q/k norms commute with the sign flip. The equality test (tests/hf/test_convert.py)
checks it on the logits.

The run's config is a plain transformer spelled out (variant looped with every loop switch explicit: injection none,
state_init embed, pre-norm, no outer or entry norm, affine norms, no restart / state injection / internal recall /
embedding scale), qk_norm as the source, no logit soft-cap, SwiGLU with the source's intermediate size, its rms_norm_eps
and rope theta (GPT-2: the options above). `tokenizer.kind: hf` with the source's tokenizer files copied to
OUT/tokenizer. `data.*` is left at the defaults (set data.sources to train) except `data.seq_len`: the source's
max_position_embeddings (GPT-2: n_positions), at most 4096 (the context it was trained for; `harness` scores in windows
of it). `train.lr` is 3e-5, a choice: uptraining a pretrained model wants a learning rate about ten times below
pretraining's so the imported weights are not destroyed in the first steps; 100 warmup steps for the same reason.
Weights go to OUT/checkpoints/0 in fp32 as one safetensors file (`pretrain.weights.save_whole_checkpoint`).

Refused with one line naming the field: rope scaling (anything but the default rotary), sliding-window attention, biases
other than Qwen2's q/k/v, an activation other than silu, head_dim != hidden_size / num_attention_heads, partial rotary.
Weights are read with `safetensors` only (a single file or shards with model.safetensors.index.json): nothing in SRC is
executed (no pickle, no remote code). OUT must not exist or be empty; everything is written to a temporary directory
next to it and renamed at the end, so a failed convert leaves no half run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from loopstack.errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation: F.gelu(approximate="tanh")
LR = 3e-5
WARMUP = 100
# per-layer HF name (under model.layers.<j>.) -> loopstack name (under prelude.<p>. / core.<i>. / coda.<c>.)
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.w_gate.weight",
    "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
}
BIAS_MAP = {"self_attn.q_proj.bias": "attn.wq.bias", "self_attn.k_proj.bias": "attn.wk.bias",
            "self_attn.v_proj.bias": "attn.wv.bias"}
QK_NORM_MAP = {"self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight"}
# GPT-2, per layer (under h.<j>.): HF name -> loopstack name; Conv1D weights are [in, out] (transposed here), c_attn
# holds q, k and v side by side along its output
GPT2_LAYER_MAP = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_proj.weight": "attn.wo.weight", "attn.c_proj.bias": "attn.wo.bias",
    "ln_2.weight": "mlp_norm.weight", "ln_2.bias": "mlp_norm.bias",
    "mlp.c_fc.weight": "mlp.w_up.weight", "mlp.c_fc.bias": "mlp.w_up.bias",
    "mlp.c_proj.weight": "mlp.w_down.weight", "mlp.c_proj.bias": "mlp.w_down.bias",
}
LORA_KEYS = {"wq": "attn.wq.weight", "wk": "attn.wk.weight", "wv": "attn.wv.weight", "wo": "attn.wo.weight",
             "w_gate": "mlp.w_gate.weight", "w_up": "mlp.w_up.weight", "w_down": "mlp.w_down.weight"}


# --- the source ---------------------------------------------------------------------------------------------

class Source:
    """SRC/config.json checked against what loopstack's layers can represent, and its architecture numbers."""

    def __init__(self, src: Path):
        self.dir = src
        path = src / "config.json"
        if not src.is_dir():
            raise UserError(f"{src}: not a directory (convert hf wants a local Hugging Face checkpoint directory; "
                            f"nothing is downloaded)")
        if not path.is_file():
            raise UserError(f"{path}: missing (a Hugging Face checkpoint directory holds config.json and "
                            f"*.safetensors)")
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot read ({err})") from None
        if not isinstance(hf, dict):
            raise UserError(f"{path}: expected a JSON object")
        self.hf, self.path = hf, path
        mt = hf.get("model_type")
        if mt not in SUPPORTED:
            raise UserError(f"{path}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
        self.model_type = mt
        # the options GPT-2 alone uses (loopstack's defaults otherwise)
        self.mlp, self.norm_kind, self.position, self.proj_bias = "swiglu", "rms", "rope", False
        if mt == "gpt2":
            self._gpt2()
            return
        self.n_layers = self._int("num_hidden_layers")
        self.d_model = self._int("hidden_size")
        self.n_heads = self._int("num_attention_heads")
        self.n_kv_heads = int(hf.get("num_key_value_heads") or self.n_heads)
        self.mlp_hidden = self._int("intermediate_size")
        self.vocab_size = self._int("vocab_size")
        self.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
        self.tie = bool(hf.get("tie_word_embeddings", False))
        self.max_positions = int(hf.get("max_position_embeddings") or 0)
        self.qkv_bias = mt == "qwen2"
        self.qk_norm = mt == "qwen3"
        if self.d_model % self.n_heads:
            raise UserError(f"{path}: hidden_size {self.d_model} is not divisible by num_attention_heads "
                            f"{self.n_heads}")
        self.head_dim = self.d_model // self.n_heads
        if hf.get("head_dim") not in (None, self.head_dim):
            raise UserError(f"{path}: head_dim = {hf['head_dim']} differs from hidden_size / num_attention_heads = "
                            f"{self.head_dim}; loopstack's attention needs them equal")
        self.rope_theta = self._rope()
        self._refusals()

    def _gpt2(self) -> None:
        """GPT-2's config.json (n_embd, n_layer, n_head, n_inner, n_positions, layer_norm_epsilon) and refusals."""
        hf, path = self.hf, self.path
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise UserError(f"{path}: activation_function = {act!r}: loopstack's GELU MLP is the tanh approximation "
                            f"({' or '.join(GPT2_ACTIVATIONS)})")
        for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                         ("scale_attn_weights", False)):
            if bool(hf.get(key, not bad)) == bad:
                raise UserError(f"{path}: {key} = {str(bad).lower()} is not supported (loopstack's attention scales "
                                f"scores by 1 / sqrt(head_dim), in the model's dtype)")
        self.n_layers = self._int("n_layer")
        self.d_model = self._int("n_embd")
        self.n_heads = self._int("n_head")
        self.n_kv_heads = self.n_heads
        self.mlp_hidden = self._int("n_inner") if hf.get("n_inner") is not None else 4 * self.d_model
        self.vocab_size = self._int("vocab_size")
        self.max_positions = self._int("n_positions")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise UserError(f"{path}: layer_norm_epsilon = {eps!r}: expected a number >= 0")
        self.norm_eps = float(eps)
        self.tie = bool(hf.get("tie_word_embeddings", True))
        self.qkv_bias, self.qk_norm, self.rope_theta = True, False, 10000.0
        self.mlp, self.norm_kind, self.position, self.proj_bias = "gelu", "layer", "learned", True
        if self.d_model % self.n_heads:
            raise UserError(f"{path}: n_embd {self.d_model} is not divisible by n_head {self.n_heads}")
        self.head_dim = self.d_model // self.n_heads

    def _int(self, key: str) -> int:
        value = self.hf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{self.path}: {key} = {value!r}: expected a positive integer")
        return value

    def _rope(self) -> float:
        """rope theta; anything but the default rotary (scaling of any kind, partial rotary) is refused."""
        hf, path = self.hf, self.path
        params = hf.get("rope_parameters")
        theta = hf.get("rope_theta")
        if isinstance(params, dict):
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default":
                raise UserError(f"{path}: rope_parameters.rope_type = {kind!r}: only the default rotary embedding "
                                f"is supported (no rope scaling)")
            theta = params.get("rope_theta", theta)
            if params.get("partial_rotary_factor", 1.0) != 1.0:
                raise UserError(f"{path}: rope_parameters.partial_rotary_factor = "
                                f"{params['partial_rotary_factor']}: only full rotary is supported")
        scaling = hf.get("rope_scaling")
        if scaling and (not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "default"):
            raise UserError(f"{path}: rope_scaling = {json.dumps(scaling)}: only the default rotary embedding is "
                            f"supported (no rope scaling)")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError(f"{path}: partial_rotary_factor = {hf['partial_rotary_factor']}: only full rotary is "
                            f"supported")
        if theta is None:
            theta = 10000.0
        if not isinstance(theta, (int, float)) or theta <= 1:
            raise UserError(f"{path}: rope_theta = {theta!r}: expected a number > 1")
        return float(theta)

    def _refusals(self) -> None:
        hf, path = self.hf, self.path
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{path}: hidden_act = {act!r}: loopstack's SwiGLU uses silu")
        if hf.get("attention_bias"):
            raise UserError(f"{path}: attention_bias = true: biases on every attention projection (o_proj included) "
                            f"are not supported (only Qwen2's q/k/v biases)")
        if hf.get("mlp_bias"):
            raise UserError(f"{path}: mlp_bias = true: MLP biases are not supported")
        window = hf.get("sliding_window")
        uses_window = hf.get("use_sliding_window", self.model_type == "mistral")
        if window and uses_window:
            raise UserError(f"{path}: sliding_window = {window}: sliding-window attention is not supported "
                            f"(loopstack attends to every earlier position)")
        kinds = set(hf.get("layer_types") or [])
        if kinds - {"full_attention"}:
            raise UserError(f"{path}: layer_types has {sorted(kinds - {'full_attention'})}: only full attention is "
                            f"supported")


class Weights:
    """The source's tensors by HF name, read lazily with `safetensors` (one file, or shards through
    model.safetensors.index.json), returned as fp32."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        index = src / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UserError(f"{index}: cannot read the weight map ({err})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise UserError(f"{src}: no *.safetensors weights (pytorch_model.bin is not read: it is a pickle)")
        self.handles, self.where = {}, {}
        for name in files:
            path = src / name
            if not path.is_file():
                raise UserError(f"{index}: names {name}, which is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise UserError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
            self.handles[name] = handle
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    self.where[key] = name
        self.src = src

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.where:
            raise UserError(f"{self.src}: weight {key} is missing from the safetensors files")
        t = self.handles[self.where[key]].get_tensor(key).to(torch.float32)
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{self.src}: weight {key} has shape {list(t.shape)}, config.json implies {list(shape)}")
        return t


# --- the plan ---------------------------------------------------------------------------------------------------

def plan_layers(n_layers: int, n_core: int, n_prelude: int | None, n_coda: int | None, loops: int | None,
                init: str = "stepwise", lora_rank: int = 0) -> tuple[int, int, int, int]:
    """(prelude, core, coda, loops) for a source of `n_layers` layers, or a UserError. The middle layers must form
    whole groups of n_core (`stepwise` without LoRA excepted: it picks n_core of them wherever they are)."""
    p, c = n_prelude or 0, n_coda or 0
    for flag, value in (("--n-core", n_core), ("--n-prelude", p), ("--n-coda", c)):
        if value < 0 or (flag == "--n-core" and value < 1):
            raise UserError(f"{flag} {value}: expected {'>= 1' if flag == '--n-core' else '>= 0'}")
    middle = n_layers - p - c
    if middle < n_core:
        raise UserError(f"--n-prelude {p} + --n-coda {c} leave {middle} of the source's {n_layers} layers, fewer "
                        f"than --n-core {n_core}")
    whole_groups = loops is None or init != "stepwise" or lora_rank > 0
    if whole_groups and middle % n_core:
        why = "to set the loop count" if loops is None else f"for --init {init}" if init != "stepwise" else \
            "for per-loop LoRA"
        raise UserError(f"the {middle} middle layers ({n_layers} - prelude {p} - coda {c}) are not a multiple "
                        f"of --n-core {n_core} ({why})")
    if loops is None:
        loops = middle // n_core
    if loops < 1:
        raise UserError(f"--loops {loops}: expected >= 1")
    return p, n_core, c, loops


def stepwise_sources(middle: int, n_core: int) -> list[int]:
    """Middle-layer index for each core layer under `stepwise`: round(linspace(0, middle - 1, n_core))."""
    return [int(x) for x in np.round(np.linspace(0, middle - 1, n_core))]


def core_sources(init: str, prelude: int, n_core: int, middle: int) -> list[list[int]]:
    """For each core layer, the source layers whose weights it is initialised from (averaged when several)."""
    if init == "average":
        return [[prelude + i + g * n_core for g in range(middle // n_core)] for i in range(n_core)]
    if init == "select":
        return [[prelude + i] for i in range(n_core)]
    if init == "stepwise":
        return [[prelude + j] for j in stepwise_sources(middle, n_core)]
    raise UserError(f"--init {init}: expected average, select or stepwise")


MAX_SEQ_LEN = 4096  # data.seq_len of a converted run: the source's max_position_embeddings up to this


def build_config(source: Source, out: Path, prelude: int, n_core: int, coda: int, loops: int, lora_rank: int):
    """The run's RunConfig: a plain transformer written out switch by switch (see the module docstring)."""
    from loopstack.typed_config import to_dict
    from pretrain.config import RunConfig, config_from_dict

    cfg = RunConfig()
    cfg.name = out.name
    cfg.tokenizer.kind = "hf"
    cfg.tokenizer.dir = str((out / "tokenizer").resolve())
    m = cfg.model
    m.variant, m.loops, m.n_prelude, m.n_core, m.n_coda = "looped", loops, prelude, n_core, coda
    m.d_model, m.n_heads, m.n_kv_heads = source.d_model, source.n_heads, source.n_kv_heads
    m.vocab_size, m.mlp, m.mlp_hidden = source.vocab_size, source.mlp, source.mlp_hidden
    m.qkv_bias, m.qk_norm = source.qkv_bias, source.qk_norm
    m.proj_bias, m.norm_kind = source.proj_bias, source.norm_kind
    if source.position == "learned":  # GPT-2: its position table, and no more positions than it has
        m.max_positions, m.position = source.max_positions, "learned"
    m.norm_eps, m.rope_theta = source.norm_eps, source.rope_theta
    m.tie_embeddings, m.logit_softcap = source.tie, 0.0
    m.injection, m.state_init, m.norm, m.outer_norm, m.entry_norm = "none", "embed", "pre", False, False
    m.norm_affine, m.restart, m.state_inject, m.internal_recall, m.embed_scale = True, False, "none", "none", False
    m.loop_lora_rank, m.loop_lora_alpha = lora_rank, None
    cfg.train.lr, cfg.train.warmup_steps = LR, WARMUP
    if source.max_positions:  # the context the source was trained for (also the harness's window), at most 4096
        cfg.data.seq_len = max(8, min(source.max_positions, MAX_SEQ_LEN))
    try:
        return config_from_dict(to_dict(cfg), "converted config")  # every check the trainer runs
    except Exception as err:  # noqa: BLE001 - ConfigError and friends: one line
        raise UserError(f"{source.path}: the converted config is invalid: {err}") from None


# --- the weights --------------------------------------------------------------------------------------------------

def _flip_rope(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Negate the second half of every head's rows (wq / wk weights or biases): HF's rotary -> loopstack's."""
    t = t.clone()
    v = t.view(n_heads, head_dim, *t.shape[1:])
    v[:, head_dim // 2:] *= -1
    return t


def gpt2_prefix(w: Weights) -> str:
    """"transformer." for GPT2LMHeadModel checkpoints, "" for GPT2Model ones (the hub's original gpt2)."""
    return "transformer." if "transformer.wte.weight" in w else ""


def gpt2_layer(w: Weights, s: Source, j: int) -> dict[str, torch.Tensor]:
    """GPT-2 layer j under loopstack's per-layer names: Conv1D weights transposed, c_attn split into q, k, v."""
    d, f, pre = s.d_model, s.mlp_hidden, f"{gpt2_prefix(w)}h.{j}."
    shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
              "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "mlp.c_fc.weight": (d, f),
              "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,)}
    layer = {}
    for theirs, ours in GPT2_LAYER_MAP.items():
        t = w.get(pre + theirs, shapes[theirs])
        layer[ours] = t.t().contiguous() if t.dim() == 2 else t
    qkv = w.get(pre + "attn.c_attn.weight", (d, 3 * d)).t()
    qkv_bias = w.get(pre + "attn.c_attn.bias", (3 * d,))
    for i, name in enumerate(("wq", "wk", "wv")):
        layer[f"attn.{name}.weight"] = qkv[i * d:(i + 1) * d].contiguous()
        layer[f"attn.{name}.bias"] = qkv_bias[i * d:(i + 1) * d].clone()
    return layer


def source_layer(w: Weights, s: Source, j: int) -> dict[str, torch.Tensor]:
    """Source layer j under loopstack's per-layer names, RoPE sign flip applied, q/k norms per head."""
    if s.model_type == "gpt2":
        return gpt2_layer(w, s, j)
    d, hd, nq, nkv, f = s.d_model, s.head_dim, s.n_heads, s.n_kv_heads, s.mlp_hidden
    shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
              "self_attn.q_proj.weight": (nq * hd, d), "self_attn.k_proj.weight": (nkv * hd, d),
              "self_attn.v_proj.weight": (nkv * hd, d), "self_attn.o_proj.weight": (d, nq * hd),
              "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
              "self_attn.q_proj.bias": (nq * hd,), "self_attn.k_proj.bias": (nkv * hd,),
              "self_attn.v_proj.bias": (nkv * hd,), "self_attn.q_norm.weight": (hd,),
              "self_attn.k_norm.weight": (hd,)}
    names = dict(LAYER_MAP)
    if s.qkv_bias:
        names.update(BIAS_MAP)
    if s.qk_norm:
        names.update(QK_NORM_MAP)
    layer = {ours: w.get(f"model.layers.{j}.{theirs}", shapes[theirs]) for theirs, ours in names.items()}
    for key, heads in (("attn.wq.weight", nq), ("attn.wk.weight", nkv), ("attn.wq.bias", nq), ("attn.wk.bias", nkv)):
        if key in layer:
            layer[key] = _flip_rope(layer[key], heads, hd)
    if s.qk_norm:
        layer["attn.q_norm.weight"] = layer["attn.q_norm.weight"][None].repeat(nq, 1)
        layer["attn.k_norm.weight"] = layer["attn.k_norm.weight"][None].repeat(nkv, 1)
    return layer


def svd_lora(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) with scale x B A = the best rank-`rank` approximation of `delta`."""
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, sv.numel())
    root = sv[:r].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:r] = root[:, None] * vh[:r] / scale
    b[:, :r] = u[:, :r] * root[None, :]
    return a.float(), b.float()


def convert_state(w: Weights, s: Source, cfg, init: str, say=print) -> dict[str, torch.Tensor]:
    """The loopstack state dict (TP=1 names, fp32) of the looped model `cfg` describes, from the source weights."""
    from pretrain.models.config import lora_bank, lora_targets, padded_vocab

    m = cfg.model
    p, k, c, loops = m.n_prelude, m.n_core, m.n_coda, m.loops
    middle = s.n_layers - p - c
    groups_n = middle // k  # whole source groups of k middle layers
    vocab, padded = s.vocab_size, padded_vocab(s.vocab_size)
    state: dict[str, torch.Tensor] = {}
    gpt2 = s.model_type == "gpt2"
    pre = gpt2_prefix(w) if gpt2 else "model."
    embed = torch.zeros(padded, s.d_model)
    embed[:vocab] = w.get(pre + ("wte.weight" if gpt2 else "embed_tokens.weight"), (vocab, s.d_model))
    state["embed.weight"] = embed
    if gpt2:
        state["pos_embed.weight"] = w.get(pre + "wpe.weight", (s.max_positions, s.d_model))
    if not s.tie:
        head = torch.zeros(padded, s.d_model)
        head[:vocab] = w.get("lm_head.weight", (vocab, s.d_model))
        state["lm_head.weight"] = head
    if gpt2:
        state["norm.weight"] = w.get(pre + "ln_f.weight", (s.d_model,))
        state["norm.bias"] = w.get(pre + "ln_f.bias", (s.d_model,))
    else:
        state["norm.weight"] = w.get("model.norm.weight", (s.d_model,))
    layers: dict[int, dict[str, torch.Tensor]] = {}

    def layer(j: int) -> dict[str, torch.Tensor]:
        if j not in layers:
            layers[j] = source_layer(w, s, j)
        return layers[j]

    for i in range(p):
        state.update({f"prelude.{i}.{n}": t for n, t in layer(i).items()})
        say(f"  prelude {i} <- layer {i}")
    groups = core_sources(init, p, k, middle)
    shared: list[dict[str, torch.Tensor]] = []
    for i, group in enumerate(groups):
        members = [layer(j) for j in group]
        mean = {n: torch.stack([mem[n] for mem in members]).mean(0) for n in members[0]}
        shared.append(mean)
        state.update({f"core.{i}.{n}": t for n, t in mean.items()})
        runs = ", ".join(str(p + i + t * k) for t in range(min(loops, groups_n)))
        runs += f" (loops {groups_n + 1}..{loops}: deeper than the source)" if loops > groups_n else ""
        what = f"average of layers {', '.join(map(str, group))}" if len(group) > 1 else f"layer {group[0]}"
        say(f"  core {i} <- {what} ({init}; runs as layers {runs})")
    for i in range(c):
        j = p + middle + i
        state.update({f"coda.{i}.{n}": t for n, t in layer(j).items()})
        say(f"  coda {i} <- layer {j}")
    rank = m.loop_lora_rank
    if rank:
        scale = (rank if m.loop_lora_alpha is None else m.loop_lora_alpha) / rank
        bank, targets = lora_bank(m, cfg.loop), lora_targets(m)
        err_num = err_den = 0.0
        for i in range(k):
            for name in targets:
                key = LORA_KEYS[name]
                a_bank, b_bank = [], []
                for t in range(bank):
                    delta = layer(p + min(t, groups_n - 1) * k + i)[key] - shared[i][key]
                    a, b = svd_lora(delta, rank, scale)
                    a_bank.append(a)
                    b_bank.append(b)
                    err_num += float((delta - scale * b @ a).square().sum())
                    err_den += float(delta.square().sum())
                state[f"loop_lora.{i}.{name}.A"] = torch.stack(a_bank)
                state[f"loop_lora.{i}.{name}.B"] = torch.stack(b_bank)
        rel = (err_num / err_den) ** 0.5 if err_den > 0 else 0.0
        say(f"  loop LoRA rank {rank} on {', '.join(targets)}: loop t, core i <- truncated SVD of layer "
            f"{p} + min(t, {groups_n - 1}) x {k} + i minus core i (relative residual {rel:.3g})")
    return state


# --- the command ------------------------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty; choose a new output directory")


def run_convert(args: argparse.Namespace) -> int:
    """`loopstack convert hf`: read SRC, plan and map the layers, write OUT (config, tokenizer, checkpoint)."""
    from data_pipeline.tokenizer import HF_FILE, load_hf_tokenizer
    from loopstack.typed_config import to_dict
    from pretrain.config import save_config
    from pretrain.weights import save_whole_checkpoint

    src, out = Path(args.src), Path(args.out)
    _check_out(out)
    source = Source(src)
    p, k, c, loops = plan_layers(source.n_layers, args.n_core, args.n_prelude, args.n_coda, args.loops, args.init,
                                 args.loop_lora_rank)
    if args.loop_lora_rank < 0:
        raise UserError(f"--loop-lora-rank {args.loop_lora_rank}: expected >= 0")
    if args.loop_lora_rank and loops == 1:
        print("convert: one loop: every core layer is its source layer, the per-loop LoRA starts at zero", flush=True)
    if not (src / HF_FILE).is_file():
        raise UserError(f"{src}: no {HF_FILE} (a Hugging Face fast tokenizer); convert uses the source's tokenizer")
    tokenizer = load_hf_tokenizer(src)
    if tokenizer.vocab_size > source.vocab_size:
        raise UserError(f"{src / HF_FILE}: {tokenizer.vocab_size} tokens, more than config.json's vocab_size "
                        f"{source.vocab_size}")
    weights = Weights(src)
    cfg = build_config(source, out, p, k, c, loops, args.loop_lora_rank)
    print(f"convert: {source.model_type} {src} ({source.n_layers} layers, d_model {source.d_model}, "
          f"{source.n_heads} heads / {source.n_kv_heads} kv, mlp {source.mlp_hidden}, vocab {source.vocab_size}, "
          f"{'tied' if source.tie else 'untied'} head) -> prelude {p} + core {k} x {loops} loops + coda {c}",
          flush=True)
    state = convert_state(weights, source, cfg, args.init)
    tmp = out.parent / f".{out.name}.convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tokenizer.copy_to(tmp / "tokenizer")
        save_config(cfg, tmp / "config.yaml")
        save_whole_checkpoint(tmp, state, to_dict(cfg), tokenizer.sha256, step=0)
        _check_out(out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(t.numel() for t in state.values())
    print(f"convert: wrote {out / 'config.yaml'}, {out / 'checkpoints' / '0'} ({n_params / 1e6:.1f}M parameters, "
          f"fp32) and {out / 'tokenizer'}", flush=True)
    print("next:", flush=True)
    print(f"  loopstack generate {out} --prompt 'Once upon a time'", flush=True)
    print(f"  loopstack train {out / 'config.yaml'} --set 'data.sources=[PATH]' --set train.init_from={out} "
          f"--set train.steps=1000", flush=True)
    return 0

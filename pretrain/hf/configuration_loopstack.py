"""The configuration of a loopstack looped transformer as a Hugging Face `PreTrainedConfig` (model_type "loopstack").

`loopstack export hf` writes this file next to config.json; transformers imports it from there
(`trust_remote_code=True`), so it imports only transformers, never loopstack. The fields are loopstack's
`model:` section with every loop switch resolved (the variant's recipe applied), plus what the checkpoint adds:

    vocab_size            rows of the embedding / logits (loopstack pads the vocabulary to a multiple of 128)
    tokenizer_vocab_size  the real vocabulary (model.vocab_size, else the tokenizer's): higher ids are padding,
                          their logits -inf
    mlp_hidden            the MLP width, resolved
    norm_kind             rms (RMSNorm) | layer (LayerNorm with weight and bias): every norm but the QK-norm
    position              rope (rotary) | learned (absolute embeddings [max_positions, d_model] added to the input)
    proj_bias             biases on wo and the MLP projections (qkv_bias: on wq, wk, wv)
    n_kv_heads            key/value heads, resolved (never 0)
    loop_lora_*           per-loop LoRA: rank, scale (alpha / r), the adapted projections, the bank size
    noise_seed            the seed of the random initial state h_0 (huginn / parcae: state_init random)
    exit_gate             the model has a learned exit gate (exit_gate.weight / .bias): its weights are kept, but
                          this code always runs `loops` loops (the threshold-1 forward of loopstack)

`loops` is the loop count the model runs; set it when loading to run another depth:
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True, loops=8)`. The KV cache has one slot per
(loop, layer): `num_hidden_layers` is n_prelude + loops * n_core + n_coda, a property, so it follows `loops`
(`DynamicCache(config=)` makes exactly that many slots).
"""

from __future__ import annotations

from dataclasses import field

from transformers import PreTrainedConfig

INJECTIONS = ("none", "add", "concat", "parcae")
STATE_INJECT = ("none", "query_first", "query_all", "stream_all")
INTERNAL_RECALL = ("none", "layer", "mlp", "sublayer")
STATE_INIT = ("zeros", "embed", "random")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class LoopstackConfig(PreTrainedConfig):
    """A looped LM: embedding -> prelude -> core block x loops -> coda -> norm -> head (see modeling_loopstack)."""

    model_type = "loopstack"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "rms_norm_eps": "norm_eps"}

    variant: str = "looped"
    vocab_size: int = 128
    tokenizer_vocab_size: int = 128
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    n_prelude: int = 0
    n_core: int = 2
    n_coda: int = 0
    loops: int = 4
    mlp: str = "relu2"
    mlp_hidden: int = 1024
    qkv_bias: bool = False
    proj_bias: bool = False
    norm_kind: str = "rms"
    position: str = "rope"
    max_positions: int = 0
    qk_norm: bool = True
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    logit_softcap: float = 0.0
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # the loop switches, resolved (loopstack's pretrain/models/config.py, `Switches`)
    injection: str = "none"
    entry_norm: bool = False
    internal_recall: str = "none"
    restart: bool = False
    state_inject: str = "none"
    norm: str = "pre"
    outer_norm: bool = False
    norm_affine: bool = True
    state_init: str = "embed"
    state_init_std: float = 0.63
    embed_scale: bool = False
    # per-loop LoRA on the core block
    loop_lora_rank: int = 0
    loop_lora_scale: float = 1.0
    loop_lora_targets: list[str] = field(default_factory=list)
    loop_lora_bank: int = 0
    noise_seed: int = 0
    # the learned exit gate's weights (model.exit_gate): carried, not used here (this code runs every loop)
    exit_gate: bool = False
    # no weight is tied by transformers: a tied head reads embed.weight directly (there is no lm_head then)
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """Inconsistent fields fail at load, naming the field, instead of as a shape error deep in forward."""
        if self.d_model % self.n_heads or (self.position == "rope" and (self.d_model // self.n_heads) % 2):
            raise ValueError(f"d_model = {self.d_model} must be n_heads = {self.n_heads} times a head dim (even "
                             "with rotary)")
        if self.position == "learned" and int(self.max_positions) < 1:
            raise ValueError(f"max_positions = {self.max_positions}: position learned needs >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads = {self.n_kv_heads} does not divide n_heads = {self.n_heads}")
        if int(self.loops) < 1:
            raise ValueError(f"loops = {self.loops}: must be >= 1")
        for name, value, allowed in (("injection", self.injection, INJECTIONS),
                                     ("state_inject", self.state_inject, STATE_INJECT),
                                     ("internal_recall", self.internal_recall, INTERNAL_RECALL),
                                     ("state_init", self.state_init, STATE_INIT),
                                     ("norm", self.norm, ("pre", "sandwich")),
                                     ("mlp", self.mlp, ("swiglu", "relu2", "gelu")),
                                     ("norm_kind", self.norm_kind, ("rms", "layer")),
                                     ("position", self.position, ("rope", "learned"))):
            if value not in allowed:
                raise ValueError(f"{name} = {value!r}: expected one of {', '.join(allowed)}")
        unknown = [t for t in self.loop_lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"loop_lora_targets: unknown projections {unknown}")

    @property
    def num_hidden_layers(self) -> int:
        """KV-cache slots: one per prelude layer, per (loop, core layer) and per coda layer."""
        return self.n_prelude + int(self.loops) * self.n_core + self.n_coda

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


LoopstackConfig.register_for_auto_class()  # save_pretrained writes auto_map.AutoConfig and copies this file

__all__ = ["LoopstackConfig"]

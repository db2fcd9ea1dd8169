"""Config sections owned by the model family: `model` (architecture) and `loop` (depth in training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loopstack.typed_config import param

Variant = Literal["looped", "lt", "lt_i", "lt_ia", "flt_res", "flt", "recall", "huginn", "parcae"]


@dataclass
class ModelConfig:
    """The looped LM: embedding -> prelude -> core x loops -> coda -> norm -> head."""

    variant: Variant = param("flt", help="named recipe; 'looped' uses the switches below as given")
    loops: int = param(4, min=1, help="core-block iterations (mean depth when sampled)")
    d_model: int = param(256, min=8, help="hidden size")
    n_heads: int = param(4, min=1, help="attention heads")
    n_kv_heads: int = param(0, min=0, help="key/value heads for GQA; 0 = n_heads")
    n_prelude: int = param(0, min=0, help="ordinary layers before the loop")
    n_core: int = param(2, min=1, help="layers in the looped block")
    n_coda: int = param(0, min=0, help="ordinary layers after the loop")
    vocab_size: int = param(0, min=0, help="0 = the tokenizer's vocabulary size")
    mlp: Literal["swiglu", "relu2"] = param("relu2", help="MLP type")
    mlp_ratio: float = param(4.0, min=0.5, help="MLP hidden size / d_model")
    tie_embeddings: bool = param(True, help="head shares the embedding matrix")
    qk_norm: bool = param(True, help="RMSNorm on queries and keys")
    logit_softcap: float = param(0.0, min=0.0, help="c * tanh(z / c) on logits; 0 = off")
    rope_theta: float = param(10000.0, min=1.0, help="rotary base")
    init_std: float = param(0.02, min=0.0, help="std of weight init")


@dataclass
class LoopConfig:
    """How many loops a training step runs and which of them carry gradient and loss."""

    sampler: Literal["fixed", "poisson_lognormal", "uniform"] = param("fixed", help="depth per step")
    min_loops: int = param(1, min=1, help="lower bound for the uniform sampler")
    max_loops: int = param(0, min=0, help="upper bound for the samplers; 0 = unbounded/2 x loops")
    sigma: float = param(0.5, min=0.0, help="lognormal std of the Poisson rate (Huginn: 0.5)")
    backprop_loops: int = param(0, min=0, help="gradient through the last k loops only; 0 = all")
    loss_on: Literal["last", "all", "last_third"] = param("last", help="which loops feed the loss")

"""Looped transformer family built on megatron-core tensor-parallel layers.

    from pretrain.models import build_model, param_roles, count_parameters
    model = build_model(cfg.model, cfg.loop, vocab_size, activation_checkpointing="loop")
    out = model(tokens, labels, loops=8, backprop_loops=4, diagnostics=True)   # LoopedOutput

Files: config.py (sections, recipes), layers.py (norms, rotary, attention, MLP, `declare_role`), recurrence.py
(one module per recurrence family: what one loop does with the input and the previous state; `REGISTRY`),
lora.py (per-loop LoRA on the core), looped.py (the model and its loop driver), diagnostics.py (per-loop health,
early exit), depth.py (loop-count sampling), flops.py (FLOPs per token), generate.py (KV cache, generation),
attention.py (FlexAttention document masks, `model.attention: flex`).
docs/models.md describes the recurrences and how to add one.

Names are imported lazily: `pretrain.config` reads `pretrain.models.config` without paying for torch/megatron.
"""

from importlib import import_module

_EXPORTS = {
    "ModelConfig": "config", "LoopConfig": "config", "Switches": "config", "resolve_switches": "config",
    "build_model": "looped", "LoopedLM": "looped", "LoopedOutput": "looped", "LoopDiagnostics": "diagnostics",
    "param_roles": "looped", "count_parameters": "looped",
    "sample_loops": "depth", "depth_for_step": "depth", "Depth": "depth",
    "flops_per_token": "flops", "FlopsBreakdown": "flops",
    "KVCache": "generate", "generate": "generate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"pretrain.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pretrain.models' has no attribute {name!r}")

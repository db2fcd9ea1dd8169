"""Tiny configs and builders shared by the model tests (importable from spawned test processes)."""

from __future__ import annotations

import torch

from pretrain.models.config import RECIPES, LoopConfig, ModelConfig

VARIANTS = list(RECIPES)
VOCAB = 100  # padded to 128: exercises the padded-vocabulary mask


def tiny(variant: str, **kw) -> ModelConfig:
    """d_model 32, 2 heads, 2 core layers, 3 loops; Huginn and Parcae get a prelude and a coda layer."""
    base = dict(variant=variant, loops=3, d_model=32, n_heads=2, n_core=2, logit_softcap=15.0)
    if variant in ("huginn", "parcae"):
        base.update(n_prelude=1, n_coda=1, mlp="swiglu")
    base.update(kw)
    return ModelConfig(**base)


# GPT-2-style options: LayerNorm with biases, learned absolute positions, non-gated GELU MLP, biases on every
# projection, no QK-norm (what `convert hf` makes of a GPT-2 checkpoint)
GPT2_LIKE = dict(norm_kind="layer", position="learned", max_positions=64, mlp="gelu", proj_bias=True, qkv_bias=True,
                 qk_norm=False, norm_eps=1e-5)


def gpt2_like(variant: str = "looped", **kw) -> ModelConfig:
    """`tiny(variant)` with the GPT-2-style options (`GPT2_LIKE`), overridable."""
    return tiny(variant, **{**GPT2_LIKE, **kw})


def randomise_biases_and_norms(model, seed: int = 0, std: float = 0.3) -> None:
    """Biases N(0, std), LayerNorm / RMSNorm weights N(1, std) (they start at 0 and 1: a test would not see a
    wrong placement). TP=1 only (a sharded bias would get another draw than its whole tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.optim_role in ("bias", "norm"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std + (p.optim_role == "norm"))


def build(cfg: ModelConfig, loop_cfg: LoopConfig | None = None, *, seed: int = 0, vocab: int = VOCAB, **kw):
    from pretrain.models import build_model

    torch.manual_seed(seed)
    return build_model(cfg, loop_cfg or LoopConfig(), vocab, **kw)


def batch(B: int = 2, T: int = 16, vocab: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def tp2_then_tp1(run_tp2, cases, run_tp1=None):
    """In a 2-process test body: every case at TP=2, then again at TP=1 in the same processes (each rank a whole
    model). Returns (env, tp2 results, tp1 results)."""
    from megatron.core import parallel_state as ps

    from pretrain.distributed import init_distributed

    env = init_distributed(tp=2, seed=0)
    tp2 = [run_tp2(c) for c in cases]
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, create_gloo_process_groups=False)
    tp1 = [(run_tp1 or run_tp2)(c) for c in cases]
    return env, tp2, tp1


def assert_checkpointing_exact(make_model, tokens, labels) -> None:
    """Models from `make_model(activation_checkpointing)` for none / loop / layer: the same loss bit for bit and
    the same gradients (fp32 tolerance: recomputation may reorder a sum)."""
    results = {}
    for ckpt in ("none", "loop", "layer"):
        model = make_model(ckpt)
        out = model(tokens, labels)
        out.loss.backward()
        results[ckpt] = (out.loss.detach(), grads(model))
    loss0, g0 = results["none"]
    for ckpt in ("loop", "layer"):
        loss, g = results[ckpt]
        assert torch.equal(loss, loss0)
        assert g.keys() == g0.keys()
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=1e-6, atol=1e-9, msg=f"{ckpt}: gradient of {n}")

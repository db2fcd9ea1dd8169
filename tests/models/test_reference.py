"""The model against an independent plain-torch reference (tests/models/reference.py) with its weights copied in.
Both run in float64 so that the tolerance is far below the differences between variants."""

import pytest
import torch
import torch.nn.functional as F

from tests.models.helpers import (
    VARIANTS,
    VOCAB,
    batch,
    build,
    gpt2_like,
    grads,
    randomise_biases_and_norms,
    tiny,
)
from tests.models.reference import Reference, rms


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def _compare_grads(model, W, atol=1e-6):  # the cross-entropy runs in fp32: gradients agree to ~1e-7
    got = grads(model)
    assert set(got) == {n for n, w in W.items() if w.grad is not None}
    for name, g in got.items():
        torch.testing.assert_close(g, W[name].grad, rtol=1e-4, atol=atol, msg=f"gradient of {name}")


def _assert_matches(model, out, W, z, labels) -> None:
    """The model's logits (out.logits), loss and every gradient equal the reference's: z its logits, W its leaf
    weights (the model's loss must have been backpropagated already)."""
    torch.testing.assert_close(out.logits[..., :VOCAB], z, rtol=1e-9, atol=1e-9)
    loss = F.cross_entropy(z.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6, check_dtype=False)
    loss.backward()
    _compare_grads(model, W)


@pytest.mark.parametrize("mlp,n_kv,tied", [("relu2", 0, True), ("swiglu", 1, False)])
def test_one_loop_without_injection_is_a_plain_transformer(tp1, mlp, n_kv, tied):
    cfg = tiny("looped", loops=1, n_prelude=1, n_coda=1, mlp=mlp, n_kv_heads=n_kv, tie_embeddings=tied,
               init_std=0.3)
    model = build(cfg, dtype=torch.float64)
    tokens, labels = batch()
    out = model(tokens, labels, return_logits=True)
    out.loss.backward()

    W = _weights(model)
    ref = Reference(W, cfg, VOCAB)
    x = W["embed.weight"][tokens]
    for prefix, n in (("prelude", 1), ("core", 2), ("coda", 1)):  # one stack of 4 ordinary layers
        x = ref.stack(prefix, n, x)
    z = rms_head(ref, x, W, cfg)
    _assert_matches(model, out, W, z, labels)


def rms_head(ref, x, W, cfg):
    head = W["embed.weight"] if cfg.tie_embeddings else W["lm_head.weight"]
    z = rms(x, W.get("norm.weight")) @ head.T
    return (cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap))[..., :VOCAB]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_design_equations(tp1, variant):
    """Forward of every recipe at 3 loops equals the equations of docs/models.md; with truncated backprop (last 2
    loops) the gradients equal those of the reference with the first loop detached."""
    extra = dict(state_init="zeros") if variant in ("huginn", "parcae") else {}  # reference uses h_0 = 0
    cfg = tiny(variant, init_std=0.3, **extra)  # large weights: at 0.02 every loop is near-identity and
    # variants differ by ~1e-6 (FLT vs LT_ia), below any fair tolerance
    model = build(cfg, dtype=torch.float64)
    tokens, labels = batch(seed=1)
    out = model(tokens, labels, backprop_loops=2, return_logits=True)
    out.loss.backward()

    W = _weights(model)
    z = Reference(W, cfg, VOCAB).logits(tokens, variant, loops=3, backprop_loops=2)
    assert torch.isinf(out.logits[..., VOCAB:]).all()  # padded vocabulary never wins
    _assert_matches(model, out, W, z, labels)  # the loss is fp32: 1e-6


@pytest.mark.parametrize("variant", ["looped", "flt_res", "recall", "huginn", "parcae"])
def test_gpt2_options_match_reference(tp1, variant):
    """The GPT-2-style options (LayerNorm with bias everywhere, learned absolute positions, GELU MLP, biases on
    every projection, no QK-norm) under several recurrences: forward at 3 loops and every gradient equal the
    reference, with biases and norm weights drawn at random (at init they are 0 and 1)."""
    extra = dict(state_init="zeros") if variant in ("huginn", "parcae") else {}
    cfg = gpt2_like(variant, init_std=0.3, **extra)
    model = build(cfg, dtype=torch.float64)
    randomise_biases_and_norms(model, seed=4)
    tokens, labels = batch(seed=1)
    out = model(tokens, labels, backprop_loops=2, return_logits=True)
    out.loss.backward()

    W = _weights(model)
    assert "pos_embed.weight" in W and "core.0.mlp.w_down.bias" in W
    assert ("core.0.attn_norm.bias" in W) == (variant != "flt_res")  # the FLT family's norms are weightless
    z = Reference(W, cfg, VOCAB).logits(tokens, variant, loops=3, backprop_loops=2)
    _assert_matches(model, out, W, z, labels)
    # RMSNorm in place of LayerNorm in the reference gives other logits: the norm kind is not vacuous
    rms_cfg = gpt2_like(variant, init_std=0.3, norm_kind="rms", **extra)
    assert (Reference(W, rms_cfg, VOCAB).logits(tokens, variant, loops=3) - z).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["flt", "recall", "huginn", "parcae"])
def test_per_sequence_depth_matches_reference(tp1, variant):
    """Per-sequence depths [1, 4, 2] with gradient through each sequence's own last 2 loops: the batched forward
    equals the reference's definition (every sequence alone at its own count), logits and gradients."""
    extra = dict(state_init="zeros") if variant in ("huginn", "parcae") else {}
    cfg = tiny(variant, init_std=0.3, **extra)
    model = build(cfg, dtype=torch.float64)
    tokens, labels = batch(B=3, seed=2)
    depths = torch.tensor([1, 4, 2])
    out = model(tokens, labels, depths=depths, backprop_loops=2, return_logits=True)
    out.loss.backward()

    W = _weights(model)
    z = Reference(W, cfg, VOCAB).logits_per_sequence(tokens, variant, depths.tolist(), backprop_loops=2)
    _assert_matches(model, out, W, z, labels)


@pytest.mark.parametrize("variant,extra", [("flt", {}), ("huginn", dict(state_init="zeros", loop_lora_alpha=6.0)),
                                           ("looped", dict(loop_lora_targets=["wo", "w_up"]))])
def test_loop_lora_matches_reference(tp1, variant, extra):
    """Per-loop LoRA with non-zero B (set at random here; it starts at zero): forward and every gradient, adapters
    included, equal the reference's W x + (alpha / r) B_t A_t x. The model runs 5 loops on a bank of 3 adapters
    (model.loops), so loops 4 and 5 reuse the last one; the last 4 loops are backpropagated."""
    cfg = tiny(variant, init_std=0.3, loop_lora_rank=2, **extra)
    model = build(cfg, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("loop_lora.") and name.endswith(".B"):
                assert p.shape[0] == 3 and not p.any()
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    tokens, labels = batch(seed=1)
    out = model(tokens, labels, loops=5, backprop_loops=4, return_logits=True)
    out.loss.backward()

    W = _weights(model)
    z = Reference(W, cfg, VOCAB).logits(tokens, variant, loops=5, backprop_loops=4)
    _assert_matches(model, out, W, z, labels)
    assert all(W[n].grad.abs().sum() > 0 for n in W if n.startswith("loop_lora."))
    # the delta matters: the same weights without the adapters give other logits
    plain = {n: w for n, w in W.items() if not n.startswith("loop_lora.")}
    z0 = Reference(plain, cfg, VOCAB).logits(tokens, variant, loops=5, backprop_loops=4)
    assert (z0 - z).abs().max() > 1e-3

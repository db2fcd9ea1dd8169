"""The model against an independent plain-torch reference (tests/models/reference.py) with its weights copied in.
Both run in float64 so that the tolerance is far below the differences between variants."""

import pytest
import torch
import torch.nn.functional as F

from tests.models.helpers import VARIANTS, VOCAB, batch, build, grads, tiny
from tests.models.reference import Reference, rms


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def _compare_grads(model, W, atol=1e-6):  # the cross-entropy runs in fp32: gradients agree to ~1e-7
    got = grads(model)
    assert set(got) == {n for n, w in W.items() if w.grad is not None}
    for name, g in got.items():
        torch.testing.assert_close(g, W[name].grad, rtol=1e-4, atol=atol, msg=f"gradient of {name}")


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
    torch.testing.assert_close(out.logits[..., :VOCAB], z, rtol=1e-9, atol=1e-9)
    F.cross_entropy(z.flatten(0, 1), labels.flatten()).backward()
    torch.testing.assert_close(out.loss, F.cross_entropy(z.flatten(0, 1), labels.flatten()), check_dtype=False)
    _compare_grads(model, W)


def rms_head(ref, x, W, cfg):
    head = W["embed.weight"] if cfg.tie_embeddings else W["lm_head.weight"]
    z = rms(x, W.get("norm.weight")) @ head.T
    return (cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap))[..., :VOCAB]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_design_equations(tp1, variant):
    """Forward of every recipe at 3 loops equals the design note's equations; with truncated backprop (last 2
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
    torch.testing.assert_close(out.logits[..., :VOCAB], z, rtol=1e-9, atol=1e-9)
    assert torch.isinf(out.logits[..., VOCAB:]).all()  # padded vocabulary never wins
    loss = F.cross_entropy(z.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6, check_dtype=False)  # the loss is fp32
    loss.backward()
    _compare_grads(model, W)

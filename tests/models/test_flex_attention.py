"""`model.attention: flex` (pretrain/models/attention.py) against the dense-mask SDPA path, its oracle.

Packed rows with several documents each: the flex model (same seed, so the same weights) gives the dense model's
logits and loss to fp32 rounding, and the same gradients, in training (CPU: FlexAttention's op with its autograd)
and in eval (CPU: the public flex_attention). Spies count the block masks built (one per forward) and the flex
calls (every layer of every loop), so a silent fallback to the dense path would fail the tests. Where flex does not
apply (no doc_ids, padded prompts, KV cache, router) the flex model runs the sdpa path: no block mask, same numbers.
"""

from __future__ import annotations

import pytest
import torch

import pretrain.models.attention as attention
import pretrain.models.layers as layers
from pretrain.models.compile import compile_model
from pretrain.models.generate import generate_batch
from tests.models.helpers import batch, build, grads, tiny

# on CPU eager flex_attention warns that it is unfused (attention.py filters it; pytest resets filters per test)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

T = 40
# three rows: three documents, two documents, one document (no boundary)
DOC_IDS = ((torch.arange(T)[None] >= torch.tensor([[6], [17], [T]])).long()
           + (torch.arange(T)[None] >= torch.tensor([[29], [T], [T]])).long())


@pytest.fixture
def spy(monkeypatch):
    """Counts `create_block_mask` calls (block masks built) and `flex_attend` calls (attention through flex)."""
    counts = {"masks": 0, "flex": 0}
    build_mask, attend = attention.create_block_mask, layers.flex_attend

    def counted_mask(*a, **kw):
        counts["masks"] += 1
        return build_mask(*a, **kw)

    def counted_attend(*a, **kw):
        counts["flex"] += 1
        return attend(*a, **kw)

    monkeypatch.setattr(attention, "create_block_mask", counted_mask)
    monkeypatch.setattr(layers, "flex_attend", counted_attend)
    return counts


def _pair(variant: str, **kw):
    """The sdpa and flex models of one config, with identical weights."""
    return build(tiny(variant, attention="sdpa", **kw)), build(tiny(variant, attention="flex", **kw))


def _train_step(model, tokens, labels, **kw):
    model.train()
    model.zero_grad()
    out = model(tokens, labels, return_logits=True, **kw)
    out.loss.backward()
    return out, grads(model)


def _layer_calls(model, loops: int, coda_runs: int = 1) -> int:
    """Attention calls of one forward (the training step runs the coda twice: loss head, then returned logits)."""
    return len(model.prelude) + loops * len(model.core) + coda_runs * len(model.coda)


CASES = [  # variant, overrides: FLT (queries from the previous loop), Huginn, Parcae, prelude/coda + GQA + LoRA
    ("flt", {}),
    ("huginn", {}),
    ("parcae", {}),
    ("looped", dict(n_prelude=1, n_coda=1, n_heads=4, n_kv_heads=2, loop_lora_rank=2)),
]


@pytest.mark.parametrize("variant,kw", CASES)
def test_flex_equals_dense_mask(tp1, spy, variant, kw):
    """Training forward + backward and eval logits: flex equals the dense mask (fp32), one block mask per forward,
    every layer call through flex."""
    dense, flex = _pair(variant, **kw)
    if kw.get("loop_lora_rank"):  # non-zero LoRA B, so the per-loop adapters matter
        with torch.no_grad():
            for model in (dense, flex):
                for name, p in model.named_parameters():
                    if name.endswith(".B"):
                        p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    tokens, labels = batch(B=3, T=T, seed=1)
    out_d, g_d = _train_step(dense, tokens, labels, doc_ids=DOC_IDS, loops=2)
    assert spy == {"masks": 0, "flex": 0}
    out_f, g_f = _train_step(flex, tokens, labels, doc_ids=DOC_IDS, loops=2)
    assert spy == {"masks": 1, "flex": _layer_calls(flex, 2, coda_runs=2)}
    real = out_d.logits.isfinite()  # padded vocabulary ids are -inf in both
    assert torch.equal(real, out_f.logits.isfinite())
    torch.testing.assert_close(out_f.logits[real], out_d.logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_f.loss, out_d.loss, rtol=0, atol=1e-6)
    assert g_f.keys() == g_d.keys()
    for name in g_d:
        torch.testing.assert_close(g_f[name], g_d[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # eval: the public flex_attention, 4 loops (another loop count, the same single mask)
        logits_d = dense.eval()(tokens, doc_ids=DOC_IDS, loops=4).logits
        logits_f = flex.eval()(tokens, doc_ids=DOC_IDS, loops=4).logits
        unmasked = dense(tokens, loops=4).logits  # the documents matter: the test can tell a missing mask
    assert spy == {"masks": 2, "flex": _layer_calls(flex, 2, coda_runs=2) + _layer_calls(flex, 4)}
    torch.testing.assert_close(logits_f[real], logits_d[real], rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked[real], logits_d[real], atol=1e-3)


def test_flex_with_checkpointing_and_compile(tp1, spy):
    """The block mask through layer activation checkpointing and through `train.compile`'s compiled core layers
    (CPU: the op's backward runs eagerly behind a graph break), with new documents each step: the dense result."""
    tokens, labels = batch(B=3, T=T, seed=2)
    dense = build(tiny("looped", loops=2), activation_checkpointing="layer")
    flex = compile_model(build(tiny("looped", loops=2, attention="flex"), activation_checkpointing="layer"))
    for shift in (0, 7):
        docs = DOC_IDS.roll(shift, dims=1)
        out_d, g_d = _train_step(dense, tokens, labels, doc_ids=docs)
        out_f, g_f = _train_step(flex, tokens, labels, doc_ids=docs)
        torch.testing.assert_close(out_f.loss, out_d.loss, rtol=0, atol=1e-6)
        for name in g_d:
            torch.testing.assert_close(g_f[name], g_d[name], rtol=1e-4, atol=1e-6, msg=name)
    assert spy["masks"] == 2


def test_flex_bf16(tp1, spy):
    """bf16 weights and activations: flex runs (forward and backward) and agrees with the dense path to bf16
    rounding."""
    tokens, labels = batch(B=3, T=T, seed=3)
    dense = build(tiny("flt", n_kv_heads=1), dtype=torch.bfloat16)
    flex = build(tiny("flt", n_kv_heads=1, attention="flex"), dtype=torch.bfloat16)
    out_d, g_d = _train_step(dense, tokens, labels, doc_ids=DOC_IDS)
    out_f, g_f = _train_step(flex, tokens, labels, doc_ids=DOC_IDS)
    assert spy["masks"] == 1 and out_f.logits.dtype == torch.bfloat16
    real = out_d.logits.isfinite()
    torch.testing.assert_close(out_f.logits[real].float(), out_d.logits[real].float(), rtol=0.02, atol=0.05)
    torch.testing.assert_close(out_f.loss.float(), out_d.loss.float(), rtol=0.01, atol=0.01)
    for name in g_d:
        assert g_f[name].isfinite().all(), name
        scale = g_d[name].float().abs().max().clamp_min(1e-3)
        assert (g_f[name].float() - g_d[name].float()).abs().max() <= 0.1 * scale, name


def test_fallbacks_run_the_sdpa_path(tp1, spy):
    """Where flex does not apply the flex model builds no block mask and computes the sdpa model's numbers: no
    doc_ids (plain causal), padded prompts with a KV cache (generate_batch), and a Mixture-of-Recursions router with
    doc_ids (it gathers the dense mask's rows)."""
    dense, flex = _pair("flt")
    tokens, labels = batch(B=2, T=24, seed=4)
    torch.testing.assert_close(_train_step(flex, tokens, labels)[1], _train_step(dense, tokens, labels)[1],
                               rtol=0, atol=0)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # different lengths: left padding and an attention mask
    with torch.no_grad():
        gen_d = generate_batch(dense.eval(), prompts, 4)
        gen_f = generate_batch(flex.eval(), prompts, 4)
    assert gen_f.tokens == gen_d.tokens
    dense_r, flex_r = _pair("flt", router="expert_choice")
    out_d, g_d = _train_step(dense_r, tokens, labels, doc_ids=DOC_IDS[:2, :24])
    out_f, g_f = _train_step(flex_r, tokens, labels, doc_ids=DOC_IDS[:2, :24])
    assert torch.equal(out_f.loss, out_d.loss)
    assert spy == {"masks": 0, "flex": 0}

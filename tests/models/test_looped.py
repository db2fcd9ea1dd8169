"""The looped model on one process (TP=1): checkpointing, truncated backprop, diagnostics, early exit, KV cache,
document masks, parameter counting and roles, and a few training steps for every variant."""

import math

import pytest
import torch

from pretrain.models import LoopConfig, count_parameters, param_roles
from tests.models.helpers import (
    GPT2_LIKE,
    VARIANTS,
    VOCAB,
    assert_checkpointing_exact,
    batch,
    build,
    gpt2_like,
    randomise_biases_and_norms,
    tiny,
)


@pytest.mark.parametrize("variant", ["flt", "huginn", "parcae", "recall"])
def test_checkpointing_gives_identical_gradients(tp1, variant):
    """none / per-loop / per-layer checkpointing: same loss, same gradients (loss on every loop, so the
    checkpointed loss heads are exercised; truncated backprop, so no_grad loops mix in)."""
    tokens, labels = batch(seed=2)
    loop_cfg = LoopConfig(loss_on="all", backprop_loops=3)
    assert_checkpointing_exact(lambda ckpt: build(tiny(variant, loops=4), loop_cfg, activation_checkpointing=ckpt),
                               tokens, labels)


def test_truncated_backprop_sends_no_gradient_into_early_loops(tp1):
    """Plain k x L loop without injection and an untied head: the embedding reaches the loss only through h_0 ->
    loop 1 -> ... so it gets gradient exactly when every loop is backpropagated; the per-loop gradient norms are
    zero for the loops run without gradient and positive for the rest."""
    cfg = tiny("looped", loops=4, tie_embeddings=False)
    tokens, labels = batch()
    for k, expect_embed_grad in ((4, True), (2, False)):
        model = build(cfg)
        out = model(tokens, labels, backprop_loops=k, diagnostics=True)
        out.loss.backward()
        norms = out.diagnostics.grad_norm
        assert norms[: 4 - k] == [0.0] * (4 - k) and all(g > 0 for g in norms[4 - k:]), norms
        embed_grad = model.embed.weight.grad
        assert (embed_grad is not None and embed_grad.abs().sum() > 0) == expect_embed_grad


def test_diagnostics(tp1):
    model = build(tiny("parcae", loops=5))
    tokens, labels = batch()
    out = model(tokens, labels, diagnostics=True)
    d = out.diagnostics
    assert d.grad_norm == [0.0] * 5  # filled in by backward
    out.loss.backward()
    assert len(d.state_norm) == 5 and len(d.rel_change) == 4 and all(g > 0 for g in d.grad_norm)
    assert all(isinstance(v, float) and math.isfinite(v) for v in d.state_norm + d.rel_change + d.grad_norm)
    assert d.extra["parcae_max_a_bar"] == pytest.approx(math.sqrt(1 / 5))
    # the state norm is the mean per-token L2 norm of the loop output
    flt = build(tiny("flt", loops=3)).eval()
    dd = flt(tokens, diagnostics=True).diagnostics
    assert len(dd.state_norm) == 3 and len(dd.rel_change) == 2


@pytest.mark.parametrize("variant", ["flt", "huginn", "lt_i"])
def test_early_exit(tp1, variant):
    model = build(tiny(variant, loops=6, init_std=0.2)).eval()
    tokens, _ = batch(B=6, seed=5)
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens, exit_epsilon=0.0)  # nothing converges below 0: identical to the full forward
        assert torch.equal(out.logits, full) and out.exit_loops.tolist() == [6] * 6
        out = model(tokens, exit_epsilon=math.inf)  # the first change is measured after loop 2
        torch.testing.assert_close(out.logits, model(tokens, loops=2).logits, rtol=0, atol=0)
        assert out.exit_loops.tolist() == [2] * 6
        # an epsilon that splits the batch: each sequence equals its own forward at the loop count it stopped at
        for eps in torch.logspace(-8, 0, 33).tolist():
            out = model(tokens, exit_epsilon=eps)
            if len(set(out.exit_loops.tolist())) > 1:
                break
        else:
            pytest.fail("no epsilon gave different exit loops")
        for b, n in enumerate(out.exit_loops.tolist()):
            torch.testing.assert_close(out.logits[b], model(tokens[b:b + 1], loops=n).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,extra", [(v, {}) for v in VARIANTS] + [
    pytest.param("looped", GPT2_LIKE, id="looped-gpt2"), pytest.param("parcae", GPT2_LIKE, id="parcae-gpt2")])
def test_kv_cache_matches_uncached_forward(tp1, variant, extra):
    """Prefill, a multi-token chunk, then single tokens through the per-(loop, layer) cache give the logits of one
    uncached forward over the whole sequence; greedy generation with and without the cache agrees. GPT-2-style
    options (learned positions: the cache offset must reach the position embedding; LayerNorm, biases, GELU)
    too."""
    from pretrain.models import KVCache

    model = build(tiny(variant, init_std=0.2, n_kv_heads=1, **extra)).eval()
    randomise_biases_and_norms(model, seed=1)
    tokens, _ = batch(B=2, T=12, seed=6)
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache.allocate(model, batch=2, max_len=12)
        pieces = [model(tokens[:, :5], cache=cache).logits, model(tokens[:, 5:9], cache=cache).logits]
        pieces += [model(tokens[:, i:i + 1], cache=cache).logits for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = tokens[:, :4]
    cached = model.generate(prompt, 6, loops=4, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 6, loops=4, use_cache=False))
    assert cached.shape == (2, 10) and (cached < VOCAB).all()  # padded ids are never produced
    sampled = model.generate(prompt, 6, use_cache=True, temperature=1.0, seed=3)
    assert torch.equal(sampled, model.generate(prompt, 6, use_cache=False, temperature=1.0, seed=3))


def test_document_mask_equals_separate_documents(tp1):
    """Two packed documents with doc_ids give the logits of each document run alone (rotary is relative)."""
    model = build(tiny("flt", init_std=0.2)).eval()
    tokens, _ = batch(B=1, T=16, seed=7)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids).logits
        a, b = model(tokens[:, :7]).logits, model(tokens[:, 7:]).logits
        unmasked = model(tokens).logits
    torch.testing.assert_close(packed, torch.cat([a, b], dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, 7:], b, atol=1e-3)  # without the mask the second document sees the first


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_independent_of_loops(tp1, variant):
    counts = {count_parameters(tiny(variant, loops=n, tie_embeddings=False), VOCAB) for n in (1, 3, 16)}
    assert len(counts) == 1
    for tied in (True, False):
        model = build(tiny(variant, loops=5, tie_embeddings=tied, n_kv_heads=1))
        assert count_parameters(tiny(variant, loops=1, tie_embeddings=tied, n_kv_heads=1), VOCAB) == \
            sum(p.numel() for p in model.parameters())


def test_learned_positions(tp1):
    """position: learned adds a table [max_positions, d] to the token embedding, no rotary: on a constant sequence
    every position computes the same thing without it (causal attention over identical tokens) and something else
    at each position with it. More positions than the table is a one-line ValueError, cached ones included; the
    option needs max_positions."""
    from loopstack.errors import ConfigError
    from pretrain.models import KVCache

    model = build(gpt2_like(max_positions=16, init_std=0.2)).eval()
    same = torch.full((1, 16), 7)
    with torch.no_grad():
        with_table = model(same).logits[0, :, :VOCAB]
        assert (with_table - with_table[:1]).abs().amax(-1)[1:].min() > 1e-3  # every position differs from the first
        table = model.pos_embed.weight.clone()
        model.pos_embed.weight.zero_()
        without = model(same).logits[0, :, :VOCAB]
        torch.testing.assert_close(without, without[:1].expand_as(without), rtol=1e-5, atol=1e-5)
        model.pos_embed.weight.copy_(table)
        tokens, _ = batch(B=1, T=16, seed=3)
        with pytest.raises(ValueError, match="exceed model.max_positions = 16"):
            model(torch.cat([tokens, tokens[:, :1]], dim=1))
        cache = KVCache.allocate(model, batch=1, max_len=32)
        model(tokens, cache=cache)
        with pytest.raises(ValueError, match=r"cached 16 \+ new 1"):
            model(tokens[:, :1], cache=cache)
        assert len(model.generate(tokens[:, :10], 7)[0]) == 17  # 16 positions fed: the last token is not
        with pytest.raises(ValueError, match="need 17 positions"):
            model.generate(tokens[:, :10], 8)
    assert model.cfg.position == "learned" and not model.cfg.qk_norm
    with pytest.raises(ConfigError, match="model.position = learned needs model.max_positions >= 1"):
        tiny("looped", position="learned").check_positions(16)
    from pretrain.config import load_config

    for order in (["model.max_positions=256", "model.position=learned"],
                  ["model.position=learned", "model.max_positions=256"]):  # the check runs on the resolved config
        assert load_config(None, order).model.position == "learned"
    with pytest.raises(ConfigError, match="needs model.max_positions >= 1"):
        load_config(None, ["model.position=learned"])
    with pytest.raises(ConfigError, match="data.seq_len = 256 is longer than model.max_positions = 64"):
        load_config(None, ["model.position=learned", "model.max_positions=64"])


def test_param_roles(tp1):
    roles = {}
    for variant, tied in (("huginn", False), ("parcae", True), ("flt_res", True)):
        model = build(tiny(variant, tie_embeddings=tied, norm_affine=True))
        r = param_roles(model)
        assert set(r) == {n for n, _ in model.named_parameters()}
        roles.update(r)
        for n, p in model.named_parameters():
            assert hasattr(p, "tensor_model_parallel") and hasattr(p, "partition_dim")
            if r[n] == "matrix":
                assert p.ndim == 2 and p.tensor_model_parallel
    assert roles["embed.weight"] == "embedding" and roles["lm_head.weight"] == "head"
    assert roles["injection.adapter.weight"] == roles["injection.parcae.A_log"] == roles["injection.parcae.B"] \
        == roles["injection.parcae.dt_bias"] == "injection"
    assert roles["core.0.attn.wq.weight"] == roles["core.1.mlp.w_down.weight"] == "matrix"
    assert roles["core.0.attn.q_norm.weight"] == roles["injection.e_norm.weight"] == "norm"
    assert roles["injection.stream_norms.0.weight"] == roles["norm.weight"] == "norm"
    r = param_roles(build(gpt2_like("parcae")))  # LayerNorm weight / bias, projection biases, position table
    assert r["core.0.attn_norm.weight"] == r["norm.weight"] == r["injection.e_norm.weight"] == "norm"
    assert r["core.0.attn_norm.bias"] == r["norm.bias"] == r["injection.e_norm.bias"] == "bias"
    assert r["core.0.attn.wo.bias"] == r["core.0.mlp.w_up.bias"] == r["core.0.mlp.w_down.bias"] == "bias"
    assert r["pos_embed.weight"] == "embedding" and "core.0.mlp.w_gate.weight" not in r
    params = dict(build(tiny("flt")).named_parameters())
    assert params["core.0.attn.wq.weight"].partition_dim == 0 and params["core.0.attn.wo.weight"].partition_dim == 1
    assert params["core.0.mlp.w_down.weight"].partition_dim == 1 and params["embed.weight"].partition_dim == 0


def _successor_batch(B, T, seed):
    """Token t+1 = (7 * token t + 3) mod VOCAB: learnable next-token structure."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randint(0, VOCAB, (B,), generator=g)]
    for _ in range(T):
        x.append((7 * x[-1] + 3) % VOCAB)
    seq = torch.stack(x, dim=1)
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains(tp1, variant):
    model = build(tiny(variant, loops=3), LoopConfig(backprop_loops=2), activation_checkpointing="loop")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(60):
        tokens, labels = _successor_batch(8, 16, seed=step)
        loss = model(tokens, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # ln(100) = 4.6 at the start; the plain k x L loop is the slowest learner (~3.0 after 60 steps, the others
    # reach ~0.4-1.6)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], [round(v, 2) for v in losses[::5]]

"""Batched generation of prompts of different lengths (left padding + attention mask), sampling filters and
per-token early exit: every row computes what it computes alone, and the cache changes nothing."""

import math

import pytest
import torch

from pretrain.models.generate import generate_batch, sample_next
from tests.models.helpers import GPT2_LIKE, build, randomise_biases_and_norms, tiny

PROMPTS = [[5, 9, 13, 2, 7, 40], [11, 3], [60, 61, 62, 63]]


@pytest.mark.parametrize("variant,extra", [(v, {}) for v in ("flt", "parcae", "huginn", "lt_i")] + [
    pytest.param("looped", GPT2_LIKE, id="looped-gpt2"), pytest.param("huginn", GPT2_LIKE, id="huginn-gpt2")])
def test_padded_batch_rows_equal_each_prompt_alone(tp1, variant, extra):
    """Logits at every real position of a left-padded batch equal each prompt's unpadded forward (random h_0
    included: it is a function of the token's position among the real tokens; so are learned position
    embeddings, GPT-2-style), with and without the cache."""
    model = build(tiny(variant, loops=3, init_std=0.2, n_kv_heads=1, **extra)).eval()
    randomise_biases_and_norms(model, seed=2)
    longest = max(map(len, PROMPTS))
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask).logits
        for b, p in enumerate(PROMPTS):
            alone = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(batched[b, longest - len(p):], alone, rtol=1e-5, atol=1e-5)
    cached = generate_batch(model, PROMPTS, 6, use_cache=True)
    uncached = generate_batch(model, PROMPTS, 6, use_cache=False)
    assert cached.tokens == uncached.tokens
    for b, p in enumerate(PROMPTS):
        assert generate_batch(model, [p], 6).tokens[0] == cached.tokens[b]
        assert cached.loops_used[b] == [3] * 6


def test_end_of_sequence_stops_a_row_and_the_batch(tp1):
    model = build(tiny("flt", loops=2, init_std=0.2)).eval()
    free = generate_batch(model, PROMPTS, 8)
    eos = free.tokens[1][2]  # the third token row 1 generates becomes the end-of-sequence id
    stopped = generate_batch(model, PROMPTS, 8, eos_id=eos)
    assert stopped.finished[1] and stopped.tokens[1] == free.tokens[1][:free.tokens[1].index(eos)]
    for b in (0, 2):
        cut = free.tokens[b].index(eos) if eos in free.tokens[b] else 8
        assert stopped.tokens[b] == free.tokens[b][:cut]


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample_next(logits, 0.0, 0, 1.0, gen).tolist() == [1, 0]
    for _ in range(20):  # top-k 1 and a tiny top-p leave only the most likely token
        assert sample_next(logits, 1.0, 1, 1.0, gen).tolist() == [1, 0]
        assert sample_next(logits, 1.0, 0, 1e-6, gen).tolist() == [1, 0]
    seen = {tuple(sample_next(logits, 1.0, 2, 1.0, gen).tolist()) for _ in range(200)}  # top-2: {1, 3} and {0, 3}
    assert {s[0] for s in seen} == {1, 3} and {s[1] for s in seen} == {0, 3}
    # top-p 0.6 on row 1: token 0 holds ~0.52, token 3 ~0.48 of the mass: both needed to reach 0.6
    probs = torch.softmax(logits[1], 0)
    assert probs[0] < 0.6 < probs[0] + probs[3]
    seen = {int(sample_next(logits[1:], 1.0, 0, 0.6, gen)) for _ in range(200)}
    assert seen == {0, 3}
    a = [sample_next(logits, 0.7, 0, 0.9, torch.Generator().manual_seed(3)).tolist() for _ in range(2)]
    assert a[0] == a[1]  # a seed fixes the draw


@pytest.mark.parametrize("variant", ["flt", "huginn"])
def test_per_token_exit_is_exact_with_the_cache(tp1, variant):
    """Per-token early exit: epsilon 0 is the full-depth forward; an epsilon where tokens stop at different loops
    gives the same tokens and loop counts with and without the cache; a token's logits equal the forward of its
    prefix alone with the same rule (a token depends only on tokens before it)."""
    model = build(tiny(variant, loops=6, init_std=0.2)).eval()
    tokens = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens, exit_epsilon=0.0, exit_per_token=True)
        assert torch.equal(out.logits, full) and out.exit_loops.tolist() == [[6] * tokens.shape[1]]
        for eps in torch.logspace(-6, 0, 25).tolist():
            out = model(tokens, exit_epsilon=eps, exit_per_token=True)
            if len(set(out.exit_loops[0].tolist())) > 1:
                break
        else:
            pytest.fail("no epsilon gave different exit loops across tokens")
        for i in (3, tokens.shape[1] - 1):
            prefix = model(tokens[:, :i + 1], exit_epsilon=eps, exit_per_token=True)
            torch.testing.assert_close(prefix.logits[0, -1], out.logits[0, i], rtol=1e-5, atol=1e-5)
            assert prefix.exit_loops[0, -1] == out.exit_loops[0, i]
    cached = generate_batch(model, PROMPTS, 5, exit_epsilon=eps)
    uncached = generate_batch(model, PROMPTS, 5, exit_epsilon=eps, use_cache=False)
    assert cached.tokens == uncached.tokens and cached.loops_used == uncached.loops_used
    assert all(1 <= n <= 6 for row in cached.loops_used for n in row)
    assert not math.isnan(sum(map(sum, cached.loops_used)))

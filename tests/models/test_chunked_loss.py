"""The chunked loss (train.loss_chunk_tokens, `LoopedLM.loss_chunk`): the head and cross-entropy on a few tokens at a
time, each chunk's logits recomputed in backward, give the loss and gradients of the whole-batch loss; and the fp32
logits of the whole micro batch are never held at once (the largest tensor saved for backward is measured)."""

import pytest
import torch

from tests.models.helpers import batch, build, grads, tiny


@pytest.mark.parametrize("chunk", [1, 7, 16])
@pytest.mark.parametrize("case", [("flt", {}), ("huginn", dict(tie_embeddings=False, loss_on="all")),
                                  ("lt_i", dict(exit_gate=True))])
def test_chunked_loss_equals_the_whole_batch_loss(tp1, chunk, case):
    from pretrain.models.config import LoopConfig

    variant, kw = case
    kw = dict(kw)
    loop = LoopConfig(loss_on=kw.pop("loss_on", "last"))
    tokens, labels = batch(B=2, T=12, seed=1)
    labels[0, :3] = -1  # ignored positions stay ignored in every chunk
    results = []
    for n in (0, chunk):
        model = build(tiny(variant, **kw), loop, seed=2)
        model.loss_chunk = n
        out = model(tokens, labels)
        out.loss.backward()
        results.append((out.loss.detach(), grads(model)))
    (ref, g_ref), (got, g_got) = results
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert g_ref.keys() == g_got.keys()
    for k in g_ref:
        torch.testing.assert_close(g_got[k], g_ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_chunked_loss_keeps_only_a_chunk_of_logits(tp1):
    """The biggest tensor autograd saves during the forward: the whole batch's [B, T, V] fp32 logits without chunking,
    nothing of that size with 8-token chunks (each chunk's logits are recomputed in backward)."""
    vocab, padded = 1000, 1024  # logits far bigger than any activation of this d_model 16 model
    tokens, labels = batch(B=4, T=32, vocab=vocab, seed=3)
    biggest = {}
    for n in (0, 8):
        model = build(tiny("flt", d_model=16), seed=0, vocab=vocab)
        model.loss_chunk = n
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, labels).loss.backward()
        biggest[n] = max(sizes)
    assert biggest[0] >= 4 * 32 * padded
    assert biggest[8] <= 8 * padded

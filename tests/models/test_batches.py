"""One batch -> model inputs path (pretrain.batches): evaluation sees document masking as training does.

Real loader data: a synthetic k-hop corpus of short documents (many boundaries per row), packed by the loader
with `document_masking`. The eval loss must be the masked forward, computed here by hand as each document run
on its own (attention within a document only), and differ from the unmasked loss.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.loader import PackedDataset
from data_pipeline.synth import synthesize
from pretrain.batches import model_inputs
from pretrain.evaluate import loss_vs_loops
from tests.models.helpers import build, tiny

SEQ, MICRO, BATCHES = 48, 3, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize("khop", out, train_docs=40, eval_docs=10, verbose=False)
    return out


def _data(corpus, masking: bool):
    return lambda: PackedDataset([corpus / "eval"], SEQ, micro_batch=MICRO, seed=3, document_masking=masking)


def test_model_inputs(corpus):
    batch = _data(corpus, True)().next_batch()
    x = model_inputs(batch, "cpu")
    assert torch.equal(x.inputs, torch.from_numpy(batch["tokens"][:, :-1]))
    assert torch.equal(x.labels, torch.from_numpy(batch["tokens"][:, 1:]))
    assert torch.equal(x.doc_ids, torch.from_numpy(batch["doc_ids"][:, :-1]))
    assert model_inputs(_data(corpus, False)().next_batch(), "cpu").doc_ids is None


def _per_document_loss(model, data, loops: int) -> float:
    """Mean next-token loss over the eval batches with every document of a packed row run on its own."""
    total = 0.0
    for _ in range(BATCHES):
        batch = data.next_batch()
        tokens, doc = batch["tokens"], batch["doc_ids"][:, :-1]
        ce, count = 0.0, 0
        for row, ids in zip(tokens, doc, strict=True):
            starts = [0, *(np.flatnonzero(np.diff(ids)) + 1), len(ids)]
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                x = torch.from_numpy(row[a:b])[None]
                logits = model(x, loops=loops).logits[0].float()
                ce += F.cross_entropy(logits, torch.from_numpy(row[a + 1:b + 1]), reduction="sum").item()
                count += b - a
        total += ce / count
    return total / BATCHES


def test_eval_with_document_masking_is_the_masked_forward(tp1, corpus):
    from data_pipeline.tokenizer import load_tokenizer

    vocab = load_tokenizer(corpus / "tokenizer").vocab_size
    model = build(tiny("flt", init_std=0.3), vocab=vocab)  # large weights: attention context matters visibly
    first = _data(corpus, True)().next_batch()["doc_ids"]
    assert (first.max(axis=1) >= 1).all()  # two or more documents in every row: the mask matters
    cpu = torch.device("cpu")
    masked = loss_vs_loops(model, _data(corpus, True), [1, 3], BATCHES, cpu)
    plain = loss_vs_loops(model, _data(corpus, False), [1, 3], BATCHES, cpu)
    assert model.training  # loss_vs_loops restores the mode
    model.eval()
    with torch.no_grad():
        for n in (1, 3):
            hand = _per_document_loss(model, _data(corpus, True)(), n)
            assert masked[n] == pytest.approx(hand, rel=1e-6, abs=0)  # the same up to fp32 rounding
            assert abs(plain[n] - masked[n]) > 1e-3 * masked[n]  # unmasked attention crosses documents

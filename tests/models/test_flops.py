"""flops_per_token against torch's FLOP counter on the real model (forward + backward, recomputation included).
The math SDPA kernel is forced so attention is counted (as full T x T products, hence attention="full")."""

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models import LoopConfig, flops_per_token
from tests.models.helpers import GPT2_LIKE, VOCAB, batch, build, tiny

CASES = [  # variant, model overrides, loops, backprop loops, checkpointing, loss_on
    ("flt", {}, 3, 0, "none", "last"),
    ("recall", {}, 4, 2, "loop", "last"),
    ("huginn", dict(n_heads=4, n_kv_heads=2), 3, 0, "layer", "last"),
    ("parcae", {}, 4, 3, "loop", "all"),
    ("lt_i", dict(n_prelude=1, n_coda=1), 3, 2, "layer", "all"),
    ("flt", {}, 6, 0, "loop", "last_third"),
    ("huginn", {}, 5, 1, "layer", "last_third"),
    ("recall", dict(n_coda=1), 7, 2, "none", "last_third"),
    ("looped", GPT2_LIKE, 3, 2, "loop", "last"),  # GELU MLP: two matmuls; biases and positions are not counted
]


@pytest.mark.parametrize("variant,kw,loops,k,ckpt,loss_on", CASES)
def test_flops_match_counted_matmuls(tp1, variant, kw, loops, k, ckpt, loss_on):
    cfg = tiny(variant, loops=loops, **kw)
    model = build(cfg, LoopConfig(backprop_loops=k, loss_on=loss_on), activation_checkpointing=ckpt)
    tokens, labels = batch(B=2, T=16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, labels).loss.backward()
    f = flops_per_token(cfg, 16, loops, k, ckpt, vocab_size=VOCAB, loss_on=loss_on, attention="full")
    assert counter.get_total_flops() == pytest.approx(f.hardware_flops * tokens.numel(), rel=1e-9)
    assert f.hardware_flops == f.model_flops + f.recompute
    assert (f.recompute > 0) == (ckpt != "none")


def test_flops_accounting():
    cfg = tiny("flt", loops=8, d_model=64)
    full = flops_per_token(cfg, 128, 8, 0, "none", vocab_size=1000)
    trunc = flops_per_token(cfg, 128, 8, 2, "loop", vocab_size=1000)
    assert full.forward_only == 0 and full.recompute == 0 and full.hardware_flops == full.model_flops
    assert trunc.forward_only == 6 * trunc.core_forward  # six loops forward only
    assert trunc.recompute == 2 * trunc.core_forward  # the two backpropagated loops re-run once
    assert trunc.model_flops == pytest.approx(full.model_flops - 6 * 2 * full.core_forward)
    causal = flops_per_token(cfg, 128, 8, 0, "none", vocab_size=1000, attention="causal")
    fullattn = flops_per_token(cfg, 128, 8, 0, "none", vocab_size=1000, attention="full")
    assert fullattn.attention_forward == 2 * causal.attention_forward == 4 * 128 * 64
    with pytest.raises(ValueError, match="vocabulary"):
        flops_per_token(cfg, 128, 8)


def test_flops_count_the_models_loss_loops(tp1):
    """One rule for which loops feed the loss: the loss heads the model runs are the ones the FLOP count counts,
    for every loss_on x loop count x truncated-backprop window."""
    from pretrain.models.depth import loss_loop_indices

    cfg = tiny("flt", loops=6)
    model = build(cfg)
    heads = []
    real_head = model._loss_head
    model._loss_head = lambda h, *a, **kw: heads.append(1) or real_head(h, *a, **kw)
    tokens, labels = batch(B=1, T=4)
    for loss_on in ("last", "all", "last_third"):
        for loops in range(1, 7):
            for k in range(loops + 1):  # 0 = all loops carry gradient
                heads.clear()
                model(tokens, labels, loops=loops, backprop_loops=k, loss_on=loss_on)
                f = flops_per_token(cfg, 4, loops, k, vocab_size=VOCAB, loss_on=loss_on)
                want = {"last": 1, "all": k or loops, "last_third": min(-(-loops // 3), k or loops)}[loss_on]
                assert len(heads) == f.loss_loops == len(loss_loop_indices(loss_on, loops, k)) == want, \
                    (loss_on, loops, k)

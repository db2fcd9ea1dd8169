"""`model.init`: the default rule and nanochat's (the FLT paper's official code). nanochat draws the embedding N(0, 1),
the untied head N(0, 0.001), q/k/v and the MLP's input projections uniform in +-sqrt(3 / d_model) and zeroes the
output projections; it needs an untied head (a one-line ConfigError otherwise), and TP=2 builds the same full
matrices as TP=1 (megatron draws the whole master matrix, then splits it)."""

from __future__ import annotations

import math

import pytest
import torch

from loopstack.errors import ConfigError
from tests.dist import run_distributed
from tests.models.helpers import batch, build, tiny

NANOCHAT = dict(init="nanochat", tie_embeddings=False)


def test_nanochat_init_statistics(tp1):
    """Embedding std ~1, head std ~1e-3; wq/wk/wv/w_up/w_gate inside the uniform bound, filling it (a normal draw
    of the same std would exceed it) with std ~1/sqrt(d); wo and w_down exactly zero; norms untouched."""
    d = 32
    model = build(tiny("flt", d_model=d, mlp="swiglu", n_prelude=1, **NANOCHAT))
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(1e-3, rel=0.05)
    bound = math.sqrt(3 / d)
    layers = [*model.prelude, *model.core]
    for i, layer in enumerate(layers):
        for name, proj in (("wq", layer.attn.wq), ("wk", layer.attn.wk), ("wv", layer.attn.wv),
                           ("w_up", layer.mlp.w_up), ("w_gate", layer.mlp.w_gate)):
            w = proj.weight.detach()
            assert w.abs().max().item() <= bound, f"layer {i} {name} leaves the uniform bound"
            assert w.abs().max().item() > 0.95 * bound, f"layer {i} {name} does not fill the uniform range"
            assert w.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.1), f"layer {i} {name}"
        assert torch.count_nonzero(layer.attn.wo.weight) == 0
        assert torch.count_nonzero(layer.mlp.w_down.weight) == 0
    # the default rule is unchanged: N(0, init_std), output projections / sqrt(2 x layers)
    default = build(tiny("flt", d_model=d, n_prelude=1, tie_embeddings=False))
    assert default.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert default.core[0].mlp.w_down.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.1)
    # the nanochat model trains: a loss, finite gradients
    tokens, labels = batch()
    out = model(tokens, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)


def test_nanochat_init_needs_an_untied_head(tp1):
    from pretrain.config import load_config

    with pytest.raises(ConfigError, match="model.init = nanochat needs model.tie_embeddings: false"):
        build(tiny("flt", init="nanochat"))
    with pytest.raises(ConfigError, match="model.init = nanochat needs model.tie_embeddings: false") as err:
        load_config(None, ["model.init=nanochat"])
    assert "\n" not in str(err.value)
    # the order of --set flags does not matter: checked on the resolved config
    assert load_config(None, ["model.init=nanochat", "model.tie_embeddings=false"]).model.init == "nanochat"
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(None, ["model.inti=nanochat"])


def _nanochat_weights(case):
    from tests.models.test_tp import _gather_like

    model = build(tiny("flt", n_heads=4, n_kv_heads=2, **NANOCHAT), seed=5)
    tokens, labels = batch(seed=1)
    return dict(init={n: _gather_like(p, p) for n, p in model.named_parameters()},
                loss=model(tokens, labels).loss.item())


def _tp2_vs_tp1(cases):
    from tests.models.helpers import tp2_then_tp1

    env, tp2, tp1 = tp2_then_tp1(_nanochat_weights, cases)
    return dict(tp2=tp2, tp1=tp1) if env.rank == 0 else None


def test_nanochat_init_is_the_same_at_tp2(tmp_path):
    rank0, _ = run_distributed(_tp2_vs_tp1, 2, args=([None],), timeout=200)
    (a,), (b,) = rank0["tp2"], rank0["tp1"]
    assert a["init"].keys() == b["init"].keys()
    for n in a["init"]:
        assert (a["init"][n] == b["init"][n]).all(), f"initial {n} differs between TP=2 and TP=1"
    assert a["init"]["core.0.attn.wo.weight"].any() == False  # noqa: E712 - numpy bool
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-6)

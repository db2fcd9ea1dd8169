"""The learned exit gate (pretrain/models/exit_gate.py): its objectives against a direct computation from separate
fixed-depth forwards, the threshold rule (1.0 = the fixed-depth forward bit for bit, a saturated gate = one loop),
and cached generation equal to uncached with tokens exiting at different loops."""

import pytest
import torch
import torch.nn.functional as F

from tests.models.helpers import VOCAB, batch, build, tiny


def _loop_states(model, tokens, labels, n):
    """Per loop t = 1..n: each token's cross-entropy and the final norm's output, from a separate t-loop forward
    (a hook on the final norm: no coda in these models, so it reads the loop state)."""
    seen = []
    handle = model.norm.register_forward_hook(lambda mod, inp, out: seen.append(out))
    ces, normed = [], []
    try:
        for t in range(1, n + 1):
            logits = model(tokens, loops=t).logits[..., :VOCAB].float()
            ces.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape))
            normed.append(seen[-1])
    finally:
        handle.remove()
    return ces, normed


@pytest.mark.parametrize("variant", ["flt", "lt_i"])
def test_stage_one_objective_is_the_expected_loss_minus_entropy(tp1, variant):
    from pretrain.models.config import LoopConfig

    beta, n = 0.1, 3
    model = build(tiny(variant, exit_gate=True), LoopConfig(exit_entropy=beta), seed=1)
    with torch.no_grad():  # a token-dependent gate: p(t) differs across tokens
        model.exit_gate.weight.normal_(std=1.0)
        model.exit_gate.bias.fill_(-0.3)
    tokens, labels = batch(B=2, T=12, seed=2)
    out = model(tokens, labels)
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ces, normed = _loop_states(model, tokens, labels, n)
    w, b = model.exit_gate.weight[0], model.exit_gate.bias[0]
    lam = [torch.sigmoid(x @ w + b) for x in normed]
    p = [lam[0], (1 - lam[0]) * lam[1], (1 - lam[0]) * (1 - lam[1])]
    expected = sum(pt * ce for pt, ce in zip(p, ces, strict=True))
    entropy = -sum(pt * torch.log(pt) for pt in p)
    direct = (expected - beta * entropy).mean()
    direct.backward()
    assert torch.allclose(out.loss, direct, rtol=1e-5, atol=1e-6), (out.loss.item(), direct.item())
    assert set(got) == {k for k, q in model.named_parameters() if q.grad is not None}
    for k, q in model.named_parameters():
        assert torch.allclose(got[k], q.grad, rtol=1e-4, atol=1e-6), k
    assert abs(out.stats["exit/loss_last"].item() - ces[-1].mean().item()) < 1e-5
    mean_loops = sum((i + 1) * pt for i, pt in enumerate(p)).mean()
    assert abs(out.stats["exit/mean_loops"].item() - mean_loops.item()) < 1e-5


def test_stage_two_trains_only_the_gate_towards_the_improvement(tp1):
    from pretrain.models.config import LoopConfig

    k, gamma, n = 50.0, 0.005, 3
    model = build(tiny("flt", exit_gate=True), LoopConfig(exit_gate_only=True, exit_gate_sharpness=k,
                                                          exit_gate_margin=gamma), seed=1)
    with torch.no_grad():
        model.exit_gate.weight.normal_(std=1.0)
    tokens, labels = batch(B=2, T=12, seed=3)
    out = model(tokens, labels)
    out.loss.backward()
    with_grad = {name for name, q in model.named_parameters() if q.grad is not None}
    assert with_grad == {"exit_gate.weight", "exit_gate.bias"}
    got = model.exit_gate.weight.grad.clone()
    model.zero_grad()

    ces, normed = _loop_states(model, tokens, labels, n)
    w, b = model.exit_gate.weight[0], model.exit_gate.bias[0]
    total = 0.0
    for t in (1, 2):  # loops 2..T (0-based 1, 2)
        target = torch.sigmoid(k * ((ces[t - 1] - ces[t]).detach().clamp_min(0) - gamma))
        lam = torch.sigmoid(normed[t].detach() @ w + b)
        total = total + (-(target * torch.log(1 - lam) + (1 - target) * torch.log(lam))).mean()
    direct = total / n
    direct.backward()
    assert torch.allclose(out.loss, direct, rtol=1e-5), (out.loss.item(), direct.item())
    assert torch.allclose(got, model.exit_gate.weight.grad, rtol=1e-4, atol=1e-7)


def test_gate_off_leaves_the_model_unchanged_and_on_adds_only_the_gate(tp1):
    plain = build(tiny("flt"), seed=5)
    gated = build(tiny("flt", exit_gate=True), seed=5)
    p, g = dict(plain.named_parameters()), dict(gated.named_parameters())
    assert set(g) - set(p) == {"exit_gate.weight", "exit_gate.bias"}
    assert all(torch.equal(p[k], g[k]) for k in p)  # the gate is drawn last: every other weight is as before
    gated.eval()
    tokens, labels = batch(seed=6)
    assert torch.equal(plain.eval()(tokens, labels).loss, gated(tokens, labels).loss)  # eval: the LM loss


@pytest.mark.parametrize("variant", ["flt", "huginn"])
def test_threshold_one_is_the_fixed_depth_forward_and_a_saturated_gate_exits_after_one_loop(tp1, variant):
    model = build(tiny(variant, exit_gate=True), seed=2).eval()
    tokens, labels = batch(B=2, T=10, seed=7)
    fixed = model(tokens, labels, return_logits=True)
    with torch.no_grad():
        model.exit_gate.bias.fill_(40.0)  # lambda == 1.0 in fp32: the CDF reaches 1 after loop 1
    gated = model(tokens, labels, return_logits=True, exit_threshold=1.0)
    assert torch.equal(fixed.logits, gated.logits) and torch.equal(fixed.loss, gated.loss)
    assert bool((gated.exit_loops == model.cfg.loops).all())
    early = model(tokens, labels, return_logits=True, exit_threshold=0.5)
    one = model(tokens, labels, return_logits=True, loops=1)
    assert bool((early.exit_loops == 1).all())
    assert torch.equal(early.logits, one.logits)


def test_exit_threshold_needs_the_gate_and_one_rule(tp1):
    model = build(tiny("flt"), seed=0).eval()
    tokens, _ = batch(seed=0)
    with pytest.raises(ValueError, match="model.exit_gate"):
        model(tokens, exit_threshold=0.5)
    gated = build(tiny("flt", exit_gate=True), seed=0).eval()
    with pytest.raises(ValueError, match="one exit rule"):
        gated(tokens, exit_threshold=0.5, exit_epsilon=0.1)


def test_cached_generation_equals_uncached_with_tokens_exiting_at_different_loops(tp1):
    from pretrain.models.generate import generate_batch

    model = build(tiny("flt", exit_gate=True, loops=4), seed=4).eval()
    with torch.no_grad():
        model.exit_gate.weight.normal_(std=3.0)
    prompts = [[5, 17, 3, 9, 44, 2], [8, 1, 60], [12, 12, 7, 30]]
    runs = [generate_batch(model, prompts, 8, exit_threshold=0.6, use_cache=c) for c in (True, False)]
    assert runs[0].tokens == runs[1].tokens and runs[0].loops_used == runs[1].loops_used
    used = {x for row in runs[0].loops_used for x in row}
    assert len(used) > 1, used  # the test is only worth something if tokens exit at different loops
    assert max(used) <= 4 and min(used) >= 1


def test_stopped_tokens_skip_their_loops_and_offer_their_exit_loop_keys(tp1):
    """Compute really saved: with every token stopping after loop 1, prefill and each decode step run one loop (the
    core's first layer is called once per step), the later loops' cache slots hold loop 1's keys/values, and the text
    is the 1-loop model's. With mixed exits, a stopped token's slots after its exit loop are copies of its exit
    loop's."""
    from pretrain.models.generate import KVCache, generate_batch

    model = build(tiny("flt", exit_gate=True, loops=4), seed=4).eval()
    calls = []
    handle = model.core[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    prompt = [[5, 17, 3, 9, 44, 2]]
    try:
        with torch.no_grad():
            model.exit_gate.bias.fill_(40.0)
        fast = generate_batch(model, prompt, 5, exit_threshold=0.5)
        assert calls == [6, 1, 1, 1, 1]  # one loop per forward: prefill, then 4 decode steps
        assert fast.loops_used == [[1] * 5]
        assert fast.tokens == generate_batch(model, prompt, 5, loops=1).tokens
        calls.clear()

        with torch.no_grad():
            model.exit_gate.bias.fill_(0.0)
            model.exit_gate.weight.normal_(std=3.0)
        tokens = torch.tensor(prompt)
        cache = KVCache.allocate(model, 1, 6, 4)
        out = model(tokens, cache=cache, exit_threshold=0.6)
    finally:
        handle.remove()
    stops = out.exit_loops[0].tolist()
    assert len(set(stops)) > 1 and min(stops) < 4, stops
    for pos, stop in enumerate(stops):
        for t in range(stop, 4):  # 0-based loops after the exit loop `stop` (1-based)
            for i in range(2):
                at, exit_at = t * 2 + i, (stop - 1) * 2 + i  # slots: no prelude, 2 core layers
                assert torch.equal(cache.k[at][0, :, pos], cache.k[exit_at][0, :, pos])
                assert torch.equal(cache.v[at][0, :, pos], cache.v[exit_at][0, :, pos])


@pytest.mark.parametrize("flags, needle", [
    (["loop.exit_gate_only=true"], "needs model.exit_gate"),
    (["model.exit_gate=true", "loop.per_sequence=true"], "loop.per_sequence"),
    (["model.router=expert_choice", "model.exit_gate=true"], "both decide each token's depth"),
])
def test_adaptive_keys_are_checked_on_the_resolved_config(flags, needle):
    from pathlib import Path

    from loopstack.errors import ConfigError
    from pretrain.config import load_config

    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke-cpu.yaml"
    with pytest.raises(ConfigError, match=needle):
        load_config(smoke, flags)
    with pytest.raises(ConfigError, match=needle):  # the order of --set flags does not matter
        load_config(smoke, flags[::-1])

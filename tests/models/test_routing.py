"""Mixture-of-Recursions routing (pretrain/models/routing.py): router none is today's model, the gathered compute
equals the dense reference (losses and gradients), the router losses are what the paper defines, training lowers
the loss, cached generation equals uncached, the FLOP count falls with capacity and matches the counted matmuls,
and bad configs fail in one line. Recursive KV sharing (`kv_sharing=True`): off is today's model, cached equals
uncached, later loops read loop 0's K/V (a direct computation) and never write their own cache slots."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from loopstack.errors import ConfigError
from pretrain.models import LoopConfig, flops_per_token
from pretrain.models.config import ModelConfig, router_capacities
from tests.models.helpers import VOCAB, assert_checkpointing_exact, batch, build, grads, tiny


def _run(model, tokens, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(tokens, labels, return_logits=True, **kw)
    out.loss.backward()
    return out, grads(model)


def test_router_none_is_todays_model(tp1):
    """model.router: none creates nothing and leaves the model bit for bit as it was; a router is created last, so
    every other initial weight is the same with it."""
    tokens, labels = batch()
    plain = build(tiny("flt"))
    none = build(tiny("flt", router="none"))
    routed = build(tiny("flt", router="expert_choice"))
    assert plain.router is None and none.router is None
    sd, sd_none, sd_routed = plain.state_dict(), none.state_dict(), routed.state_dict()
    assert sd.keys() == sd_none.keys() and set(sd_routed) - set(sd) == {"router.weight"}
    for name in (n for n in sd if isinstance(sd[n], torch.Tensor)):  # megatron's _extra_state entries are None
        assert torch.equal(sd[name], sd_none[name]) and torch.equal(sd[name], sd_routed[name]), name
    out_plain, out_none = plain(tokens, labels), none(tokens, labels)
    assert torch.equal(out_plain.loss, out_none.loss) and out_none.stats == {}
    assert routed.router.weight.shape == (3, 32)


DENSE_CASES = [  # variant, model overrides, doc_ids: EC default capacity, EC full capacity, TC
    ("flt", dict(router="expert_choice"), True),
    ("recall", dict(router="expert_choice", router_capacity=[1.0]), False),
    ("lt_i", dict(router="token_choice", n_prelude=1, n_coda=1, loop_lora_rank=2), True),
]


@pytest.mark.parametrize("variant,kw,docs", DENSE_CASES)
def test_gathered_equals_dense(tp1, variant, kw, docs):
    """The compacted computation (only the active tokens, rotary at original positions, causal among the active,
    documents respected) equals the dense reference (every token computed, selection by masks): loss, logits,
    router stats and every gradient, in float64."""
    model = build(tiny(variant, **kw), dtype=torch.float64)
    if kw.get("loop_lora_rank"):  # non-zero LoRA B, so the per-loop adapters matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.normal_(std=0.05)
    tokens, labels = batch(B=3, T=16, seed=1)
    doc_ids = (torch.arange(16)[None] >= torch.tensor([[5], [9], [16]])).long() if docs else None
    out_g, g_g = _run(model, tokens, labels, doc_ids=doc_ids)
    model.router.dense = True
    out_d, g_d = _run(model, tokens, labels, doc_ids=doc_ids)
    torch.testing.assert_close(out_g.loss, out_d.loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_g.logits, out_d.logits, rtol=1e-9, atol=1e-9)
    assert out_g.stats.keys() == out_d.stats.keys()
    for key in out_g.stats:
        torch.testing.assert_close(out_g.stats[key], out_d.stats[key], rtol=1e-10, atol=1e-10, msg=key)
    assert g_g.keys() == g_d.keys() and "router.weight" in g_g
    for name in g_g:
        torch.testing.assert_close(g_g[name], g_d[name], rtol=1e-8, atol=1e-10, msg=name)
    depth = out_g.stats["router/mean_depth"].item()
    if kw.get("router_capacity") == [1.0]:
        assert depth == 3.0
    else:  # tokens really skip loops
        assert 1.0 <= depth < 3.0 and out_g.stats["router/selected_frac_r2"] < 1
    # the gathered path depends on the selection: a different one (another seed) changes the loss
    other = build(tiny(variant, **kw), dtype=torch.float64, seed=5)
    assert not torch.allclose(other(tokens, labels, doc_ids=doc_ids).loss, out_g.loss)


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_checkpointing_and_truncated_backprop(tp1, router):
    """Activation checkpointing (loop, layer) gives the same loss and gradients; truncated backprop builds a graph
    for the last loops only (the routers of earlier loops get no gradient through their gates)."""
    tokens, labels = batch()
    cfg = tiny("flt", router=router)
    assert_checkpointing_exact(lambda ckpt: build(cfg, activation_checkpointing=ckpt), tokens, labels)
    model = build(cfg)
    out, g = _run(model, tokens, labels, backprop_loops=1)
    assert torch.isfinite(out.loss) and "router.weight" in g
    if router == "expert_choice":  # only loop 2's router row is reached (gate and aux loss)
        assert g["router.weight"][:2].abs().max() == 0 and g["router.weight"][2].abs().max() > 0


def test_router_losses_equal_direct_computation(tp1):
    """Expert choice: BCE on the router logits towards the top-k choice, mean over the candidates; token choice:
    sum_i f_i P_i and mean logsumexp^2; the loss is LM + coefficient x each (training mode), LM alone in eval."""
    tokens, labels = batch(B=2, T=16)
    model = build(tiny("flt", loops=1, router="expert_choice", router_capacity=[0.5], router_z_coeff=0.01))
    out = model(tokens, labels)
    e = model.injection.prepare(model.embed(tokens))  # flt: h_0 is None, the router reads e at loop 1
    z = e.float() @ model.router.weight[0].float()  # [B, T]
    target = torch.zeros_like(z).scatter(1, z.topk(8, dim=1).indices, 1.0)
    aux = F.binary_cross_entropy_with_logits(z, target)
    torch.testing.assert_close(out.stats["router/aux_loss"], aux.detach())
    torch.testing.assert_close(out.stats["router/z_loss"], z.square().mean().detach())
    torch.testing.assert_close(out.loss, out.stats["router/lm_loss"] + 0.001 * aux + 0.01 * z.square().mean())
    assert out.stats["router/selected_frac_r0"] == 0.5
    model.eval()
    assert torch.equal(model(tokens, labels).loss, model(tokens, labels).stats["router/lm_loss"])

    model = build(tiny("flt", router="token_choice"))
    model.train()
    out = model(tokens, labels)
    e = model.injection.prepare(model.embed(tokens))
    logits = e.float() @ model.router.weight.float().T  # [B, T, 3]
    probs = logits.softmax(-1)
    f = 3 * F.one_hot(probs.argmax(-1), 3).float().mean((0, 1))
    balance = (f * probs.mean((0, 1))).sum()
    zl = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(out.stats["router/aux_loss"], balance.detach())
    torch.testing.assert_close(out.stats["router/z_loss"], zl.detach())
    torch.testing.assert_close(out.loss, out.stats["router/lm_loss"] + 0.1 * balance + 1e-5 * zl)
    depth = probs.argmax(-1) + 1
    torch.testing.assert_close(out.stats["router/mean_depth"], depth.float().mean())


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_training_lowers_the_loss(tp1, router):
    tokens, labels = batch(B=2, T=16)
    model = build(tiny("flt", router=router))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = model(tokens, labels)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("variant,router", [("flt", "expert_choice"), ("recall", "token_choice")])
def test_cached_generation_equals_uncached(tp1, variant, router):
    """Recursion-wise KV cache: a token's K/V at loop t is written and attended only where it was active at t (gathered
    or dense); greedy generation
    with the cache equals rerunning the whole sequence (batched prompts of different lengths too), and the cached
    prefill's logits equal the uncached forward's; the inference rule routes tokens differently."""
    from pretrain.models.generate import KVCache, generate_batch

    model = build(tiny(variant, router=router), seed=2)
    with torch.no_grad():
        model.router.weight.normal_(std=0.3)  # decisive routers: tokens differ in depth
    model.eval()
    tokens, _ = batch(B=2, T=10, seed=3)
    full = model(tokens)
    fracs = [full.stats[f"router/selected_frac_r{r}"].item() for r in range(3)]
    assert fracs[2] < 1.0 and fracs[1] > 0.0, fracs
    for dense in (False, True):  # gathered active tokens (K/V scattered to their positions), and the dense form
        model.router.dense = dense
        cache = KVCache.allocate(model, batch=2, max_len=10)
        first = model(tokens[:, :6], cache=cache)
        rest = torch.cat([model(tokens[:, i:i + 1], cache=cache).logits for i in range(6, 10)], dim=1)
        torch.testing.assert_close(torch.cat((first.logits, rest), dim=1), full.logits, rtol=1e-5, atol=1e-5)
    model.router.dense = False
    assert model.generate(tokens[:, :5], 4).tolist() == model.generate(tokens[:, :5], 4, use_cache=False).tolist()
    prompts = [tokens[0, :3].tolist(), tokens[1, :7].tolist()]
    cached = generate_batch(model, prompts, 4)
    uncached = generate_batch(model, prompts, 4, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.loops_used == uncached.loops_used  # the loops each new token ran (LoopedOutput.exit_loops)
    assert all(1 <= x <= model.cfg.loops for row in cached.loops_used for x in row)


def test_flops_fall_with_capacity_and_match_counted_matmuls(tp1):
    cfg = tiny("flt", router="expert_choice")
    full = flops_per_token(tiny("flt"), 16, 3, vocab_size=VOCAB)
    assert flops_per_token(tiny("flt"), 16, 3, vocab_size=VOCAB, capacities=[1.0]).model_flops == \
        pytest.approx(full.model_flops)
    caps = [flops_per_token(cfg, 16, 3, vocab_size=VOCAB, capacities=router_capacities(cfg, 3)[:i] or None)
            for i in (1, 2, 3)]  # [1], [1, 2/3], [1, 2/3, 1/3]
    assert caps[0].model_flops > caps[1].model_flops > caps[2].model_flops
    assert flops_per_token(cfg, 16, 3, vocab_size=VOCAB).model_flops == \
        flops_per_token(cfg, 16, 3, vocab_size=VOCAB, capacities=[1.0, 10 / 16, 5 / 16]).model_flops
    # counted on the real model, gathered compute: shares int(c T) / T at T = 16 are 16/16, 10/16, 5/16
    for router, ckpt, k, shares in [("expert_choice", "loop", 0, [1.0, 10 / 16, 5 / 16]),
                                    ("token_choice", "layer", 2, None)]:
        cfg = tiny("flt", router=router)
        model = build(cfg, LoopConfig(backprop_loops=k), activation_checkpointing=ckpt)
        tokens, labels = batch(B=2, T=16)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = model(tokens, labels)
            out.loss.backward()
        if shares is None:  # token choice: every row has the same share only on average; count rows alone
            shares = [out.stats[f"router/selected_frac_r{r}"].item() for r in range(3)]
            counter_total = None
        else:
            counter_total = counter.get_total_flops()
        f = flops_per_token(cfg, 16, 3, k, ckpt, vocab_size=VOCAB, attention="full", capacities=shares)
        assert f.hardware_flops == pytest.approx(f.model_flops + f.recompute)
        if counter_total is not None:
            assert counter_total == pytest.approx(f.hardware_flops * tokens.numel(), rel=1e-9)
        else:  # padded rows cost at least the counted share
            assert counter.get_total_flops() >= f.hardware_flops * tokens.numel() * (1 - 1e-9)


def test_config_and_forward_errors(tp1):
    from pretrain.config import load_config

    with pytest.raises(ConfigError, match=r"router_capacity\[1\].*\(0, 1\]"):
        ModelConfig(router="expert_choice", router_capacity=[1.0, 1.5]).check()
    with pytest.raises(ConfigError, match="non-increasing"):
        ModelConfig(router="expert_choice", router_capacity=[0.5, 0.8]).check()
    with pytest.raises(ConfigError, match="expert_choice only"):
        ModelConfig(router="token_choice", router_capacity=[0.5]).check_router()
    with pytest.raises(ConfigError, match="loss_on must be last"):
        build(tiny("flt", router="expert_choice"), LoopConfig(loss_on="all"))
    with pytest.raises(ConfigError, match="per_sequence"):
        ModelConfig(router="token_choice").check_router(LoopConfig(per_sequence=True))
    with pytest.raises(ConfigError, match="model.router"):
        load_config(None, ["model.router=expert"])
    with pytest.raises(ConfigError, match="router_capacity"):
        load_config(None, ["model.router_capacty=[0.5]"])
    assert router_capacities(ModelConfig(router_capacity=[0.9, 0.4]), 4) == [0.9, 0.4, 0.4, 0.4]
    assert router_capacities(ModelConfig(), 4) == [1.0, 0.75, 0.5, 0.25]
    model = build(tiny("flt", router="expert_choice"))
    tokens, labels = batch()
    with pytest.raises(ValueError, match="depth"):
        model(tokens, labels, depths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="early exit"):
        model(tokens, labels, exit_epsilon=0.1)
    # a forward with more loops than routers: expert choice reuses the last router; token choice caps the depth
    assert model(tokens, labels, loops=5).stats["router/selected_frac_r2"] > 0
    tc = build(tiny("flt", router="token_choice"))
    assert tc(tokens, labels, loops=5).stats["router/mean_depth"] <= 3


def test_expert_choice_is_hierarchical(tp1):
    """Loop t selects only among the tokens active at loop t - 1: top-k in training (k = int(c_t T), in causal
    order), sigmoid(z) >= 0.5 at inference; a capacity-1 loop keeps every candidate."""
    from pretrain.models.routing import _Routing

    model = build(tiny("flt", router="expert_choice", router_capacity=[1.0, 0.5, 0.25]))
    tokens, _ = batch(B=2, T=16)
    e = model.injection.prepare(model.embed(tokens))
    z = e.float() @ model.router.weight[1].float()
    cand = torch.ones(2, 16, dtype=torch.bool)
    cand[:, z[0].argsort(descending=True)[:4]] = False  # the router's favourites at loop 1 are not candidates
    train = _Routing(model, 3, training=True)
    assert torch.equal(train.pick(0, None, e, cand).active, cand)
    pick = train.pick(1, None, e, cand)
    assert pick.active.sum(1).tolist() == [8, 8] and not (pick.active & ~cand).any()
    assert torch.equal(pick.idx, pick.idx.sort(dim=1).values)
    infer = _Routing(model, 3, training=False).pick(1, None, e, cand)
    assert torch.equal(infer.active, cand & (z >= 0)) and infer.idx is None


# --- recursive KV sharing -----------------------------------------------------------------------------------------

def _decisive(variant: str, router: str, **kw):
    """A tiny routed model in eval mode whose routers are decisive enough that tokens differ in depth."""
    model = build(tiny(variant, router=router), seed=2, **kw)
    with torch.no_grad():
        model.router.weight.normal_(std=0.3)
    return model.eval()


def _core_slots(model, t: int) -> range:
    first = len(model.prelude) + t * len(model.core)
    return range(first, first + len(model.core))


@pytest.mark.parametrize("variant,router", [("flt", "expert_choice"), ("recall", "token_choice")])
def test_kv_sharing_cached_equals_uncached(tp1, variant, router):
    """With kv_sharing the cached prefill + decode logits equal the uncached forward's (gathered and dense), the
    cache slots of loops >= 1 are never written (they stay zero; `generate_batch` does not even allocate them), greedy
    generation of batched prompts of different lengths is the same cached and uncached, and the logits differ from
    recursion-wise caching's (the switch changes the model)."""
    from pretrain.models.generate import KVCache, generate_batch

    model = _decisive(variant, router)
    tokens, _ = batch(B=2, T=10, seed=3)
    full = model(tokens, kv_sharing=True)
    fracs = [full.stats[f"router/selected_frac_r{r}"].item() for r in range(3)]
    assert fracs[0] == 1.0 and fracs[2] < 1.0 and fracs[1] > 0.0, fracs  # loops >= 1 run a subset
    real = full.logits[..., :VOCAB]
    assert not torch.allclose(real, model(tokens).logits[..., :VOCAB], rtol=0, atol=1e-5)
    for dense in (False, True):
        model.router.dense = dense
        cache = KVCache.allocate(model, batch=2, max_len=10)
        first = model(tokens[:, :6], cache=cache, kv_sharing=True)
        rest = [model(tokens[:, i:i + 1], cache=cache, kv_sharing=True).logits for i in range(6, 10)]
        torch.testing.assert_close(torch.cat([first.logits, *rest], dim=1), full.logits, rtol=1e-5, atol=1e-5)
        assert all(cache.k[s].abs().sum() > 0 for s in _core_slots(model, 0))
        assert all(cache.k[s].abs().sum() == 0 and cache.v[s].abs().sum() == 0
                   for t in (1, 2) for s in _core_slots(model, t))
    model.router.dense = False
    prompts = [tokens[0, :3].tolist(), tokens[1, :7].tolist()]
    cached = generate_batch(model, prompts, 4, kv_sharing=True)
    uncached = generate_batch(model, prompts, 4, kv_sharing=True, use_cache=False)
    assert cached.tokens == uncached.tokens and cached.loops_used == uncached.loops_used
    shared = KVCache.allocate(model, batch=2, max_len=8, kv_sharing=True)  # what generate_batch allocates
    assert all(shared.k[s] is None for t in (1, 2) for s in _core_slots(model, t))
    assert all(shared.k[s] is not None for s in _core_slots(model, 0))


def test_kv_sharing_reads_loop_zero(tp1):
    """The kv-sharing forward equals a direct computation (float64): expert choice's inference rule run densely,
    loop 0's K/V of every core layer kept and handed to that layer in loops 1 and 2 in place of their own (causal
    over all tokens), inactive tokens keeping their state. With a cache, noise in the slots of loops >= 1 leaves the
    next token's logits bit for bit as they were, while recursion-wise caching reads them."""
    from pretrain.models.config import router_settings
    from pretrain.models.generate import KVCache

    model = _decisive("flt", "expert_choice", dtype=torch.float64)
    tokens, _ = batch(B=2, T=12, seed=4)
    out = model(tokens, kv_sharing=True)

    ctx = model._context(tokens, None, None, 3)
    e = model.injection.prepare(model._prelude(tokens, ctx))
    h = model.injection.init_state(e, model._initial_noise(e, ctx))  # flt: None
    alpha, kept = router_settings(model.cfg)[0], {}

    class Loop0KV:  # loop 0 keeps its K/V, later loops get them instead of their own
        def __init__(self, t, i):
            self.t, self.i = t, i

        def update(self, k, v):
            if self.t == 0:
                kept[self.i] = (k, v)
            return kept[self.i]

    active = torch.ones(tokens.shape, dtype=torch.bool)
    with torch.no_grad():
        for t in range(3):
            z = model.router(e if h is None else h, t)
            if t > 0:  # capacities 1, 2/3, 1/3: loop 0 keeps every token, later loops sigmoid(z) >= 0.5
                active = active & (z >= 0)
                assert 0 < active.sum() < active.numel()
            def layer(i, x, query=None, recall=None, t=t):
                return model.core[i](x, ctx.rope, query=query, recall=recall, kv_cache=Loop0KV(t, i))
            f, _ = model.injection.loop(h, e, layer)
            g = (alpha * torch.sigmoid(z))[..., None]
            new = g * f if h is None else h + g * f
            h = torch.where(active[..., None], new, e if h is None else h)
        want = model._logits(h, ctx)[..., :VOCAB]
    torch.testing.assert_close(out.logits[..., :VOCAB], want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model(tokens).logits[..., :VOCAB], want, rtol=0, atol=1e-6)

    def next_logits(sharing: bool, noise_at: int | None) -> torch.Tensor:
        cache = KVCache.allocate(model, batch=2, max_len=12)
        model(tokens[:, :11], cache=cache, kv_sharing=sharing)
        if noise_at is not None:
            with torch.no_grad():
                for s in _core_slots(model, noise_at):
                    cache.k[s][:, :, :11].normal_()
                    cache.v[s][:, :, :11].normal_()
        return model(tokens[:, 11:], cache=cache, kv_sharing=sharing).logits[..., :VOCAB]

    clean = next_logits(True, None)
    torch.testing.assert_close(clean, want[:, 11:], rtol=1e-12, atol=1e-12)
    assert torch.equal(next_logits(True, 1), clean) and torch.equal(next_logits(True, 2), clean)
    assert not torch.allclose(next_logits(True, 0), clean)  # loop 0's K/V are read
    assert not torch.allclose(next_logits(False, 1), next_logits(False, None))  # recursion-wise reads loop 1's


def test_kv_sharing_training_and_default(tp1):
    """Training with kv_sharing (expert choice's top-k, documents): the gathered compute equals the dense reference
    and activation checkpointing (loop) in loss and gradients (float64), and differs from recursion-wise; an explicit
    kv_sharing=False is the default forward bit for bit."""
    model = build(tiny("flt", router="expert_choice"), dtype=torch.float64)
    tokens, labels = batch(B=2, T=16, seed=1)
    doc_ids = (torch.arange(16)[None] >= torch.tensor([[5], [16]])).long()
    out_g, g_g = _run(model, tokens, labels, doc_ids=doc_ids, kv_sharing=True)
    model.router.dense = True
    out_d, g_d = _run(model, tokens, labels, doc_ids=doc_ids, kv_sharing=True)
    model.router.dense = False
    torch.testing.assert_close(out_g.loss, out_d.loss, rtol=1e-10, atol=1e-10)
    assert g_g.keys() == g_d.keys()
    for name in g_g:
        torch.testing.assert_close(g_g[name], g_d[name], rtol=1e-8, atol=1e-10, msg=name)
    ckpt = build(tiny("flt", router="expert_choice"), dtype=torch.float64, activation_checkpointing="loop")
    out_c, g_c = _run(ckpt, tokens, labels, doc_ids=doc_ids, kv_sharing=True)
    assert torch.equal(out_c.loss, out_g.loss) and g_c.keys() == g_g.keys()
    for name in g_g:
        torch.testing.assert_close(g_c[name], g_g[name], rtol=1e-10, atol=1e-12, msg=name)
    out_r, _ = _run(model, tokens, labels, doc_ids=doc_ids)
    assert not torch.allclose(out_r.loss, out_g.loss, rtol=0, atol=1e-9)
    out_off, g_off = _run(model, tokens, labels, doc_ids=doc_ids, kv_sharing=False)
    assert torch.equal(out_off.loss, out_r.loss) and torch.equal(out_off.logits, out_r.logits)


def test_kv_sharing_errors(tp1):
    """One-line refusals: kv_sharing without a router; expert choice whose first loop leaves tokens out
    (model.router_capacity[0] < 1), cached or not; a cache used in both modes; `loopstack generate --kv-sharing` on
    a model without a router (UserError)."""
    import argparse

    from loopstack.errors import UserError
    from pretrain.generation import check_kv_sharing_flag
    from pretrain.models.generate import KVCache
    from pretrain.use_cli import register

    tokens, _ = batch(B=1, T=6)
    with pytest.raises(ValueError, match="model.router"):
        build(tiny("flt"))(tokens, kv_sharing=True)
    partial_first = build(tiny("flt", router="expert_choice", router_capacity=[0.5])).eval()
    for cache in (None, KVCache.allocate(partial_first, 1, 6)):
        with pytest.raises(ValueError, match=r"model.router_capacity\[0\] = 0.5"):
            partial_first(tokens, cache=cache, kv_sharing=True)
    model = _decisive("flt", "expert_choice")
    cache = KVCache.allocate(model, 1, 8)
    model(tokens, cache=cache)
    with pytest.raises(ValueError, match="kv_sharing=False"):
        model(tokens[:, :1], cache=cache, kv_sharing=True)
    with pytest.raises(ValueError, match="kv_sharing=True"):
        model(tokens, cache=KVCache.allocate(model, 1, 8, kv_sharing=True))
    with pytest.raises(UserError, match="--kv-sharing.*model.router"):
        check_kv_sharing_flag(tiny("flt"), 3)
    with pytest.raises(UserError, match=r"--kv-sharing.*router_capacity\[0\]"):
        check_kv_sharing_flag(tiny("flt", router="expert_choice", router_capacity=[0.9]), 3)
    check_kv_sharing_flag(tiny("flt", router="token_choice"), 3)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["generate", "run", "--kv-sharing"]).kv_sharing
    assert not parser.parse_args(["generate", "run"]).kv_sharing

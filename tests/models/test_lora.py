"""Per-loop LoRA (relaxed sharing, `model.loop_lora_*`): identity at init, bank size and reuse, roles and optimizer
groups, parameter and FLOP counts, checkpointing, TP=2 == TP=1 in real gloo processes, and one real DeepSpeed step
that moves B. The delta itself is checked against the float64 reference in test_reference.py."""

import pytest
import torch

from loopstack.errors import ConfigError
from pretrain.models import LoopConfig, count_parameters, flops_per_token, param_roles
from pretrain.models.config import lora_bank, lora_targets, projection_dims
from tests.dist import run_distributed
from tests.models.helpers import VOCAB, assert_checkpointing_exact, batch, build, tiny, tp2_then_tp1


def _randomise_b(model, seed: int = 5, std: float = 0.3) -> None:
    """Set every adapter's B (zero at init) to a seeded random value, the same whole tensor at any TP size."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(seed)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("loop_lora.") and name.endswith(".B"):
                shape = list(p.shape)
                if getattr(p, "tensor_model_parallel", False):
                    shape[p.partition_dim] *= tp
                full = std * torch.randn(shape, generator=g, dtype=p.dtype)
                p.copy_(full.chunk(tp, p.partition_dim)[rank] if getattr(p, "tensor_model_parallel", False) else full)


@pytest.mark.parametrize("variant,kw", [("flt", {}), ("huginn", dict(n_kv_heads=1)), ("parcae", {}),
                                        ("recall", dict(mlp="swiglu", loop_lora_targets=["wq", "w_gate"]))])
def test_at_init_the_model_is_the_shared_model(tp1, variant, kw):
    """B = 0 and the adapters are created last: every other initial weight, the loss and the logits are those of
    the model without LoRA, bit for bit (float64)."""
    tokens, labels = batch(seed=3)
    base = build(tiny(variant, **kw), dtype=torch.float64)
    lora = build(tiny(variant, loop_lora_rank=4, **kw), dtype=torch.float64)
    plain = dict(base.named_parameters())
    for name, p in lora.named_parameters():
        if name.startswith("loop_lora."):
            assert name.endswith(".A") or not p.any()
        else:
            assert torch.equal(p, plain[name]), name
    base.eval(), lora.eval()  # random h_0 (huginn, parcae): the deterministic eval-mode state
    a, b = base(tokens, labels, return_logits=True), lora(tokens, labels, return_logits=True)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)


def test_bank_size_targets_and_reuse(tp1):
    cfg = tiny("flt", loop_lora_rank=2)
    assert lora_bank(cfg, LoopConfig()) == 3  # fixed: model.loops
    assert lora_bank(cfg, LoopConfig(sampler="uniform")) == 5  # 2 x loops - min_loops
    assert lora_bank(cfg, LoopConfig(sampler="uniform", max_loops=4)) == 4
    assert lora_bank(cfg, LoopConfig(sampler="poisson_lognormal", max_loops=9)) == 9
    assert lora_bank(cfg, LoopConfig(sampler="poisson_lognormal")) == 3  # unbounded: model.loops
    assert lora_bank(tiny("flt"), LoopConfig()) == 0
    assert lora_targets(cfg) == ("wq", "wk", "wv", "wo", "w_up", "w_down")  # relu2: no gate
    assert lora_targets(tiny("flt", loop_lora_rank=2, mlp="swiglu", loop_lora_targets=["w_down", "wq"])) == \
        ("wq", "w_down")
    with pytest.raises(ConfigError, match="w_gate"):
        tiny("flt", loop_lora_rank=2, loop_lora_targets=["w_gate"]).check()

    model = build(cfg, LoopConfig(sampler="uniform", max_loops=4))
    assert model.loop_lora[0]["wq"].A.shape == (4, 2, 32) and model.loop_lora[1]["w_down"].B.shape == (4, 32, 2)
    assert model.core[0].attn.wq.weight.shape == (32, 32)  # the core itself is unchanged
    # loops beyond the bank reuse the last adapter: 6 loops with adapters 0..3 then 3, 3; no index error
    _randomise_b(model)
    tokens, labels = batch()
    out = model(tokens, labels, loops=6)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for adapter in (model.loop_lora[0]["wq"], model.loop_lora[1]["w_down"]):
        assert all(adapter.A.grad[t].abs().sum() > 0 for t in range(4))
    # the last adapter really serves loops 4..6: changing only it changes the loss at 6 loops but not at 3
    with torch.no_grad():
        at3, at6 = model(tokens, labels, loops=3).loss, model(tokens, labels, loops=6).loss
        for layer in model.loop_lora:
            for adapter in layer.values():
                adapter.B[3] += 0.5
        assert torch.equal(model(tokens, labels, loops=3).loss, at3)
        assert not torch.equal(model(tokens, labels, loops=6).loss, at6)


def test_roles_optimizer_groups_and_counts(tp1):
    from pretrain.config import TrainConfig
    from pretrain.optim import build_param_groups

    cfg, loop_cfg = tiny("huginn", loop_lora_rank=3), LoopConfig(sampler="uniform", min_loops=2)
    model = build(cfg, loop_cfg)
    roles = param_roles(model)
    lora = {n for n, r in roles.items() if r == "lora"}
    assert lora == {n for n, _ in model.named_parameters() if n.startswith("loop_lora.")}
    assert len(lora) == 2 * 2 * 7  # 2 core layers x 7 projections (swiglu) x (A, B); prelude/coda get none
    ids = {id(p) for n, p in model.named_parameters() if n in lora}
    for optimizer in ("adamw", "muon"):
        groups = build_param_groups(model, roles, TrainConfig(optimizer=optimizer, weight_decay=0.1))
        home = [g for g in groups if ids & {id(p) for p in g["params"]}]
        assert [g["name"] for g in home] == ["adamw_no_decay"] and home[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="unknown roles"):
        build_param_groups(model, {**roles, next(iter(lora)): "adapter"}, TrainConfig())
    n = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg, VOCAB, loop_cfg) == n
    dims = projection_dims(cfg)
    assert n - count_parameters(tiny("huginn"), VOCAB) == 2 * 4 * 3 * sum(a + b for a, b in dims.values())


def test_kv_cache_generation_equals_uncached(tp1):
    """The cached forward selects each (loop, layer)'s adapter as the uncached one does."""
    model = build(tiny("flt", loop_lora_rank=2, init_std=0.3), dtype=torch.float64).eval()
    _randomise_b(model, std=1.0)
    tokens, _ = batch(seed=6)
    cached = model.generate(tokens[:, :5], 6, use_cache=True)
    assert torch.equal(cached, model.generate(tokens[:, :5], 6, use_cache=False))
    with torch.no_grad():
        for layer in model.loop_lora:
            for adapter in layer.values():
                adapter.B.zero_()
    assert not torch.equal(cached, model.generate(tokens[:, :5], 6, use_cache=True))  # the adapters mattered


@pytest.mark.parametrize("ckpt", ["none", "loop", "layer"])
def test_flops_count_the_adapters(ckpt):
    cfg, r = tiny("flt", loop_lora_rank=4, mlp="swiglu"), 4
    per_loop = 2 * sum(2 * r * (a + b) for a, b in projection_dims(cfg).values())  # 2 core layers
    with_lora = flops_per_token(cfg, 64, 6, 2, ckpt, vocab_size=VOCAB)
    without = flops_per_token(tiny("flt", mlp="swiglu"), 64, 6, 2, ckpt, vocab_size=VOCAB)
    assert with_lora.core_forward - without.core_forward == per_loop
    assert with_lora.model_flops - without.model_flops == (4 + 3 * 2) * per_loop  # 4 no-grad + 2 backprop loops
    recomputed = {"none": 0, "loop": 2, "layer": 2}[ckpt] * per_loop
    assert with_lora.hardware_flops - without.hardware_flops == (4 + 3 * 2) * per_loop + recomputed


def test_checkpointing_gives_identical_gradients(tp1):
    def make(ckpt):
        model = build(tiny("flt", loops=4, loop_lora_rank=2, mlp="swiglu"), LoopConfig(backprop_loops=3),
                      activation_checkpointing=ckpt)
        _randomise_b(model)
        return model

    assert_checkpointing_exact(make, *batch(seed=2))


# --- TP=2 == TP=1 ------------------------------------------------------------------------------------------

# (variant, model overrides, loop overrides, activation checkpointing, forward loops): column- and row-parallel
# adapters, GQA, SwiGLU, alpha, a subset of targets, truncated backprop, loops beyond the bank
TP_CASES = [
    ("flt", dict(loop_lora_rank=4), {}, "none", None),
    ("huginn", dict(loop_lora_rank=2, n_heads=4, n_kv_heads=2, loop_lora_alpha=5.0, state_init="zeros"),
     dict(backprop_loops=2), "layer", None),
    ("looped", dict(loop_lora_rank=3, mlp="swiglu", loop_lora_targets=["wo", "w_gate", "w_down"]), {}, "loop", 5),
]


def _run_tp_case(case):
    from pretrain.models.generate import gather_vocab
    from tests.models.test_tp import _gather_like

    variant, mkw, lkw, ckpt, loops = case
    model = build(tiny(variant, **mkw), LoopConfig(**lkw), seed=3, activation_checkpointing=ckpt)
    init = {n: _gather_like(p, p) for n, p in model.named_parameters() if n.startswith("loop_lora.")}
    _randomise_b(model)
    tokens, labels = batch(B=2, T=16, seed=4)
    out = model(tokens, labels, loops=loops, return_logits=True)
    out.loss.backward()
    return dict(loss=out.loss.item(), init=init, logits=gather_vocab(out.logits.detach()).numpy(),
                grads={n: _gather_like(p, p.grad) for n, p in model.named_parameters()})


def _lora_tp_vs_tp1(cases):
    env, tp2, tp1 = tp2_then_tp1(_run_case_checked, cases, _run_tp_case)
    if env.rank != 0:
        return dict(losses=[r["loss"] for r in tp2])
    return dict(tp2=tp2, tp1=tp1, losses=[r["loss"] for r in tp2])


def _run_case_checked(case):
    """Under TP=2: the case, plus a check that adapters carry megatron's split attributes as documented."""
    from pretrain.models.lora import ROW_PARALLEL

    result = _run_tp_case(case)
    variant, mkw, lkw, ckpt, _ = case
    model = build(tiny(variant, **mkw), LoopConfig(**lkw), seed=3)
    for name, p in model.named_parameters():
        if name.startswith("loop_lora."):
            proj, which = name.split(".")[2:]
            want = {("A", True): 2, ("B", False): 1}.get((which, proj in ROW_PARALLEL))
            assert (p.partition_dim if p.tensor_model_parallel else None) == want, name
    return result


def test_lora_tp2_equals_tp1():
    rank0, rank1 = run_distributed(_lora_tp_vs_tp1, 2, args=(TP_CASES,), timeout=400)
    assert rank0["losses"] == rank1["losses"]
    for case, a, b in zip(TP_CASES, rank0["tp2"], rank0["tp1"], strict=True):
        name = f"{case[0]} {case[1]} {case[2]} {case[3]}"
        assert a["init"].keys() == b["init"].keys() and a["init"]
        for n in a["init"]:  # the unsharded initial adapters do not depend on TP
            assert (a["init"][n] == b["init"][n]).all(), f"{name}: initial {n} differs"
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(torch.from_numpy(a["logits"]), torch.from_numpy(b["logits"]), rtol=1e-5,
                                   atol=1e-5, msg=name)
        assert a["grads"].keys() == b["grads"].keys()
        for n in a["grads"]:
            ga, gb = torch.from_numpy(a["grads"][n]), torch.from_numpy(b["grads"][n])
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {n}")
            if n.startswith("loop_lora."):
                assert gb.abs().sum() > 0, f"{name}: no gradient reaches {n}"


# --- a real optimizer step ---------------------------------------------------------------------------------

def _whole(p: torch.nn.Parameter) -> torch.Tensor:
    """A copy of the parameter's value (ZeRO-3: gathered from its partitions)."""
    if hasattr(p, "ds_tensor"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    return p.detach().clone()


def _engine_steps(zero_stages):
    from pretrain.config import load_config
    from pretrain.distributed import init_distributed
    from pretrain.engine import build_engine
    from pretrain.models import build_model
    from pretrain.optim import set_lr
    from tests.trainer.conftest import SMOKE

    env = init_distributed(tp=1, seed=0)
    out = {}
    for zero in zero_stages:
        cfg = load_config(SMOKE, ["model.loop_lora_rank=2", f"model.vocab_size={VOCAB}", "train.optimizer=muon",
                                  f"parallel.zero_stage={zero}", "train.weight_decay=0.1"])
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.loop, VOCAB)
        engine = build_engine(model, cfg, env, param_roles(model))
        named = dict(engine.module.named_parameters())
        lora = [n for n in named if n.startswith("loop_lora.")]
        before = {n: _whole(named[n]) for n in lora}
        set_lr(engine.optimizer, 0, cfg.train)
        tokens, labels = batch(B=cfg.train.micro_batch, T=cfg.data.seq_len)
        loss = engine(tokens, labels).loss
        engine.backward(loss)
        engine.step()
        after = {n: _whole(named[n]) for n in lora}
        out[zero] = {n: (bool(before[n].any()), bool(after[n].any()), bool(torch.equal(before[n], after[n])))
                     for n in lora}
    return out, env.rank


def test_one_deepspeed_step_trains_the_adapters():
    """After one optimizer step (DeepSpeed, Muon for the core matrices, weight decay 0.1) every B has left zero;
    A, whose gradient is zero while B is, is untouched: AdamW with no decay, not Muon (which would move it)."""
    (out, _), = run_distributed(_engine_steps, 1, args=([1, 3],), timeout=300)
    for zero, result in out.items():
        assert result, zero
        for n, (nonzero_before, nonzero_after, unchanged) in result.items():
            if n.endswith(".B"):
                assert not nonzero_before and nonzero_after, (zero, n)
            else:
                assert nonzero_before and unchanged, (zero, n)

"""Per-sequence depth (`loop.per_sequence`, Parcae): the batched forward equals every sequence run alone at its
own loop count, the draws are a pure function of (seed, step, global sequence index), the FLOP count, the
refusals, and TP=2 equals TP=1 in real 2-process gloo runs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.models.config import LoopConfig
from pretrain.models.depth import curriculum_cap, global_sequence_index, sequence_loops
from pretrain.models.flops import flops_per_token, per_sequence_flops
from tests.dist import run_distributed
from tests.models.helpers import VOCAB, batch, build, tiny, tp2_then_tp1

DEPTHS = [1, 4, 2, 3]


def _loss64(logits, labels):
    """The float64 cross-entropy of the returned logits (the model's own loss is fp32)."""
    return F.cross_entropy(logits[..., :VOCAB].flatten(0, 1), labels.flatten())


@pytest.mark.parametrize("variant,backprop,ckpt", [("flt", 0, "none"), ("flt", 2, "loop"), ("parcae", 2, "layer"),
                                                   ("huginn", 1, "none"), ("lt_i", 3, "none")])
def test_batched_equals_each_sequence_alone(tp1, variant, backprop, ckpt):
    """The key property: per sequence, logits and gradients are those of that sequence alone at its own loop
    count with the same truncated backprop (its own last `backprop` loops), in float64. Frozen loops hand no
    gradient to a finished sequence, and loops before a sequence's window none to anything."""
    model = build(tiny(variant, init_std=0.3), LoopConfig(backprop_loops=backprop), dtype=torch.float64,
                  activation_checkpointing=ckpt)
    model.eval()  # random h_0 (huginn, parcae) is then a fixed function of position: the same alone and batched
    tokens, labels = batch(B=len(DEPTHS), seed=5)
    out = model(tokens, labels, depths=torch.tensor(DEPTHS), return_logits=True)
    _loss64(out.logits, labels).backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    alone = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b, d in enumerate(DEPTHS):
        model.zero_grad(set_to_none=True)
        one = model(tokens[b:b + 1], labels[b:b + 1], loops=d, return_logits=True)
        torch.testing.assert_close(out.logits[b:b + 1, :, :VOCAB], one.logits[..., :VOCAB], rtol=1e-12, atol=1e-12)
        (_loss64(one.logits, labels[b:b + 1]) / len(DEPTHS)).backward()  # every sequence has T valid labels
        for n, p in model.named_parameters():
            if p.grad is not None:
                alone[n] += p.grad
    assert batched.keys() <= alone.keys()
    for n, g in alone.items():
        torch.testing.assert_close(batched.get(n, torch.zeros_like(g)), g, rtol=1e-10, atol=1e-13, msg=n)


def test_depths_of_one_value_equal_the_plain_forward(tp1):
    model = build(tiny("flt"), LoopConfig(backprop_loops=2), dtype=torch.float64)
    tokens, labels = batch(B=2)
    a = model(tokens, labels, depths=torch.tensor([3, 3]), return_logits=True)
    b = model(tokens, labels, loops=3, return_logits=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_inference_paths_and_other_loss_loops_are_refused(tp1):
    from pretrain.models.generate import KVCache

    model = build(tiny("flt"))
    tokens, labels = batch(B=2)
    d = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="training path"):
        model(tokens, depths=d, exit_epsilon=1e-3)
    with pytest.raises(ValueError, match="training path"):
        model(tokens, depths=d, cache=KVCache.allocate(model, 2, 16))
    with pytest.raises(ValueError, match="loss_on = last"):
        model(tokens, labels, depths=d, loss_on="all")
    with pytest.raises(ValueError, match="loop counts >= 1"):
        model(tokens, labels, depths=torch.tensor([0, 2]))


def test_loss_on_other_than_last_is_a_config_error():
    from loopstack.errors import ConfigError
    from pretrain.config import load_config

    with pytest.raises(ConfigError, match="loop.per_sequence needs loop.loss_on: last, not 'last_third'"):
        load_config("configs/smoke-cpu.yaml", ["loop.per_sequence=true", "loop.loss_on=last_third"])


def test_sequence_draws_are_a_pure_function_of_seed_step_and_index():
    cfg = LoopConfig(sampler="uniform", per_sequence=True)
    whole = sequence_loops(cfg, 4, 1234, 7, 0, 64)
    assert whole.dtype == np.int64 and whole.min() >= 1 and whole.max() <= 7
    assert len(set(whole.tolist())) > 3  # the sequences of one step differ
    # any slice of the global batch is the same draw: how ranks and micro steps split it does not matter
    assert (sequence_loops(cfg, 4, 1234, 7, 40, 8) == whole[40:48]).all()
    assert not (sequence_loops(cfg, 4, 1234, 8, 0, 64) == whole).all()  # a new step draws anew
    assert not (sequence_loops(cfg, 4, 99, 7, 0, 64) == whole).all()
    # micro step 1, DP rank 2 of 4, micro batch 3: rows 18..20 of the step's global batch
    assert global_sequence_index(1, 2, 4, 3) == 18
    poisson = sequence_loops(LoopConfig(sampler="poisson_lognormal", max_loops=12), 4, 0, 0, 0, 4000)
    assert abs(poisson.mean() - 4) < 0.3 and poisson.max() <= 12
    fixed = sequence_loops(LoopConfig(), 4, 0, 0, 0, 10)
    assert (fixed == 4).all()


def test_sequence_draws_respect_the_curriculum_cap():
    cfg = LoopConfig(sampler="uniform", per_sequence=True, curriculum_start=1, curriculum_steps=6)
    for step in range(8):
        cap = curriculum_cap(cfg, 4, step)
        drawn = sequence_loops(cfg, 4, 3, step, 0, 32)
        assert drawn.max() <= cap
        free = sequence_loops(LoopConfig(sampler="uniform", per_sequence=True), 4, 3, step, 0, 32)
        assert (drawn == np.minimum(free, cap)).all()  # the same draws, clamped


def test_per_sequence_flops():
    cfg = tiny("flt", vocab_size=VOCAB)
    same = per_sequence_flops(cfg, 64, [[3, 3], [3, 3]], 2, "loop")
    ref = flops_per_token(cfg, 64, 3, 2, "loop", loss_on="last")
    assert same == pytest.approx((ref.model_flops, ref.hardware_flops))
    # model: the mean of each sequence's own cost; hardware: each micro batch runs its max with a graph from the
    # earliest window start ([1, 4]: 4 loops, windows from 0 and 2 -> all 4 with a graph; [2, 2]: 2 and 2)
    model, hardware = per_sequence_flops(cfg, 64, [[1, 4], [2, 2]], 2)
    want = np.mean([flops_per_token(cfg, 64, d, 2).model_flops for d in (1, 4, 2, 2)])
    assert model == pytest.approx(want)
    assert hardware == pytest.approx((flops_per_token(cfg, 64, 4, 4).hardware_flops
                                      + flops_per_token(cfg, 64, 2, 2).hardware_flops) / 2)
    assert hardware > model


# --- TP=2 equals TP=1 (real gloo processes) --------------------------------------------------------------------

TP_CASES = [("flt", 0, "none"), ("parcae", 2, "loop")]


def _run_tp_case(case):
    from pretrain.models.generate import gather_vocab
    from tests.models.test_tp import _gather_like

    variant, backprop, ckpt = case
    model = build(tiny(variant, qk_norm=True), LoopConfig(backprop_loops=backprop, per_sequence=True), seed=3,
                  activation_checkpointing=ckpt)
    tokens, labels = batch(B=4, T=16, seed=6)
    out = model(tokens, labels, depths=torch.tensor([2, 5, 1, 3]), diagnostics=True, return_logits=True)
    out.loss.backward()
    return dict(loss=out.loss.item(), logits=gather_vocab(out.logits.detach()).numpy(),
                grads={n: _gather_like(p, p.grad) for n, p in model.named_parameters()})


def _tp_vs_tp1(cases):
    env, tp2, tp1 = tp2_then_tp1(_run_tp_case, cases)
    depths = sequence_loops(LoopConfig(sampler="uniform", per_sequence=True), 4, 1234, 3, 0, 16).tolist()
    if env.rank != 0:
        return dict(losses=[r["loss"] for r in tp2], depths=depths)
    return dict(tp2=tp2, tp1=tp1, losses=[r["loss"] for r in tp2], depths=depths)


def test_tp2_equals_tp1_with_per_sequence_depth():
    rank0, rank1 = run_distributed(_tp_vs_tp1, 2, args=(TP_CASES,), timeout=300)
    assert rank0["losses"] == rank1["losses"] and rank0["depths"] == rank1["depths"]
    for case, a, b in zip(TP_CASES, rank0["tp2"], rank0["tp1"], strict=True):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-6, msg=str(case))
        torch.testing.assert_close(torch.from_numpy(a["logits"]), torch.from_numpy(b["logits"]), rtol=1e-5,
                                   atol=1e-5, msg=str(case))
        for n in a["grads"]:
            torch.testing.assert_close(torch.from_numpy(a["grads"][n]), torch.from_numpy(b["grads"][n]), rtol=1e-4,
                                       atol=1e-6, msg=f"{case}: gradient of {n}")

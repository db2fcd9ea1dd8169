"""TP=2 equals TP=1: initial weights, loss, logits, diagnostics and full gradients, for every variant, in real
2-process gloo runs. One run builds every case with TP=2, then re-creates megatron's groups with TP=1 (DP=2) in
the same processes and builds every case again from the same seed."""

import torch

from tests.dist import run_distributed
from tests.models.helpers import GPT2_LIKE, VARIANTS, tp2_then_tp1

# (variant, model overrides, loop overrides, activation checkpointing): together they cover GQA, SwiGLU, untied
# heads, prelude/coda, a padded vocabulary split across ranks, loss on several loops and truncated backprop; the
# GPT-2-style case: LayerNorm, learned positions (replicated), GELU, biases on every projection (column-parallel
# biases split, row-parallel ones replicated)
CASES = [(v, {}, {}, "none") for v in VARIANTS] + [
    ("flt", dict(n_heads=4, n_kv_heads=2, mlp="swiglu", tie_embeddings=False), dict(loss_on="all"), "loop"),
    ("huginn", dict(n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1), dict(backprop_loops=2), "layer"),
    ("parcae", dict(qk_norm=True, tie_embeddings=False), dict(loss_on="last_third", backprop_loops=2), "loop"),
    ("recall", dict(GPT2_LIKE, n_heads=4, n_prelude=1, n_coda=1), dict(backprop_loops=2), "layer"),
    # the learned exit gate's objective (every loop's loss head, checkpointed) and its replicated gate; the chunked
    # loss (7 tokens at a time: chunks that do not divide the batch)
    ("lt_i", dict(exit_gate=True, loss_chunk=7), dict(backprop_loops=2), "loop"),
    # Mixture-of-Recursions routing (routers replicated, fp32, the same top-k on every rank; gathered tokens)
    ("flt", dict(router="expert_choice", n_prelude=1, n_coda=1), {}, "loop"),
    ("recall", dict(router="token_choice", n_heads=4, n_kv_heads=2), dict(backprop_loops=2), "none"),
]


def _gather_like(p: torch.nn.Parameter, t: torch.Tensor) -> torch.Tensor:
    """The full tensor `t` (the parameter `p` or its gradient), concatenated along p's partition dim if p is
    TP-sharded."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return t.detach().numpy().copy()
    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=p.partition_dim).numpy()  # numpy: tensors would travel back as shared memory


def _run_case(case):
    from pretrain.models.config import LoopConfig
    from pretrain.models.generate import gather_vocab
    from tests.models.helpers import batch, build, tiny

    variant, mkw, lkw, ckpt = case
    mkw = dict(mkw)
    chunk = mkw.pop("loss_chunk", 0)  # the trainer's train.loss_chunk_tokens, set on the built model
    model = build(tiny(variant, **mkw), LoopConfig(**lkw), seed=3, activation_checkpointing=ckpt)
    model.loss_chunk = chunk
    init = {n: _gather_like(p, p) for n, p in model.named_parameters()}
    tokens, labels = batch(B=2, T=16, seed=4)
    out = model(tokens, labels, diagnostics=True, return_logits=True)
    out.loss.backward()
    result = dict(loss=out.loss.item(), init=init, logits=gather_vocab(out.logits.detach()).numpy(),
                  grads={n: _gather_like(p, p.grad) for n, p in model.named_parameters()},
                  state_norm=out.diagnostics.state_norm, grad_norm=out.diagnostics.grad_norm)
    if variant == "flt" and (not mkw or "router" in mkw):  # routed: the recursion-wise KV cache under TP
        result["generated"] = model.generate(tokens[:, :5], 4).tolist()
    return result


def _tp_vs_tp1(cases):
    from pretrain.models.config import LoopConfig
    from pretrain.models.depth import sample_loops

    env, tp2, tp1 = tp2_then_tp1(_run_case, cases)
    depths = [sample_loops(LoopConfig(sampler="poisson_lognormal"), 8, 1234, s) for s in range(50)]
    if env.rank != 0:  # the other rank only proves it computed the same loss
        return dict(losses=[r["loss"] for r in tp2], depths=depths)
    return dict(tp2=tp2, tp1=tp1, losses=[r["loss"] for r in tp2], depths=depths)


def test_tp2_equals_tp1_for_every_variant():
    rank0, rank1 = run_distributed(_tp_vs_tp1, 2, args=(CASES,), timeout=400)
    assert rank0["losses"] == rank1["losses"]  # the loss is identical on every TP rank
    assert rank0["depths"] == rank1["depths"]  # the depth sampler agrees across ranks without communication
    for case, a, b in zip(CASES, rank0["tp2"], rank0["tp1"], strict=True):
        name = f"{case[0]} {case[1]} {case[2]} {case[3]}"
        assert a["init"].keys() == b["init"].keys()
        for n in a["init"]:  # the unsharded initial weights do not depend on TP
            assert (a["init"][n] == b["init"][n]).all(), f"{name}: initial {n} differs"
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(torch.from_numpy(a["logits"]), torch.from_numpy(b["logits"]), rtol=1e-5, atol=1e-5,
                                   msg=name)
        torch.testing.assert_close(a["state_norm"], b["state_norm"], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a["grad_norm"], b["grad_norm"], rtol=1e-4, atol=1e-7, msg=name)
        for n in a["grads"]:
            ga, gb = torch.from_numpy(a["grads"][n]), torch.from_numpy(b["grads"][n])
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {n}")
        assert a.get("generated") == b.get("generated")
    assert any("generated" in r for r in rank0["tp2"])

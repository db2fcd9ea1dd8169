"""The nanochat training recipe's config choices (the FLT paper's official code): `train.adamw_lr_scaling`,
`train.muon_ns_dtype` and `train.dtype: bf16_autocast`, on the real optimizer, model and trainer. (`model.init` is
tests/models/test_init.py.)"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from pretrain.config import TrainConfig
from tests.trainer.conftest import losses, run_train


@pytest.fixture(scope="module")
def tp1():
    from pretrain.distributed import init_distributed, shutdown

    env = init_distributed(tp=1, seed=0)
    yield env
    shutdown()


def _tiny(**kw):
    from tests.models.helpers import build, tiny

    return build(tiny("looped", tie_embeddings=False, **kw), seed=1)


def test_nanochat_lr_scaling_reaches_the_optimizer_groups(tp1):
    """adamw_lr_scaling: nanochat multiplies the embedding and head lrs by (d_model / 768)^-0.5 = sqrt(24) at
    d_model 32, at build and at every set_lr; Muon and the other AdamW groups (norm gains here) keep theirs."""
    from pretrain.models import param_roles
    from pretrain.optim import build_optimizer, set_lr

    model = _tiny()  # d_model 32, norm gains (variant looped): an adamw_no_decay group too
    base = replace(TrainConfig(), optimizer="muon", lr=1e-3, embed_lr=0.2, head_lr=0.004, muon_lr=0.02,
                   warmup_steps=4, steps=10)
    scale = math.sqrt(768 / 32)
    for rule, want in (("none", dict(embedding=0.2, head=0.004, muon=0.02, adamw_no_decay=1e-3)),
                       ("nanochat", dict(embedding=0.2 * scale, head=0.004 * scale, muon=0.02,
                                         adamw_no_decay=1e-3))):
        cfg = replace(base, adamw_lr_scaling=rule)
        opt = build_optimizer(model, param_roles(model), cfg)
        assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(want, rel=1e-12), rule
        assert set_lr(opt, 1, cfg) == pytest.approx(0.5)  # warmup: step 1 of 4
        assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
            {k: v * 0.5 for k, v in want.items()}, rel=1e-12), rule


def test_muon_ns_dtype_bf16_changes_the_update_slightly():
    """muon_ns_dtype: bf16 runs Newton-Schulz in bf16 (nanochat): the update is close to fp32's, not equal; auto is
    fp32 on CPU and bf16 on CUDA."""
    from pretrain.optim import build_optimizer, ns_dtype

    torch.manual_seed(0)
    w0, grad = torch.randn(48, 32), torch.randn(48, 32)
    updates = {}
    for choice in ("fp32", "bf16"):
        net = torch.nn.Linear(32, 48, bias=False)
        with torch.no_grad():
            net.weight.copy_(w0)
        net.weight.grad = grad.clone()
        opt = build_optimizer(net, {"weight": "matrix"}, replace(TrainConfig(), optimizer="muon", muon_lr=0.02,
                                                                 muon_ns_dtype=choice))
        opt.step()
        assert net.weight.dtype == torch.float32
        updates[choice] = (w0 - net.weight.detach()) / 0.02
    a, b = updates["fp32"], updates["bf16"]
    assert not torch.equal(a, b)
    assert ((a - b).norm() / a.norm()).item() < 0.05
    auto = replace(TrainConfig(), muon_ns_dtype="auto")
    assert ns_dtype(auto, torch.device("cpu")) == torch.float32 and ns_dtype(auto, None) == torch.float32
    assert ns_dtype(auto, torch.device("cuda")) == torch.bfloat16
    assert ns_dtype(replace(auto, muon_ns_dtype="bf16"), torch.device("cpu")) == torch.bfloat16


def test_bf16_autocast_forward(tp1):
    """autocast_dtype bf16: the projections compute in bf16 (the loss differs from fp32, but is close; the same
    input twice gives the same loss), while parameters and their gradients stay fp32."""
    from tests.models.helpers import batch

    model = _tiny(loops=2)
    tokens, labels = batch(seed=3)
    fp32 = model(tokens, labels).loss.item()
    seen = []
    model.core[0].attn.wq.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    model.autocast_dtype = torch.bfloat16
    out = model(tokens, labels)
    out.loss.backward()
    again = model(tokens, labels).loss
    assert seen == [torch.bfloat16] * 2 * 2  # two loops, two forwards
    assert out.loss.dtype == torch.float32 and out.loss.item() == again.item()
    assert out.loss.item() != fp32 and out.loss.item() == pytest.approx(fp32, rel=2e-2)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters()
               if p.grad is not None)
    assert not torch.is_autocast_enabled("cpu")  # only inside the forward


def test_nanochat_recipe_trains_through_the_trainer(smoke_data, tmp_path):
    """Three steps of the real trainer with all four nanochat choices (bf16_autocast, Muon's NS in bf16, the AdamW lr
    scaling, the nanochat init; ZeRO-1): finite losses; the checkpoint's weights and optimizer state are fp32;
    `loopstack eval` and `load_run` run the forward under autocast like training, so eval repeats the trainer's
    final held-out loss exactly."""
    from pretrain.checkpoint import safe_load
    from pretrain.config import load_config
    from pretrain.distributed import shutdown
    from pretrain.inference import load_run
    from pretrain.train import evaluate_run

    run = tmp_path / "nanochat"
    flags = smoke_data + ["train.steps=3", "train.warmup_steps=0", "logging.every=1", "checkpoint.every=3",
                          "eval.batches=1", "eval.loops=[3]", "logging.diagnostics_every=0",
                          "train.dtype=bf16_autocast", "train.muon_ns_dtype=bf16", "train.adamw_lr_scaling=nanochat",
                          "train.embed_lr=0.2", "train.head_lr=0.004", "model.init=nanochat",
                          "model.tie_embeddings=false"]
    run_train(1, run, flags)
    got = losses(run)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    ckpt = run / "checkpoints" / "3"
    module = safe_load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    weights = [t for t in module.values() if torch.is_tensor(t)]  # megatron's _extra_state entries are None
    assert weights and all(t.dtype == torch.float32 for t in weights)
    (optim_file,) = ckpt.glob("*optim_states.pt")
    state = safe_load(optim_file, map_location="cpu")["optimizer_state_dict"]
    flat = state["single_partition_of_fp32_groups"]
    assert flat and all(t.dtype == torch.float32 for t in flat)
    trained = json.loads((run / "eval" / "step_3.json").read_text())["loss_vs_loops"]["3"]

    evaluate_run(load_config(run / "config.yaml"), run)  # `loopstack eval`: fp32 weights, autocast forward
    assert json.loads((run / "eval" / "step_3.json").read_text())["loss_vs_loops"]["3"] == trained
    try:
        loaded = load_run(run, warn=lambda m: None)
        assert loaded.model.autocast_dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
        assert load_run(run, dtype="fp32", warn=lambda m: None).model.autocast_dtype is None
    finally:
        shutdown()

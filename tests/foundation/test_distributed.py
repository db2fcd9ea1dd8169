import os

import pytest

from loopstack.errors import UserError
from tests.dist import run_distributed


def _layout(tp):
    import torch.distributed as dist

    from pretrain.distributed import MegatronMPU, init_distributed

    env = init_distributed(tp=tp, seed=7)
    mpu = MegatronMPU()
    tp_ranks = dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group())
    return dict(rank=env.rank, tp_rank=env.tp_rank, dp_rank=env.dp_rank, dp=env.dp, tp=env.tp,
                tp_ranks=tp_ranks, dp_ranks=mpu.get_data_parallel_group_ranks(),
                mp_size=mpu.get_model_parallel_world_size(), src=mpu.get_tensor_model_parallel_src_rank())


def test_world2_tp2_layout():
    out = run_distributed(_layout, 2, args=(2,))
    assert [o["tp_rank"] for o in out] == [0, 1] and all(o["dp"] == 1 for o in out)
    assert all(o["tp_ranks"] == [0, 1] and o["dp_ranks"] == [o["rank"]] for o in out)


def test_world4_tp2_dp2_layout():
    out = run_distributed(_layout, 4, args=(2,))
    assert [(o["tp_rank"], o["dp_rank"]) for o in out] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [o["tp_ranks"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["dp_ranks"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [o["src"] for o in out] == [0, 0, 2, 2] and all(o["mp_size"] == 2 for o in out)


def _tp_not_dividing():
    from pretrain.distributed import init_distributed

    try:
        init_distributed(tp=3)
    except UserError as err:
        return str(err)
    return "no error"


def test_world_not_divisible_by_tp():
    msgs = run_distributed(_tp_not_dividing, 2)
    assert all("world size 2 is not divisible by parallel.tp = 3" in m for m in msgs)


def test_half_set_torchrun_variables(monkeypatch):
    from pretrain.distributed import read_launch_env

    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert read_launch_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="half set.*MASTER_ADDR, MASTER_PORT missing"):
        read_launch_env()


def test_single_process_without_torchrun(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    from pretrain.distributed import distributed

    with distributed(tp=1, seed=3) as env:
        assert (env.rank, env.world_size, env.dp, env.backend) == (0, 1, 1, "gloo")
    import torch.distributed as dist

    assert not dist.is_initialized()  # torn down


def _seeds():
    import torch

    from pretrain.distributed import init_distributed, tp_rng

    env = init_distributed(tp=2, seed=11)
    replicated = torch.rand(3).tolist()
    with tp_rng().fork():
        per_tp = torch.rand(3).tolist()
    after = torch.rand(1).tolist()  # the fork did not disturb the default stream
    return env.tp_rank, replicated, per_tp, after


def test_seeding_replicated_vs_tensor_parallel_streams():
    a, b = run_distributed(_seeds, 2)
    assert a[1] == b[1] and a[3] == b[3]  # same default stream across the TP group
    assert a[2] != b[2]  # TP-region stream differs per TP rank
    again = run_distributed(_seeds, 2)
    assert again[0] == a and again[1] == b  # and everything is reproducible


def _deepspeed_zero1_step():
    import torch

    from pretrain.distributed import MegatronMPU, init_distributed, prepare_deepspeed

    env = init_distributed(tp=1, seed=5)
    prepare_deepspeed()
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      mpu=MegatronMPU())
    g = torch.Generator().manual_seed(100 + env.dp_rank)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    return [p.detach().clone() for p in model.parameters()], engine.dp_world_size


def test_deepspeed_zero1_with_megatron_mpu_two_processes():
    (p0, dp0), (p1, dp1) = run_distributed(_deepspeed_zero1_step, 2, env={"DS_ACCELERATOR": "cpu"})
    assert dp0 == dp1 == 2
    import torch

    # after one step both data-parallel replicas hold the same updated weights
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    assert any(not torch.equal(a, b) for a, b in zip(p0, init.parameters(), strict=True))


def test_prepare_deepspeed_skips_shm_build_on_cpu():
    from pretrain.distributed import prepare_deepspeed

    prepare_deepspeed()
    import importlib

    from deepspeed.comm.comm import TorchBackend

    assert TorchBackend.__init__.__globals__["build_shm_op"]() is None  # what deepspeed.initialize will call
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
    assert os.environ["DS_ACCELERATOR"] == "cpu"

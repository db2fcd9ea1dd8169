"""Schedules, param groups and the hybrid AdamW/Muon optimizer in one process (no DeepSpeed)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from pretrain.config import TrainConfig
from pretrain.optim import HybridOptimizer, build_optimizer, build_param_groups, lr_at, set_lr


def _cfg(**kw) -> TrainConfig:
    return replace(TrainConfig(), **kw)


# --- reference Muon (Keller Jordan's, single device, plain torch), also used by test_engine ------------

def ref_newton_schulz5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.float()
    if g.size(-2) > g.size(-1):
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    if g.size(-2) > g.size(-1):
        x = x.mT
    return x


@torch.no_grad()
def ref_muon_step(p: torch.Tensor, momentum: torch.Tensor, lr: float, wd: float, beta: float = 0.95) -> None:
    grad = p.grad.clone()
    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp_(momentum, beta)
    update = ref_newton_schulz5(update) * max(1, p.size(-2) / p.size(-1)) ** 0.5
    p.mul_(1 - lr * wd)
    p.add_(update.reshape(p.shape), alpha=-lr)


# --- schedules ----------------------------------------------------------------------------------------

def test_warmup_then_cosine_endpoints():
    c = _cfg(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, c) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: midpoint between peak and floor
    assert lr_at(110, c) == pytest.approx(0.1) and lr_at(500, c) == pytest.approx(0.1)
    seq = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(seq, seq[1:], strict=False)) and seq[-2] > 0.1  # monotone, floor after the end


def test_cosine_without_warmup_or_floor():
    c = _cfg(steps=100, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(0, c) == 1.0
    assert lr_at(100, c) == pytest.approx(0.0, abs=1e-12)
    assert 0 < lr_at(99, c) < 1e-3


def test_wsd_plateau_and_linear_decay():
    c = _cfg(steps=100, warmup_steps=5, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(0, c) == pytest.approx(0.2)
    assert all(lr_at(s, c) == 1.0 for s in range(5, 81))  # stable until the last 20 steps
    assert lr_at(85, c) == pytest.approx(0.75) and lr_at(90, c) == pytest.approx(0.5)
    assert lr_at(99, c) == pytest.approx(0.05) and lr_at(100, c) == 0.0 and lr_at(150, c) == 0.0
    floor = _cfg(steps=100, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_at(90, floor) == pytest.approx(0.55) and lr_at(100, floor) == pytest.approx(0.1)
    assert lr_at(99, _cfg(steps=100, schedule="wsd", decay_fraction=0.0)) == 1.0  # no decay phase


def test_constant_schedule_and_multiplier_range():
    c = _cfg(steps=50, warmup_steps=3, schedule="constant")
    assert [lr_at(s, c) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    for sched in ("cosine", "wsd", "constant"):
        cc = _cfg(steps=37, warmup_steps=4, schedule=sched, min_lr_ratio=0.05, decay_fraction=0.3)
        assert all(0.0 <= lr_at(s, cc) <= 1.0 for s in range(60))


# --- param groups ---------------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.up = torch.nn.Linear(6, 12)
        self.down = torch.nn.Linear(12, 6, bias=False)
        self.norm = torch.nn.Parameter(torch.ones(6))
        self.a_log = torch.nn.Parameter(torch.zeros(6))
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        h = self.embed(x) * self.a_log.exp()
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h * self.norm)


ROLES = {"embed.weight": "embedding", "up.weight": "matrix", "up.bias": "bias", "down.weight": "matrix",
         "norm": "norm", "a_log": "injection", "head.weight": "head"}


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_adamw_groups_decay_and_lrs():
    net = _Net()
    c = _cfg(optimizer="adamw", lr=1e-3, embed_lr=0.2, head_lr=0.004, weight_decay=0.1)
    g = _by_name(build_param_groups(net, ROLES, c))
    assert list(g) == ["adamw_decay", "adamw_no_decay", "embedding", "head"]
    assert g["adamw_decay"]["params"] == [net.up.weight, net.down.weight]
    assert g["adamw_decay"]["weight_decay"] == 0.1 and g["adamw_decay"]["lr"] == 1e-3
    assert {id(p) for p in g["adamw_no_decay"]["params"]} == {id(net.up.bias), id(net.norm), id(net.a_log)}
    assert g["adamw_no_decay"]["weight_decay"] == 0.0
    assert g["embedding"]["params"] == [net.embed.weight] and g["embedding"]["lr"] == 0.2
    assert g["head"]["params"] == [net.head.weight] and g["head"]["lr"] == 0.004
    assert all(x["weight_decay"] == 0.0 for x in (g["embedding"], g["head"]))
    assert all(x["kind"] == "adamw" for x in g.values())
    assert not any(p is net.frozen for x in g.values() for p in x["params"])  # frozen params stay out


def test_muon_groups_and_lr_defaults():
    net = _Net()
    c = _cfg(optimizer="muon", lr=3e-4, muon_lr=0.02, muon_weight_decay=0.01, embed_lr=0.0, head_lr=0.0)
    g = _by_name(build_param_groups(net, ROLES, c))
    assert list(g) == ["muon", "adamw_no_decay", "embedding", "head"]
    assert g["muon"]["params"] == [net.up.weight, net.down.weight] and g["muon"]["kind"] == "muon"
    assert g["muon"]["lr"] == 0.02 and g["muon"]["weight_decay"] == 0.01
    assert g["embedding"]["lr"] == 3e-4 and g["head"]["lr"] == 3e-4  # 0 = train.lr


def test_set_lr_scales_each_group_from_its_own_base():
    net = _Net()
    c = _cfg(optimizer="muon", steps=10, warmup_steps=4, schedule="constant", lr=1e-3, muon_lr=0.05,
             embed_lr=0.3, head_lr=0.002)
    opt = build_optimizer(net, ROLES, c)
    assert set_lr(opt, 1, c) == pytest.approx(0.5)
    want = {"muon": 0.025, "adamw_no_decay": 5e-4, "embedding": 0.15, "head": 0.001}
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(want)
    set_lr(opt, 3, c)
    assert _by_name(opt.param_groups)["embedding"]["lr"] == pytest.approx(0.3)


def test_role_errors_name_the_parameter():
    net = _Net()
    with pytest.raises(ValueError, match="no role for.*head.weight"):
        build_param_groups(net, {k: v for k, v in ROLES.items() if k != "head.weight"}, _cfg())
    with pytest.raises(ValueError, match="unknown roles.*'weights'"):
        build_param_groups(net, {**ROLES, "norm": "weights"}, _cfg())
    with pytest.raises(ValueError, match="up.bias: role 'matrix' under Muon needs a 2-D"):
        build_param_groups(net, {**ROLES, "up.bias": "matrix"}, _cfg(optimizer="muon"))


# --- the optimizer itself (whole tensors: the ZeRO-0 layout) -----------------------------------------

def _train(net, opt_step, steps=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5), generator=g)
        y = torch.randint(0, 11, (4, 5), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x).reshape(-1, 11), y.reshape(-1))
        net.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()
        losses.append(loss.item())
    return losses


def test_hybrid_optimizer_matches_reference_muon_and_adamw():
    c = _cfg(optimizer="muon", lr=1e-2, muon_lr=0.05, muon_weight_decay=0.1, embed_lr=2e-2, head_lr=5e-3,
             beta1=0.9, beta2=0.95, eps=1e-8, muon_momentum=0.9)
    torch.manual_seed(0)
    net, ref = _Net(), _Net()
    ref.load_state_dict(net.state_dict())
    opt = build_optimizer(net, ROLES, c)
    matrices = [ref.up.weight, ref.down.weight]
    moms = [torch.zeros_like(p) for p in matrices]
    adam = torch.optim.AdamW([dict(params=[ref.up.bias, ref.norm, ref.a_log], lr=1e-2, weight_decay=0.0),
                              dict(params=[ref.embed.weight], lr=2e-2, weight_decay=0.0),
                              dict(params=[ref.head.weight], lr=5e-3, weight_decay=0.0)], betas=(0.9, 0.95), eps=1e-8)

    def ref_step():
        for p, m in zip(matrices, moms, strict=True):
            ref_muon_step(p, m, lr=0.05, wd=0.1, beta=0.9)
        adam.step()

    got, want = _train(net, opt.step), _train(ref, ref_step)
    assert got == pytest.approx(want, abs=1e-6)
    for (n, a), b in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n
    assert want[-1] < want[0]


def test_skip_next_step_leaves_weights_and_state_alone():
    c = _cfg(optimizer="muon", lr=1e-2)
    net = _Net()
    opt = build_optimizer(net, ROLES, c)
    _train(net, opt.step, steps=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    opt.skip_next_step = True
    _train(net, opt.step, steps=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for p, s in opt.state.items():
        assert all(torch.equal(state[id(p)][k], v) for k, v in s.items())
    opt.skip_next_step = False
    _train(net, opt.step, steps=1)
    assert not torch.equal(before["up.weight"], net.up.weight)


def test_a_skip_decided_on_the_device_changes_nothing_and_an_applied_step_is_bit_exact():
    """`skip_flag` (what the engine hands the optimizer on CUDA, no host read): fused AdamW's found_inf and Muon's
    masked update. Flag 0 gives bit for bit the unflagged step; flag 1 with NaN gradients leaves weights,
    moments, momenta and step counts bit for bit alone (run here with torch's CPU fused AdamW)."""
    c = _cfg(optimizer="muon", lr=1e-2, muon_weight_decay=0.1, weight_decay=0.1)
    torch.manual_seed(0)
    net, ref = _Net(), _Net()
    ref.load_state_dict(net.state_dict())
    opt, ref_opt = build_optimizer(net, ROLES, c, fused=True), build_optimizer(ref, ROLES, c, fused=True)
    assert opt.masks_on_device and not build_optimizer(_Net(), ROLES, c).masks_on_device

    def flagged(value: float):
        def step():
            if value:
                for p in net.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            opt.skip_flag = torch.tensor(value)
            try:
                opt.step()
            finally:
                opt.skip_flag = None
        return step

    def snapshot(model, o):
        return ({k: v.clone() for k, v in model.state_dict().items()},
                [{k: v.clone() if torch.is_tensor(v) else v for k, v in o.state[p].items()} for p in model.parameters()
                 if p in o.state])

    def same(a, b):
        (wa, sa), (wb, sb) = a, b
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert len(sa) == len(sb) and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k]))
                                          for x, y in zip(sa, sb, strict=True) for k in x)

    _train(net, flagged(0.0), steps=2)
    _train(ref, ref_opt.step, steps=2)
    same(snapshot(net, opt), snapshot(ref, ref_opt))
    before = snapshot(net, opt)
    _train(net, flagged(1.0), steps=1, seed=7)
    same(snapshot(net, opt), before)
    _train(net, flagged(0.0), steps=1, seed=8)
    _train(ref, ref_opt.step, steps=1, seed=8)
    same(snapshot(net, opt), snapshot(ref, ref_opt))


def test_newton_schulz_orthogonalises():
    from pretrain.muon import newton_schulz

    g = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(g)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.6 and s.max() < 1.25  # quintic NS: near-orthogonal, not exact
    assert torch.allclose(o, ref_newton_schulz5(g), atol=1e-6)
    # direction of the polar factor: <o, U V^T> close to its norm
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cos > 0.98 and not math.isnan(cos)


def test_hybrid_optimizer_refuses_closures():
    opt = HybridOptimizer([dict(params=[torch.nn.Parameter(torch.ones(2))], name="head", kind="adamw")],
                          betas=(0.9, 0.95), eps=1e-8, momentum=0.95)
    with pytest.raises(NotImplementedError):
        opt.step(lambda: 0.0)


# --- Muon on ZeRO-3 partitions, 3 real processes ------------------------------------------------------

ZERO3_SHAPES = [(5, 3), (4, 7), (6, 6)]  # 15 and 28 elements do not split evenly over 3 ranks: padded chunks


def _zero3_data(steps: int):
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(*s, generator=g) for s in ZERO3_SHAPES]
    grads = [[torch.randn(*s, generator=g) for s in ZERO3_SHAPES] for _ in range(steps)]
    return weights, grads


def _zero3_muon_body(steps: int) -> list:
    """Each rank holds ZeRO-3's layout: per matrix a chunk of ceil(numel/world) elements of the flattened,
    zero-padded matrix, concatenated into one flat partition."""
    import torch.distributed as dist

    from pretrain.muon import MatrixInfo, TPContext, Zero3Matrix, muon_step_zero3

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def partition(tensors):
        parts = []
        for t in tensors:
            chunk = -(-t.numel() // world)
            padded = torch.zeros(chunk * world)
            padded[:t.numel()] = t.reshape(-1)
            parts.append(padded[rank * chunk:(rank + 1) * chunk])
        return torch.cat(parts)

    weights, grads = _zero3_data(steps)
    matrices, offset = [], 0
    for w in weights:
        chunk = -(-w.numel() // world)
        matrices.append(Zero3Matrix(MatrixInfo.of(w, 1), offset, chunk, w.numel()))
        offset += chunk
    flat, state = partition(weights), defaultdict(dict)  # like torch.optim.Optimizer.state
    for step in range(steps):
        flat.grad = partition(grads[step])
        muon_step_zero3(flat, matrices, state, lr=0.05, wd=0.1, beta=0.9, dp_group=dist.group.WORLD,
                        tp=TPContext(None), steps=5, ns_dtype=torch.float32)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    out = []
    for m in matrices:  # reassemble each matrix from every rank's chunk; padding must have stayed zero
        whole = torch.cat([g[m.offset:m.offset + m.chunk] for g in gathered])
        assert not whole[m.numel:].any()
        out.append(whole[:m.numel].view(m.info.local_shape).numpy().copy())
    return out


def test_muon_on_zero3_partitions_matches_whole_matrix_muon():
    from tests.dist import run_distributed

    steps = 3
    results = run_distributed(_zero3_muon_body, 3, args=(steps,))
    weights, grads = _zero3_data(steps)
    moms = [torch.zeros_like(w) for w in weights]
    for step in range(steps):
        for w, m, g in zip(weights, moms, grads[step], strict=True):
            w.grad = g
            ref_muon_step(w, m, lr=0.05, wd=0.1, beta=0.9)
    for got in results:
        for a, want in zip(got, weights, strict=True):
            assert torch.allclose(torch.from_numpy(a), want, atol=1e-6)
    assert not torch.allclose(weights[0], _zero3_data(0)[0][0], atol=1e-3)  # the weights really moved

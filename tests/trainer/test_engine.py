"""`build_engine` on real gloo processes: ZeRO 0-3 x TP 1-2 against plain single-process references.

The model is tiny and built from megatron's ColumnParallelLinear / RowParallelLinear (so the TP shards
carry `tensor_model_parallel` / `partition_dim` like the real model), plus a replicated 2-D matrix, an
embedding, a head, a norm gain, an injection gain and biases: every role. Each process launch runs many
cases (imports cost ~5 s per process); the references are plain torch in the parent process: AdamW from
torch, Muon from `tests.trainer.test_optim.ref_muon_step` (Keller Jordan's), clipping by torch's
clip_grad_norm_, on the whole global batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_distributed
from tests.trainer.test_optim import ref_muon_step

V, D, H, S = 32, 16, 24, 5  # vocab, width, MLP width, sequence length
GLOBAL_BATCH = 8
HP = dict(lr=1e-2, embed_lr=2e-2, head_lr=5e-3, muon_lr=0.05, weight_decay=0.1, muon_weight_decay=0.05,
          beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=0.5)
MULTS = [0.5, 1.0, 1.0, 1.0]  # schedule=constant, warmup_steps=2
ROLES = {"emb.weight": "embedding", "fc1.weight": "matrix", "fc1.bias": "bias", "fc2.weight": "matrix",
         "fc2.bias": "bias", "mix.weight": "matrix", "norm": "norm", "gate": "injection", "head.weight": "head"}
TP_DIM = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}  # megatron's partition_dim of the TP shards
MATRICES = ("fc1.weight", "fc2.weight", "mix.weight")


def full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    r = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s
    return {"emb.weight": r(V, D, s=1.0), "fc1.weight": r(H, D), "fc1.bias": r(H, s=0.1), "fc2.weight": r(D, H),
            "fc2.bias": r(D, s=0.1), "mix.weight": r(D, D), "norm": 1 + r(D, s=0.1), "gate": 1 + r(D, s=0.1),
            "head.weight": r(V, D)}


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(99)
    return [(torch.randint(0, V, (GLOBAL_BATCH, S), generator=g), torch.randint(0, V, (GLOBAL_BATCH, S), generator=g))
            for _ in range(n)]


def forward(m, tokens, labels, fc1, fc2, nan_grad: bool = False):
    x = m.emb(tokens)
    h = torch.relu(fc1(x * m.gate)) ** 2
    if nan_grad:
        h = _NaNGrad.apply(h)
    x = x + fc2(h)
    x = x + m.mix(x)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * m.norm
    return F.cross_entropy(m.head(x).float().reshape(-1, V), labels.reshape(-1))


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a backward that blows up while the loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class Ref(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.emb, self.mix = torch.nn.Embedding(V, D), torch.nn.Linear(D, D, bias=False)
        self.fc1, self.fc2, self.head = torch.nn.Linear(D, H), torch.nn.Linear(H, D), torch.nn.Linear(D, V, bias=False)
        self.norm, self.gate = torch.nn.Parameter(torch.ones(D)), torch.nn.Parameter(torch.ones(D))
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(w[n])

    def forward(self, tokens, labels):
        return forward(self, tokens, labels, self.fc1, self.fc2)


class TPNet(torch.nn.Module):
    def __init__(self, w, tp, tp_rank):
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        mcfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                   perform_initialization=True, params_dtype=torch.float32,
                                   gradient_accumulation_fusion=False, sequence_parallel=False)
        init = torch.nn.init.zeros_
        self.emb, self.mix = torch.nn.Embedding(V, D), torch.nn.Linear(D, D, bias=False)
        self.fc1 = ColumnParallelLinear(D, H, config=mcfg, init_method=init, bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(H, D, config=mcfg, init_method=init, bias=True, input_is_parallel=True,
                                     skip_bias_add=False)
        self.head = torch.nn.Linear(D, V, bias=False)
        self.norm, self.gate = torch.nn.Parameter(torch.ones(D)), torch.nn.Parameter(torch.ones(D))
        with torch.no_grad():
            for n, p in self.named_parameters():
                full = w[n]
                p.copy_(full.chunk(tp, dim=TP_DIM[n])[tp_rank] if n in TP_DIM else full)
        self.nan_grad = False

    def forward(self, tokens, labels):
        return forward(self, tokens, labels, lambda x: self.fc1(x)[0], lambda x: self.fc2(x)[0], self.nan_grad)


# --- the worker: one process of a launch, many cases ---------------------------------------------

def _cfg(case: dict, steps: int):
    from dataclasses import replace

    from pretrain.config import ParallelConfig, RunConfig, TrainConfig

    t = replace(TrainConfig(), steps=steps, schedule="constant", warmup_steps=case.get("warmup", 2),
                optimizer=case["opt"], micro_batch=case.get("micro", 4), grad_accum=case.get("gas", 1),
                dtype=case.get("dtype", "fp32"), muon_momentum=0.9, **HP)
    return replace(RunConfig(), train=t, parallel=replace(ParallelConfig(), tp=case["tp"], zero_stage=case["zero"]))


def _local_weights(engine, zero: int) -> dict:
    """This rank's (TP-local) weights as numpy arrays: they travel back by value, not as shared memory."""
    import contextlib

    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())) if zero == 3 else contextlib.nullcontext():
        return {n: p.detach().float().numpy().copy() for n, p in params.items()}


def _train(engine, env, cfg, case, data, first_step=0):
    """Run optimizer steps over `data`; returns global losses, norms, stepped flags and weight snapshots."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pretrain.engine import step_or_skip
    from pretrain.optim import set_lr

    gas, micro = case.get("gas", 1), case.get("micro", 4)
    rows = GLOBAL_BATCH // env.dp
    out = {"loss": [], "norm": [], "stepped": [], "before": [], "after": []}
    for i, (tokens, labels) in enumerate(data):
        step = first_step + i
        set_lr(engine.optimizer, step, cfg.train)
        mine = slice(env.dp_rank * rows, (env.dp_rank + 1) * rows)
        tok, lab = tokens[mine], labels[mine]
        total = torch.zeros(())
        inject = case.get("nan_at") == (step, env.rank)
        watch = case.get("nan_at", (None,))[0] == step  # same on every rank (ZeRO-3 gathers collectively)
        out["before"].append(_local_weights(engine, case["zero"]) if watch else None)
        for m in range(gas):
            engine.module.nan_grad = inject and case.get("nan_kind") == "grad"
            loss = engine(tok[m * micro:(m + 1) * micro], lab[m * micro:(m + 1) * micro])
            if inject and case.get("nan_kind") == "loss":
                loss = loss * float("nan")
            engine.backward(loss)
            total += loss.detach().float()
            if m < gas - 1:
                assert not engine.is_gradient_accumulation_boundary()
                engine.step()
        assert engine.is_gradient_accumulation_boundary()
        stepped, norm = step_or_skip(engine, loss_is_finite=not (inject and case.get("nan_kind") == "flag"))
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        out["loss"].append(total.item() / gas / env.dp)
        out["norm"].append(norm)
        out["stepped"].append(stepped)
        out["after"].append(_local_weights(engine, case["zero"]) if watch else None)
    engine.module.nan_grad = False
    return out


def _run_cases(tp: int, cases: list[dict], ckpt_root: str) -> dict:
    import deepspeed  # noqa: F401 - imported once, before the cases

    from loopstack.errors import UserError
    from pretrain.distributed import init_distributed
    from pretrain.engine import build_engine

    env = init_distributed(tp=tp, seed=0)
    w = full_weights()
    results = {"rank": env.rank, "tp_rank": env.tp_rank, "dp_rank": env.dp_rank}
    for case in cases:
        case = {**case, "tp": tp}
        steps = case.get("steps", 3)
        data = batches(1) * steps if case.get("same_batch") else batches(steps)
        cfg = _cfg(case, steps)
        try:
            engine = build_engine(TPNet(w, tp, env.tp_rank), cfg, env, ROLES, device_skip=case.get("device_skip"))
        except UserError as err:
            results[case["name"]] = {"error": str(err)}
            continue
        if "ckpt" in case:  # 2 steps, save, 2 more; then a fresh engine loads and redoes the last 2
            first = _train(engine, env, cfg, case, data[:2])
            engine.save_checkpoint(ckpt_root + "/" + case["name"], tag="s2", client_state={"step": 2})
            cont = _train(engine, env, cfg, case, data[2:], first_step=2)
            fresh = build_engine(TPNet(full_weights_shifted(), tp, env.tp_rank), cfg, env, ROLES)
            path, client = fresh.load_checkpoint(ckpt_root + "/" + case["name"], tag="s2")
            again = _train(fresh, env, cfg, case, data[2:], first_step=2)
            results[case["name"]] = {"first": first["loss"], "cont": cont["loss"], "again": again["loss"],
                                     "client_step": client.get("step"), "loaded": path is not None,
                                     "w_cont": _local_weights(engine, case["zero"]),
                                     "w_again": _local_weights(fresh, case["zero"])}
            continue
        run = _train(engine, env, cfg, case, data)
        run["weights"] = _local_weights(engine, case["zero"])
        run["device_skip"] = engine.device_skip
        results[case["name"]] = run
    return results


def _single_process_without_torchrun(cases: list[dict]) -> dict:
    import os

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)  # like `python -m loopstack.cli train ...` on a laptop
    return _run_cases(1, cases, "")


def full_weights_shifted() -> dict[str, torch.Tensor]:
    """Different weights, so a checkpoint load that silently did nothing cannot pass."""
    return {k: v + 0.05 for k, v in full_weights().items()}


# --- references (parent process, plain torch) ----------------------------------------------------------

def reference(opt: str, steps: int, skip: tuple[int, ...] = ()) -> dict:
    torch.manual_seed(0)
    m = Ref(full_weights())
    p = dict(m.named_parameters())
    adam_groups = [dict(params=[p["emb.weight"]], lr=HP["embed_lr"], weight_decay=0.0),
                   dict(params=[p["head.weight"]], lr=HP["head_lr"], weight_decay=0.0),
                   dict(params=[p[n] for n in ("fc1.bias", "fc2.bias", "norm", "gate")], lr=HP["lr"],
                        weight_decay=0.0)]
    if opt == "adamw":
        adam_groups.append(dict(params=[p[n] for n in MATRICES], lr=HP["lr"], weight_decay=HP["weight_decay"]))
    adam = torch.optim.AdamW(adam_groups, betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"])
    base = [g["lr"] for g in adam.param_groups]
    moms = {n: torch.zeros_like(p[n]) for n in MATRICES}
    out = {"loss": [], "norm": []}
    for step, (tokens, labels) in enumerate(batches(steps)):
        loss = m(tokens, labels)
        out["loss"].append(loss.item())
        if step in skip:
            out["norm"].append(math.nan)
            continue
        m.zero_grad(set_to_none=True)
        loss.backward()
        out["norm"].append(torch.nn.utils.clip_grad_norm_(m.parameters(), HP["grad_clip"]).item())
        for g, b in zip(adam.param_groups, base, strict=True):
            g["lr"] = b * MULTS[step]
        adam.step()
        if opt == "muon":
            for n in MATRICES:
                ref_muon_step(p[n], moms[n], lr=HP["muon_lr"] * MULTS[step], wd=HP["muon_weight_decay"], beta=0.9)
    out["weights"] = {n: t.detach().clone() for n, t in m.named_parameters()}
    return out


def assemble(results: list[dict], name: str, key: str = "weights") -> list[dict[str, torch.Tensor]]:
    """Full weights per DP replica, from the TP shards of each rank."""
    replicas = {}
    for r in results:
        replicas.setdefault(r["dp_rank"], {})[r["tp_rank"]] = {n: torch.from_numpy(a) for n, a in r[name][key].items()}
    full = []
    for shards in replicas.values():
        tp = len(shards)
        full.append({n: torch.cat([shards[t][n] for t in range(tp)], dim=TP_DIM[n]) if n in TP_DIM and tp > 1
                     else shards[0][n] for n in shards[0]})
    return full


def max_weight_diff(got: dict, want: dict) -> float:
    return max((got[n] - want[n]).abs().max().item() for n in want)


# --- launches ------------------------------------------------------------------------------------------

TP2_CASES = [
    *[dict(name=f"adamw-z{z}", opt="adamw", zero=z) for z in (0, 1, 2, 3)],
    *[dict(name=f"muon-z{z}", opt="muon", zero=z) for z in (0, 1, 2, 3)],
    dict(name="muon-gas-z3", opt="muon", zero=3, micro=2, gas=2),
    *[dict(name=f"muon-gas-z{z}", opt="muon", zero=z, micro=2, gas=2) for z in (0, 2)],
    dict(name="skip-loss-z1", opt="muon", zero=1, steps=4, nan_at=(1, 1), nan_kind="loss"),
    dict(name="skip-grad-z2", opt="muon", zero=2, steps=4, nan_at=(1, 2), nan_kind="grad", micro=2, gas=2),
    dict(name="skip-grad-z0", opt="muon", zero=0, steps=4, nan_at=(1, 3), nan_kind="grad"),
    # "flag": finite loss and grads, but one rank asks to skip (a loss spike); DeepSpeed alone would step
    dict(name="skip-flag-z2", opt="muon", zero=2, steps=4, nan_at=(1, 3), nan_kind="flag"),
    dict(name="skip-flag-adamw-z3", opt="adamw", zero=3, steps=4, nan_at=(1, 0), nan_kind="flag"),
    # the same skips decided on the device (as on CUDA): fused AdamW's found_inf and Muon's masked update
    dict(name="dskip-grad-z0", opt="muon", zero=0, steps=4, nan_at=(1, 3), nan_kind="grad", device_skip=True),
    dict(name="dskip-loss-z1", opt="muon", zero=1, steps=4, nan_at=(1, 1), nan_kind="loss", device_skip=True),
    dict(name="dskip-flag-z2", opt="muon", zero=2, steps=4, nan_at=(1, 3), nan_kind="flag", device_skip=True),
    dict(name="ckpt-z1", opt="muon", zero=1, steps=4, ckpt=True),
    dict(name="ckpt-z2", opt="muon", zero=2, steps=4, ckpt=True),
    *[dict(name=f"bf16-muon-z{z}", opt="muon", zero=z, dtype="bf16", steps=6, warmup=0, same_batch=True)
      for z in (0, 1, 2, 3)],
    dict(name="bf16-adamw-z3", opt="adamw", zero=3, dtype="bf16", steps=6, warmup=0, same_batch=True),
]
TP1_CASES = [dict(name=f"muon-z{z}", opt="muon", zero=z) for z in (0, 1, 2)] + [
    dict(name="muon-gas-z1", opt="muon", zero=1, micro=2, gas=2)]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """World 4 = TP 2 x DP 2."""
    return run_distributed(_run_cases, 4, args=(2, TP2_CASES, str(tmp_path_factory.mktemp("ckpt"))), timeout=600)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    """World 2 = TP 1 x DP 2."""
    return run_distributed(_run_cases, 2, args=(1, TP1_CASES, str(tmp_path_factory.mktemp("ckpt1"))), timeout=300)


@pytest.fixture(scope="module")
def refs():
    out = {"adamw": reference("adamw", 3), "muon": reference("muon", 3)}
    assert max(out["adamw"]["norm"]) > HP["grad_clip"]  # clipping is exercised
    return out


def _check_against(results, name, want, loss_tol=1e-5, weight_tol=2e-5):
    got = results[0][name]
    assert got["loss"] == pytest.approx(want["loss"], abs=loss_tol), name
    assert all(r[name]["loss"] == got["loss"] for r in results)  # every rank logs the same global loss
    assert got["norm"] == pytest.approx(want["norm"], rel=1e-5), name  # the pre-clip norm, TP shards counted once
    replicas = assemble(results, name)
    for full in replicas:
        assert max_weight_diff(full, want["weights"]) < weight_tol, name
    for full in replicas[1:]:  # DP replicas agree exactly
        assert all(torch.equal(full[n], replicas[0][n]) for n in full), name


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_adamw_tp2_dp2_matches_single_process(tp2, refs, zero):
    _check_against(tp2, f"adamw-z{zero}", refs["adamw"])


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_muon_tp2_dp2_matches_reference_muon(tp2, refs, zero):
    _check_against(tp2, f"muon-z{zero}", refs["muon"])
    assert refs["muon"]["loss"] != pytest.approx(refs["adamw"]["loss"], abs=1e-4)  # Muon really ran


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_muon_tp1_matches_reference_and_tp2(tp1, tp2, refs, zero):
    _check_against(tp1, f"muon-z{zero}", refs["muon"])
    a, b = assemble(tp1, f"muon-z{zero}")[0], assemble(tp2, f"muon-z{zero}")[0]
    assert max_weight_diff(a, b) < 2e-5 and tp1[0][f"muon-z{zero}"]["loss"] == pytest.approx(
        tp2[0][f"muon-z{zero}"]["loss"], abs=1e-6)


def test_single_process_without_torchrun_matches_reference(refs):
    cases = [dict(name="muon-z1", opt="muon", zero=1, micro=8), dict(name="adamw-z0", opt="adamw", zero=0, micro=8)]
    (res,) = run_distributed(_single_process_without_torchrun, 1, args=(cases,))
    _check_against([res], "muon-z1", refs["muon"])
    _check_against([res], "adamw-z0", refs["adamw"])


@pytest.mark.parametrize("results,name", [("tp2", "muon-gas-z0"), ("tp2", "muon-gas-z2"), ("tp2", "muon-gas-z3"),
                                          ("tp1", "muon-gas-z1")])
def test_grad_accumulation_2x2_equals_1x4(request, refs, results, name):
    res = request.getfixturevalue(results)
    _check_against(res, name, refs["muon"])
    plain = name.replace("-gas", "")
    assert res[0][name]["loss"] == pytest.approx(res[0][plain]["loss"], abs=1e-6)
    assert max_weight_diff(assemble(res, name)[0], assemble(res, plain)[0]) < 1e-5


@pytest.mark.parametrize("name", ["skip-loss-z1", "skip-grad-z2", "skip-grad-z0", "skip-flag-z2", "skip-flag-adamw-z3",
                                  "dskip-grad-z0", "dskip-loss-z1", "dskip-flag-z2"])
def test_non_finite_or_vetoed_on_one_rank_skips_everywhere(tp2, name):
    opt = "adamw" if "adamw" in name else "muon"
    assert tp2[0][name]["device_skip"] == name.startswith("dskip")  # the skip decided on the device, or read
    want = reference(opt, 4, skip=(1,))  # the skipped batch never happened; the lr schedule still advanced
    for r in tp2:
        run = r[name]
        assert run["stepped"] == [True, False, True, True], (name, r["rank"])
        # a NaN reaches the global gradient norm; a vetoed finite step still reports its real norm
        assert math.isfinite(run["norm"][1]) == ("flag" in name)
        before, after = run["before"][1], run["after"][1]
        assert all((before[n] == after[n]).all() for n in before), (name, r["rank"])  # weights untouched
    got = tp2[0][name]
    # step 0 as usual; after the skip the run continues as if batch 1 never happened (state not corrupted)
    assert [got["loss"][0], *got["loss"][2:]] == pytest.approx([want["loss"][0], *want["loss"][2:]], abs=1e-5)
    for full in assemble(tp2, name):
        assert max_weight_diff(full, want["weights"]) < 2e-5, name


@pytest.mark.parametrize("name", ["ckpt-z1", "ckpt-z2"])
def test_checkpoint_round_trip_is_exact(tp2, name):
    for r in tp2:
        run = r[name]
        assert run["loaded"] and run["client_step"] == 2
        assert run["again"] == run["cont"], (name, r["rank"])  # bit-identical after load
        assert all((run["w_cont"][n] == run["w_again"][n]).all() for n in run["w_cont"])


@pytest.mark.parametrize("name", ["bf16-muon-z0", "bf16-muon-z1", "bf16-muon-z2", "bf16-muon-z3", "bf16-adamw-z3"])
def test_bf16_runs_on_cpu_and_learns(tp2, name):
    losses = tp2[0][name]["loss"]
    assert all(math.isfinite(x) for x in losses) and all(tp2[0][name]["stepped"])
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(math.isfinite(n) and n > 0 for n in tp2[0][name]["norm"])
    # first step: same weights as fp32, bf16 compute: the TP-aware global norm agrees to bf16 precision
    assert tp2[0][name]["norm"][0] == pytest.approx(reference("adamw", 1)["norm"][0], rel=2e-2)

"""ZeRO state re-partitioned across data-parallel sizes and stages (`pretrain.elastic`), on real gloo processes.

Three launches in a chain, TP=2 throughout:  DP=2 (save "a")  ->  DP=1 (load "a", save "b")  ->  DP=2 (load
"b", save "c"). Each case trains 2 steps, saves the whole-tensor state, then trains 2 more ("cont"); each
later launch starts from *different* weights, loads, and trains the same 2 steps ("again"). Checked:
- the saved whole tensors survive every re-partitioning bit for bit (a == b == c: fp32 masters, AdamW
  moments and step, Muon momentum);
- right after a load the model's own (fp32 or bf16) weights are the loaded masters, cast;
- the continuation on DP=1 matches the uninterrupted DP=2 run to fp32 (or bf16) tolerance, and back on the
  original layout it is bit-identical.
Cases cover ZeRO-1/2/3, fp32 and bf16 (DeepSpeed's three optimizer wrappers), AdamW and Muon, and a run
that moves from ZeRO-2 to ZeRO-3 and back. A fourth launch changes the tensor-parallel size (2 -> 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed
from tests.trainer.test_engine import (
    ROLES,
    TP_DIM,
    TPNet,
    _cfg,
    _local_weights,
    _train,
    batches,
    full_weights,
    full_weights_shifted,
)

CASES = [  # zero: the stage of each launch
    dict(name="z1-fp32-muon", opt="muon", zero=(1, 1, 1)),
    dict(name="z1-bf16-adamw", opt="adamw", zero=(1, 1, 1), dtype="bf16"),
    dict(name="z2-bf16-muon", opt="muon", zero=(2, 2, 2), dtype="bf16"),
    dict(name="z3-fp32-adamw", opt="adamw", zero=(3, 3, 3)),
    dict(name="z3-bf16-adamw", opt="adamw", zero=(3, 3, 3), dtype="bf16"),
    dict(name="z3-fp32-muon", opt="muon", zero=(3, 3, 3)),
    dict(name="z2-z3-z2-fp32-adamw", opt="adamw", zero=(2, 3, 2)),
]
TP = 2


def _phase(index: int, root: str, load_from: str | None, save_to: str, tp: int = TP, saved_tp: int = TP) -> dict:
    """One launch: every case builds an engine (fresh weights, or shifted ones that the load must replace),
    optionally loads, saves the whole-tensor state, then trains steps 2 and 3."""
    from pretrain.distributed import init_distributed
    from pretrain.elastic import load_full_state, save_full_state
    from pretrain.engine import build_engine

    env = init_distributed(tp=tp, seed=0)
    data = batches(4)
    results = {"rank": env.rank, "tp_rank": env.tp_rank, "dp_rank": env.dp_rank, "dp": env.dp}
    for spec in CASES:
        case = {**spec, "zero": spec["zero"][index], "tp": tp, "micro": 8 // env.dp, "warmup": 0}
        cfg = _cfg(case, steps=4)
        out: dict = {}
        if load_from is None:
            engine = build_engine(TPNet(full_weights(), tp, env.tp_rank), cfg, env, ROLES)
            _train(engine, env, cfg, case, data[:2])
        else:
            engine = build_engine(TPNet(full_weights_shifted(), tp, env.tp_rank), cfg, env, ROLES)
            load_full_state(engine, Path(root) / spec["name"] / load_from, env.tp_rank, saved_tp=saved_tp, tp=tp)
            out["loaded"] = _local_weights(engine, case["zero"])
        target = Path(root) / spec["name"] / save_to
        target.mkdir(parents=True, exist_ok=True)
        save_full_state(engine, target, env.tp_rank, env.dp_rank, env.dp)
        out["loss"] = _train(engine, env, cfg, case, data[2:], first_step=2)["loss"]
        results[spec["name"]] = out
    return results


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("elastic"))
    first = run_distributed(_phase, 4, args=(0, root, None, "a"), timeout=400)
    shrunk = run_distributed(_phase, 2, args=(1, root, "a", "b"), timeout=400)
    grown = run_distributed(_phase, 4, args=(2, root, "b", "c"), timeout=400)
    assert [r["dp"] for r in first + shrunk + grown] == [2] * 4 + [1] * 2 + [2] * 4
    return Path(root), first, shrunk, grown


@pytest.fixture(scope="module")
def tp_changed(chain):
    """A fourth launch: TP=1 x DP=2 loads the TP=2 x DP=2 state "a", saves "d", trains on."""
    root = chain[0]
    return run_distributed(_phase, 2, args=(0, str(root), "a", "d", 1, TP), timeout=400)


def _load(root: Path, name: str, tag: str, tp_rank: int) -> dict:
    from pretrain.elastic import read_whole_state

    return read_whole_state(root / name / tag, tp_rank)


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_state_survives_repartitioning_bit_for_bit(chain, name):
    root = chain[0]
    for tp_rank in range(TP):
        a, b, c = (_load(root, name, tag, tp_rank) for tag in "abc")
        assert set(a["params"]) == set(ROLES)
        for pname, entry in a["params"].items():  # optimizer state was there to carry, of the right kind
            muon = "muon" in name and pname in ("fc1.weight", "fc2.weight", "mix.weight")
            assert set(entry) == ({"fp32", "momentum_buffer"} if muon else {"fp32", "exp_avg", "exp_avg_sq"})
        for other in (b, c):
            assert set(other["params"]) == set(a["params"])
            for pname, entry in a["params"].items():
                for key, tensor in entry.items():
                    assert torch.equal(other["params"][pname][key], tensor), (name, tp_rank, pname, key)
            assert {g: s.item() for g, s in other["steps"].items()} == {g: s.item() for g, s in a["steps"].items()}
        assert all(s.item() == 2 for s in a["steps"].values())


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_loaded_model_weights_are_the_saved_masters(chain, name):
    root, _, shrunk, grown = chain
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    for results, tag in ((shrunk, "a"), (grown, "b")):
        for r in results:
            saved = _load(root, name, tag, r["tp_rank"])["params"]
            for pname, array in r[name]["loaded"].items():
                want = saved[pname]["fp32"].to(dtype).float()
                assert torch.equal(torch.from_numpy(array), want), (name, tag, r["rank"], pname)


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_training_continues_as_if_never_resized(chain, name):
    _, first, shrunk, grown = chain
    cont = first[0][name]["loss"]
    tol = 2e-2 if "bf16" in name else 1e-5  # DP=1 sums the batch in another order than DP=2
    assert shrunk[0][name]["loss"] == pytest.approx(cont, rel=tol), name
    assert all(r[name]["loss"] == grown[0][name]["loss"] for r in grown)
    assert grown[0][name]["loss"] == cont, name  # back on the saved layout: bit-identical


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_tensor_parallel_size_change_rebuilds_the_shards(chain, tp_changed, name):
    """TP 2 -> 1: every saved tensor (weights, moments, momentum) is the concatenation of the old TP shards
    along megatron's split dim; the model gets those weights and trains on as the TP=2 run did."""
    root, first = chain[0], chain[1]
    old = [_load(root, name, "a", r) for r in range(TP)]
    new = _load(root, name, "d", 0)
    for pname, entry in new["params"].items():
        for key, tensor in entry.items():
            want = torch.cat([o["params"][pname][key] for o in old], TP_DIM[pname]) if pname in TP_DIM \
                else old[0]["params"][pname][key]
            assert torch.equal(tensor, want), (name, pname, key)
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    for r in tp_changed:
        for pname, array in r[name]["loaded"].items():
            assert torch.equal(torch.from_numpy(array), new["params"][pname]["fp32"].to(dtype).float()), pname
    tol = 2e-2 if "bf16" in name else 1e-5
    assert tp_changed[0][name]["loss"] == pytest.approx(first[0][name]["loss"], rel=tol), name


def test_every_dp_rank_writes_a_part_and_a_missing_part_is_named(chain, tmp_path):
    import shutil

    from loopstack.errors import UserError
    from pretrain.elastic import read_whole_state

    root = chain[0]
    for tag, dp in (("a", 2), ("b", 1)):
        parts = sorted((root / "z1-fp32-muon" / tag).glob("elastic_state_tp0_part*.pt"))
        assert [p.name for p in parts] == [f"elastic_state_tp0_part{k}of{dp}.pt" for k in range(dp)]
        names = [set(torch.load(p, weights_only=True)["params"]) for p in parts]
        assert all(names) and set().union(*names) == set(ROLES) and sum(map(len, names)) == len(ROLES)
    broken = tmp_path / "broken"
    shutil.copytree(root / "z1-fp32-muon" / "a", broken)
    (broken / "elastic_state_tp1_part1of2.pt").unlink()
    with pytest.raises(UserError, match="elastic_state_tp1_part1of2.pt is missing"):
        read_whole_state(broken, 1)
    with pytest.raises(UserError, match="no elastic_state_tp2_part"):
        read_whole_state(broken, 2)

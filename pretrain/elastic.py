"""ZeRO-1/2 optimizer state that survives a change of data-parallel size.

DeepSpeed's ZeRO-1/2 checkpoint stores each DP rank's flat partition of the fp32 master weights and
optimizer state, and refuses to load it on another DP size. So with every ZeRO-1/2 checkpoint we also save,
per tensor-parallel rank, each parameter's *whole* fp32 master and optimizer state (AdamW moments and step,
Muon momentum), assembled with DeepSpeed's fragment API (`safe_get_full_*`). Resuming on a different DP
size loads the module weights, creates the optimizer state for the new partitioning and writes the saved
values into it (`safe_set_full_*`): the same training state, split a new way.

Cost: one all-reduce per parameter and state over the DP group at save time, and a file per TP rank holding
the fp32 weights and state (3x the fp32 model for AdamW), written by DP rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from loopstack.errors import UserError

STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "muon": ("momentum_buffer",)}


def file_name(tp_rank: int) -> str:
    return f"elastic_state_tp{tp_rank}.pt"


def _partitions(engine):
    """(low-precision params per group, this rank's flat fp32 partition per group, our base optimizer).

    DeepSpeed uses two ZeRO-1/2 optimizers with the same fragment API: DeepSpeedZeroOptimizer (fp32, and bf16
    with ZeRO-2) and BF16_Optimizer (bf16 with ZeRO-1)."""
    zero = engine.ds.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return zero.bit16_groups, zero.single_partition_of_fp32_groups, zero.optimizer
    if hasattr(zero, "fp32_groups_flat_partition"):
        return zero.bf16_groups, zero.fp32_groups_flat_partition, zero.optimizer
    raise RuntimeError(f"no ZeRO-1/2 partitions in {type(zero).__name__}")


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


@torch.no_grad()
def save_full_state(engine, directory: Path, tp_rank: int, dp_rank: int) -> None:
    """Collective over the DP group: every rank calls it; DP rank 0 writes the file."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    lp_groups, flats, base = _partitions(engine)
    names = _names(engine)
    params, steps = {}, {}
    for i, group in enumerate(base.param_groups):
        flat = flats[i]
        state = base.state.get(flat, {})
        if "step" in state:
            steps[i] = state["step"].clone()
        stepped = bool(state)  # identical on every rank: all have taken the same optimizer steps
        if stepped:  # DeepSpeed links optimizer-state fragments lazily; make sure they point at this state
            lazy_init_hp_params_optimizer_state(lp_groups[i], flat, base.state)
        for p in lp_groups[i]:
            entry = {"fp32": safe_get_full_fp32_param(p).cpu()}
            if stepped:
                for key in STATE_KEYS[group["kind"]]:
                    entry[key] = safe_get_full_optimizer_state(p, key).cpu()
            params[names[id(p)]] = entry
    if dp_rank == 0:
        torch.save({"params": params, "steps": steps}, directory / file_name(tp_rank))


@torch.no_grad()
def load_full_state(engine, directory: Path, tp_rank: int) -> None:
    """After a module-only load: rebuild master weights and optimizer state for this run's partitioning."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    path = directory / file_name(tp_rank)
    if not path.exists():
        raise UserError(f"{directory}: no {file_name(tp_rank)}; this checkpoint cannot resume on another "
                        f"data-parallel size")
    saved = torch.load(path, weights_only=False)
    lp_groups, flats, base = _partitions(engine)
    names = _names(engine)
    for i, group in enumerate(base.param_groups):
        flat, lp_params = flats[i], lp_groups[i]
        first = saved["params"][names[id(lp_params[0])]] if lp_params else {}
        keys = [k for k in STATE_KEYS[group["kind"]] if k in first]
        if keys:  # create the state this partitioning needs, then fill it from the saved whole tensors
            state = base.state[flat]
            for key in keys:
                state[key] = torch.zeros_like(flat)
            if i in saved["steps"]:
                state["step"] = saved["steps"][i].clone()
            lazy_init_hp_params_optimizer_state(lp_params, flat, base.state)
        for p in lp_params:
            entry = saved["params"][names[id(p)]]
            safe_set_full_fp32_param(p, entry["fp32"].to(flat.device))
            for key in keys:
                safe_set_full_optimizer_state(p, entry[key].to(flat.device), key)
    dist.barrier()

"""ZeRO optimizer state that survives a change of data-parallel size.

DeepSpeed's ZeRO-1/2/3 checkpoints store each DP rank's flat partition of the fp32 master weights and
optimizer state, and refuse to load them on another DP size. So with every ZeRO checkpoint we also save,
per tensor-parallel rank, each parameter's *whole* fp32 master and optimizer state (AdamW moments and step,
Muon momentum), assembled with DeepSpeed's fragment API (`safe_get_full_*`, which all-gathers over the DP
group). Resuming on a different DP size creates the optimizer state for the new partitioning and writes the
saved values into it (`safe_set_full_*`), then refreshes the (bf16 or fp32) model weights from the new fp32
masters, as DeepSpeed does after an optimizer step: the same training state, split a new way. The file does
not depend on the stage, so a run may also move between ZeRO 1, 2 and 3.

Layouts: ZeRO-1/2 (DeepSpeedZeroOptimizer; BF16_Optimizer for bf16 ZeRO-1) give the base optimizer one
flat fp32 partition per param group; ZeRO-3 splits each param group into sub-groups, one flat partition
each. Both are handled as "units": (param group index, flat partition, the model parameters it holds).

Cost: one all-gather per parameter and state over the DP group at save time, and per TP rank the fp32
weights and state (3x the fp32 model for AdamW), written in DP parts (`elastic_state_tp<t>_part<k>of<n>.pt`:
each DP rank keeps and writes the tensors it owns, balanced by size, so the write and the host memory are
spread). `checkpoint.elastic: false` turns it off; such checkpoints resume on the same layout only.
The files are written with `pretrain.checkpoint.save_file` (a full disk is agreed on by every rank, not raised
mid-collective) and read with its weights-only loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from loopstack.errors import UserError
from pretrain.checkpoint import load_file, save_file

STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "muon": ("momentum_buffer",)}


class _Unit(NamedTuple):
    group: int  # index into the base optimizer's param_groups
    flat: torch.Tensor  # this rank's flat fp32 partition, the tensor the base optimizer steps and keys state by
    params: list[torch.nn.Parameter]  # the model parameters whose partitions live in `flat`


class _Layout(NamedTuple):
    units: list[_Unit]
    base: torch.optim.Optimizer  # our HybridOptimizer, under DeepSpeed's wrapper
    zero3: Any  # DeepSpeedZeroOptimizer_Stage3, or None for ZeRO-1/2


def file_name(tp_rank: int, part: int, parts: int) -> str:
    """Each DP rank writes one part of its TP rank's whole-tensor state (writes and host memory spread)."""
    return f"elastic_state_tp{tp_rank}_part{part}of{parts}.pt"


def parts_glob(tp_rank: int) -> str:
    return f"elastic_state_tp{tp_rank}_part*of*.pt"


def _owners(sizes: list[int], parts: int) -> list[int]:
    """Which part holds each tensor: greedy by size, in order, so every rank computes the same answer."""
    load, owner = [0] * parts, []
    for size in sizes:
        k = min(range(parts), key=lambda i: (load[i], i))
        load[k] += size
        owner.append(k)
    return owner


def _layout(engine) -> _Layout:
    zero = engine.ds.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        units = [_Unit(zero.sub_group_to_group_id[i], flat, list(zero.fp16_groups[i]))
                 for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
        return _Layout(units, zero.optimizer, zero)
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2 (fp32, bf16 ZeRO-2)
        lp, flats = zero.bit16_groups, zero.single_partition_of_fp32_groups
    elif hasattr(zero, "fp32_groups_flat_partition"):  # bf16 ZeRO-1
        lp, flats = zero.bf16_groups, zero.fp32_groups_flat_partition
    else:
        raise RuntimeError(f"no ZeRO partitions in {type(zero).__name__}")
    return _Layout([_Unit(i, flats[i], list(lp[i])) for i in range(len(flats))], zero.optimizer, None)


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its elements (ZeRO-3 returns views of larger all-gather buffers)."""
    return t.detach().cpu() if t.device.type != "cpu" else t.detach().clone()


@torch.no_grad()
def save_full_state(engine, directory: Path, tp_rank: int, dp_rank: int, dp: int) -> None:
    """Collective over the DP group: every rank calls it and writes its part."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    layout = _layout(engine)
    names = _names(engine)
    in_order = [p for unit in layout.units for p in unit.params]
    owner = dict(zip(map(id, in_order), _owners([int(getattr(p, "ds_numel", p.numel())) for p in in_order], dp),
                     strict=True))
    params, steps = {}, {}
    for unit in layout.units:
        kind = layout.base.param_groups[unit.group]["kind"]
        state = layout.base.state.get(unit.flat, {})
        if "step" in state:
            steps.setdefault(unit.group, state["step"].clone())
        stepped = bool(state)  # identical on every rank: all have taken the same optimizer steps
        if stepped and layout.zero3 is None:  # ZeRO-1/2 link state fragments lazily; point them at this state
            lazy_init_hp_params_optimizer_state(unit.params, unit.flat, layout.base.state)
        for p in unit.params:  # every rank takes part in each gather; the owner keeps the result
            mine = owner[id(p)] == dp_rank
            entry = {"fp32": safe_get_full_fp32_param(p)}
            if stepped:
                for key in STATE_KEYS[kind]:
                    entry[key] = safe_get_full_optimizer_state(p, key)
            if mine:
                params[names[id(p)]] = {key: _host(value) for key, value in entry.items()}
    save_file({"params": params, "steps": steps}, directory / file_name(tp_rank, dp_rank, dp))  # after every gather


def read_whole_state(directory: Path, tp_rank: int) -> dict:
    """TP rank `tp_rank`'s whole-tensor state, {"params": {name: {"fp32", moments...}}, "steps": {...}},
    merged from every part (memory-mapped: a TP change reads every TP rank's parts, only what it needs)."""
    found = sorted(directory.glob(parts_glob(tp_rank)))
    if not found:
        raise UserError(f"{directory}: no {parts_glob(tp_rank)} (saved with checkpoint.elastic: "
                        f"false?); this checkpoint cannot resume on another data-parallel size, tensor-parallel "
                        f"size or stage")
    parts = int(found[0].stem.rsplit("of", 1)[1])
    for k in range(parts):
        if not (directory / file_name(tp_rank, k, parts)).exists():
            raise UserError(f"{directory}: {file_name(tp_rank, k, parts)} is missing")
    merged: dict = {"params": {}, "steps": {}}
    for k in range(parts):
        part = load_file(directory / file_name(tp_rank, k, parts), mmap=True)
        merged["params"].update(part["params"])
        merged["steps"] = part["steps"]  # the same in every part
    return merged


def _tp_split_dims(module: torch.nn.Module) -> dict[str, int | None]:
    """Each parameter's megatron split dim (None = replicated on every TP rank). Every loopstack parameter
    carries `tensor_model_parallel` / `partition_dim`, at any TP size, and its shards are plain chunks."""
    return {n: int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None
            for n, p in module.named_parameters()}


def resplit(parts: list[torch.Tensor], dim: int | None, tp_rank: int, tp: int) -> torch.Tensor:
    """TP rank `tp_rank` of `tp`'s shard of a tensor saved as `parts` (one per saved TP rank): concatenated along
    its megatron split dim and split again; a replicated tensor (dim None) is the first part."""
    if dim is None:
        return parts[0]
    return torch.cat(parts, dim).chunk(tp, dim)[tp_rank].clone()


def read_saved_state(module: torch.nn.Module, directory: Path, tp_rank: int, saved_tp: int, tp: int,
                     keys: tuple[str, ...] | None = None) -> dict:
    """The saved whole tensors for TP rank `tp_rank` of `tp`, from a checkpoint of `saved_tp` TP ranks: each
    sharded tensor is rebuilt from every old TP rank's file and split again. `module`: the model being loaded
    (its parameters' megatron split dims); `keys`: only these entries ("fp32", moments; default all)."""
    files = [read_whole_state(directory, r) for r in range(saved_tp)]
    dims = _tp_split_dims(module)
    params = {}
    for name, entry in files[0]["params"].items():
        dim = dims.get(name)
        params[name] = {key: resplit([f["params"][name][key] for f in files], dim, tp_rank, tp)
                        for key in entry if keys is None or key in keys}
    return {"params": params, "steps": files[0]["steps"]}


@torch.no_grad()
def load_full_state(engine, directory: Path, tp_rank: int, saved_tp: int | None = None,
                    tp: int | None = None) -> None:
    """Set this run's weights, fp32 masters and optimizer state from the saved whole tensors, partitioned for
    this run's DP size, TP size and ZeRO stage (1-3; the model has no buffers, so nothing else is needed).
    Collective over the DP group."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    path = directory / parts_glob(tp_rank)  # names the files in errors
    if saved_tp is None or saved_tp == tp:
        saved = read_whole_state(directory, tp_rank)
    else:
        saved = read_saved_state(engine.module, directory, tp_rank, saved_tp, tp)
    layout = _layout(engine)
    names = _names(engine)
    missing = sorted(set(names.values()) - set(saved["params"]))
    if missing:
        raise UserError(f"{path}: no saved state for parameters {missing[:3]}: written by a different model")
    if layout.zero3 is not None:
        layout.zero3.checkpoint_event_prologue()  # release every gathered (incl. persistent) parameter first
    for unit in layout.units:
        kind = layout.base.param_groups[unit.group]["kind"]
        first = saved["params"][names[id(unit.params[0])]] if unit.params else {}
        keys = [k for k in STATE_KEYS[kind] if k in first]
        if keys:  # create the state this partitioning needs, then fill it from the saved whole tensors
            state = layout.base.state[unit.flat]
            for key in keys:
                state[key] = torch.zeros_like(unit.flat)
            if unit.group in saved["steps"]:
                state["step"] = saved["steps"][unit.group].clone()
            if layout.zero3 is None:
                lazy_init_hp_params_optimizer_state(unit.params, unit.flat, layout.base.state)
        for p in unit.params:
            entry = saved["params"][names[id(p)]]
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the whole shape aside
            if tuple(entry["fp32"].shape) != shape:
                raise UserError(f"{path}: {names[id(p)]} has shape {tuple(entry['fp32'].shape)}, this model's is "
                                f"{shape}: written by a different model config")
            safe_set_full_fp32_param(p, entry["fp32"].to(unit.flat.device))
            for key in keys:
                safe_set_full_optimizer_state(p, entry[key].to(unit.flat.device), key)
    if layout.zero3 is not None:
        _refresh_zero3_weights(layout.zero3)
    else:  # fp32 partitions -> this rank's low-precision partition, then all-gather the whole weights
        engine.ds.optimizer.update_lp_params()
    dist.barrier()


def _refresh_zero3_weights(zero3) -> None:
    """Copy the new fp32 masters into ZeRO-3's partitioned low-precision weights, then re-gather the
    persistent (small, always-gathered) parameters from those partitions: what DeepSpeed's own step and
    checkpoint load do after changing the fp32 partitions. Every parameter was released (partitioned) by
    `checkpoint_event_prologue` before the masters were set, so no stale gathered copy survives."""
    for sub_group in range(len(zero3.fp16_groups)):  # fp32 partition -> lp partition; re-point the params at it
        zero3._reassign_or_swap_out_partitioned_parameters(sub_group)
    zero3.checkpoint_event_epilogue()  # all-gather the persistent parameters again

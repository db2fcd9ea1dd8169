"""A model's weights from a complete checkpoint, without a DeepSpeed engine, an optimizer or wandb: what
`loopstack eval` loads (`pretrain.train.evaluate_run`).

    model = build_model(cfg.model, cfg.loop, vocab_size, device=env.device)
    check_fits(info, model, env.tp, to_dict(cfg), tokenizer.sha256, cfg.tokenizer.dir)   # the trainer's checks
    source = load_model_weights(model, info, env.tp_rank, env.tp, dtype=torch.bfloat16)  # this TP rank's shards

Where the weights come from, first that applies:

1. `model.safetensors`: whole tensors (TP=1 names), what `loopstack convert hf` writes (`save_whole_checkpoint`).
2. DeepSpeed's `mp_rank_<r>_model_states.pt`, key `module`: the module's state dict exactly as the engine held it
   (ZeRO 0-2, in the run's dtype). The weights `loopstack eval` uses are then the very tensors the trainer's own
   end-of-run eval used. Saved at another TP size, every saved rank's file is read and each TP-split tensor is
   concatenated along megatron's `partition_dim` and split again (one process can load a TP=8 run).
3. The whole-tensor state (`elastic_state_tp<r>_part<k>of<n>.pt`, `pretrain.elastic`, ZeRO 1-3 with
   `checkpoint.elastic: true`): each parameter's fp32 master, re-split along megatron's `partition_dim` when the
   TP size changed. A bf16 run's parameters are cast to bf16 as DeepSpeed casts its module (parameters only,
   round to nearest): the low-precision weights a ZeRO 1-3 engine holds are that same cast of its fp32 masters,
   so eval measures the model the trainer held, not its fp32 masters.
4. ZeRO-3 with `checkpoint.elastic: false`: the weights exist only as DeepSpeed's flat fp32 partitions in each
   data-parallel rank's `zero_pp_rank_<d>_mp_rank_<r>_optim_states.pt`; they are put back together the way
   DeepSpeed's `zero_to_fp32` does (parameter by parameter in the order of the `param_shapes` the model-states file
   records, each padded to a multiple of the DP size and split evenly), read with the weights-only loader.
5. Otherwise a one-line UserError naming what is missing.

Every file is read with `pretrain.checkpoint.load_file` (weights only; a damaged or unsafe file is one line).
The parameter names and whole shapes are checked against the checkpoint's record first (`check_fits`, the same
check and message the trainer's resume gives).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from loopstack.errors import UserError
from pretrain import checkpoint as ckpt
from pretrain.config import config_diff

WHOLE_FILE = "model.safetensors"  # whole tensors, TP=1 names (`save_whole_checkpoint`)


def global_param_shapes(module: torch.nn.Module, tp: int) -> dict[str, list[int]]:
    """Each parameter's whole shape, the same at any TP size or ZeRO stage (ZeRO-3 keeps it in `ds_shape`;
    megatron marks TP-split parameters with `partition_dim`)."""
    shapes = {}
    for name, p in module.named_parameters():
        shape = list(getattr(p, "ds_shape", p.shape))
        if getattr(p, "tensor_model_parallel", False):
            shape[p.partition_dim] *= tp
        shapes[name] = shape
    return shapes


def _first_shape_diff(saved: dict[str, list[int]], now: dict[str, list[int]]) -> str:
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            return f"parameter {name}: {saved.get(name, 'absent')} -> {now.get(name, 'absent')}"
    return "parameters differ"


def check_fits(info: ckpt.CheckpointInfo, module: torch.nn.Module, tp: int, config: dict, tokenizer_sha256: str,
               tokenizer_dir: str) -> list[str]:
    """The checkpoint was written with this tokenizer and for this model (parameter names and whole shapes):
    else a one-line UserError. Returns the config differences (checkpoint -> now), for later messages."""
    meta = info.meta
    if meta.get("tokenizer_sha256") not in (None, tokenizer_sha256):
        raise UserError(f"{info.path}: written with tokenizer {meta['tokenizer_sha256'][:12]}, this run uses "
                        f"{tokenizer_sha256[:12]} ({tokenizer_dir})")
    saved_cfg = meta.get("config", {})
    differs = config_diff(saved_cfg, config) if saved_cfg else []
    saved_shapes = meta.get("param_shapes")
    if saved_shapes is not None:
        shapes = global_param_shapes(module, tp)
        if shapes != saved_shapes:
            model_diff = [d for d in differs if d.startswith("model.")] or [_first_shape_diff(saved_shapes, shapes)]
            raise UserError(f"{info.path}: this checkpoint's model does not fit the run's config: "
                            f"{'; '.join(model_diff)} (checkpoint -> now; the checkpoint's config is in its "
                            f"{ckpt.COMPLETE}); resume with the checkpoint's settings, or start a new --run-dir")
    return differs


def module_file(tp_rank: int) -> str:
    """DeepSpeed's model-states file of a ZeRO 0-2 checkpoint for TP rank `tp_rank` (ZeRO-3 writes
    `zero_pp_rank_*_mp_rank_*_model_states.pt`, whose `module` holds empty partitions)."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def weight_source(info: ckpt.CheckpointInfo, tp: int) -> str:
    """"whole" (model.safetensors), "module" (DeepSpeed's module state dicts) or "elastic" (the whole-tensor state),
    see the module docstring; a one-line UserError when the checkpoint has none of them."""
    from pretrain.elastic import parts_glob

    if (info.path / WHOLE_FILE).exists():
        return "whole"
    saved_stage = info.meta.get("config", {}).get("parallel", {}).get("zero_stage")
    if saved_stage is not None and saved_stage < 3 and (info.path / module_file(0)).exists():
        return "module"
    if any(info.path.glob(parts_glob(0))):
        return "elastic"
    if saved_stage == 3 and any(info.path.glob(_zero3_glob(0, "optim"))):
        return "zero3"
    raise UserError(f"{info.path}: no weights loopstack can read: none of {WHOLE_FILE}, {module_file(0)} (ZeRO 0-2), "
                    f"{parts_glob(0)} or {_zero3_glob(0, 'optim')} (ZeRO-3)")


def _zero3_glob(tp_rank: int, kind: str) -> str:
    return f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_{kind}_states.pt"


def _zero3_rank_tensors(info: ckpt.CheckpointInfo, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank `tp_rank`'s whole fp32 weights from a ZeRO-3 checkpoint's flat optimizer partitions (module
    docstring, source 4)."""
    d = info.path
    files = sorted(d.glob(_zero3_glob(tp_rank, "optim")), key=lambda p: int(p.name.split("_")[3]))
    model_file = d / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
    states = ckpt.load_file(model_file, mmap=True)
    groups = states.get("param_shapes") if isinstance(states, dict) else None
    if not isinstance(groups, list):
        raise UserError(f"{model_file}: no param_shapes (not a DeepSpeed ZeRO-3 model-states file)")
    shapes = {name: tuple(shape) for group in groups for name, shape in group.items()}
    flats = []
    for path in files:
        state = ckpt.load_file(path, mmap=True).get("optimizer_state_dict", {})
        if int(state.get("zero_stage", -1)) != 3 or "fp32_flat_groups" not in state:
            raise UserError(f"{path}: not a ZeRO-3 optimizer partition (no fp32_flat_groups)")
        flats.append(torch.cat([g.reshape(-1) for g in state["fp32_flat_groups"]]))
    counts = {int(c) for c in np.atleast_1d(state.get("partition_count", len(files)))}
    if counts != {len(files)}:
        raise UserError(f"{d}: {len(files)} files {_zero3_glob(tp_rank, 'optim')} for {sorted(counts)} data-parallel "
                        f"partitions (a file is missing)")
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        part = math.ceil(n / len(flats))
        out[name] = torch.cat([f[offset:offset + part] for f in flats])[:n].view(shape).clone()
        offset += part
    if offset != flats[0].numel():
        raise UserError(f"{d}: ZeRO-3 partitions hold {flats[0].numel()} values per rank, the parameters "
                        f"{offset}: written by a different model or DeepSpeed layout")
    return out


def _zero3_tensors(model: torch.nn.Module, info: ckpt.CheckpointInfo, tp_rank: int,
                   tp: int) -> tuple[Path, dict[str, torch.Tensor]]:
    shards = [_zero3_rank_tensors(info, r) for r in range(info.meta.get("tp", tp))]
    return info.path / _zero3_glob(tp_rank, "optim"), _resplit(model, shards, tp_rank, tp)


def _resplit(model: torch.nn.Module, shards: list[dict[str, torch.Tensor]], tp_rank: int,
             tp: int) -> dict[str, torch.Tensor]:
    """This TP rank's tensors from every saved TP rank's: a TP-split tensor is concatenated along its megatron
    `partition_dim` and split again; a replicated one is taken from the first."""
    from pretrain.elastic import _tp_split_dims, resplit

    if len(shards) == 1 and tp == 1:
        return shards[0]
    dims = _tp_split_dims(model)
    return {name: resplit([s[name] for s in shards], dims.get(name), tp_rank, tp) for name in shards[0]}


def _module_file_tensors(info: ckpt.CheckpointInfo, tp_rank: int) -> dict[str, torch.Tensor]:
    path = info.path / module_file(tp_rank)
    if not path.exists():
        raise UserError(f"{path}: missing (saved with {info.meta.get('tp', '?')} tensor-parallel ranks)")
    state = ckpt.load_file(path, mmap=True)  # ZeRO-0 also holds the optimizer state: mapped, not read
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise UserError(f"{path}: no `module` state dict in it (not a DeepSpeed model-states file)")
    return {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}  # megatron's _extra_state: None


def _module_tensors(model: torch.nn.Module, info: ckpt.CheckpointInfo, tp_rank: int,
                    tp: int) -> tuple[Path, dict[str, torch.Tensor]]:
    saved_tp = info.meta.get("tp", tp)
    if saved_tp == tp:
        return info.path / module_file(tp_rank), _module_file_tensors(info, tp_rank)
    shards = [_module_file_tensors(info, r) for r in range(saved_tp)]
    return info.path / "mp_rank_*_model_states.pt", _resplit(model, shards, tp_rank, tp)


def _whole_tensors(model: torch.nn.Module, info: ckpt.CheckpointInfo, tp_rank: int,
                   tp: int) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = info.path / WHOLE_FILE
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read ({ckpt.describe_error(err)})") from None
    return path, _resplit(model, [tensors], tp_rank, tp)


def _elastic_tensors(model: torch.nn.Module, info: ckpt.CheckpointInfo, tp_rank: int,
                     tp: int) -> tuple[Path, dict[str, torch.Tensor]]:
    from pretrain.elastic import parts_glob, read_saved_state, read_whole_state

    saved_tp = info.meta.get("tp", tp)
    if saved_tp == tp:
        saved = read_whole_state(info.path, tp_rank)
    else:
        saved = read_saved_state(model, info.path, tp_rank, saved_tp, tp, keys=("fp32",))
    return info.path / parts_glob(tp_rank), {n: e["fp32"] for n, e in saved["params"].items()}


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, info: ckpt.CheckpointInfo, tp_rank: int, tp: int, *,
                       dtype: torch.dtype | None = None) -> str:
    """Fill `model` (built by `build_model` for this TP size; TP rank `tp_rank`) from the complete checkpoint
    `info`, then cast its parameters to `dtype` (the run's: bf16 runs) as DeepSpeed's engine casts its module.
    Returns which source was used ("whole", "module", "elastic" or "zero3"). Reads files only, no collective."""
    source = weight_source(info, tp)
    read = {"whole": _whole_tensors, "module": _module_tensors, "elastic": _elastic_tensors,
            "zero3": _zero3_tensors}[source]
    path, tensors = read(model, info, tp_rank, tp)
    params = dict(model.named_parameters())
    missing, unknown = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unknown:
        what = f"no saved weights for {missing[:3]}" if missing else f"weights of parameters this model lacks " \
                                                                     f"{unknown[:3]}"
        raise UserError(f"{path}: {what}: written by a different model config")
    for name, p in params.items():
        saved = tensors[name]
        if tuple(saved.shape) != tuple(p.shape):
            raise UserError(f"{path}: {name} has shape {tuple(saved.shape)}, this model's is {tuple(p.shape)}: "
                            f"written by a different model config")
        # DeepSpeed's cast for bf16: parameters only (buffers keep their dtype), round to nearest
        p.data = saved.to(device=p.device, dtype=dtype or p.dtype, copy=True)  # a copy: `saved` may be mapped
    return source


def noise_state(info: ckpt.CheckpointInfo) -> dict | None:
    """The random-h_0 stream the model was trained with: rank 0's trainer state, or the seed a whole-weights
    checkpoint records; None when the checkpoint has neither."""
    if info.meta.get("noise_seed") is not None:
        return {"seed": int(info.meta["noise_seed"]), "gen": None}
    if (info.path / "trainer_state_rank0.pt").exists():
        return ckpt.load_rank_state(info, 0).get("model_noise")
    return None


def fill_from_checkpoint(model: torch.nn.Module, info: ckpt.CheckpointInfo, tp_rank: int, tp: int, config: dict,
                         tokenizer, tokenizer_dir: str, *, dtype: torch.dtype | None = None) -> str:
    """A built model made the checkpoint's, without an engine: the fit checks (`check_fits`: parameter names and
    whole shapes, tokenizer), this TP rank's weights (`load_model_weights`, cast to `dtype`) and the random-h_0
    stream (`noise_state`). What `load_run`, `loopstack eval` and `train.init_from` do. Returns the weight source."""
    check_fits(info, model, tp, config, tokenizer.sha256, tokenizer_dir)
    source = load_model_weights(model, info, tp_rank, tp, dtype=dtype)
    noise = noise_state(info)
    if noise is not None:
        model.load_noise_state(noise)
    return source


def save_whole_checkpoint(run_dir: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                          tokenizer_sha256: str, step: int = 0, noise_seed: int | None = None) -> Path:
    """Write a complete checkpoint holding only whole weights: `<run_dir>/checkpoints/<step>/model.safetensors`
    (names and shapes as `LoopedLM.state_dict()` at TP=1) and its COMPLETE record (config, tokenizer, every
    parameter's shape, file sizes and sha256), then `latest`. What `loopstack convert hf` writes; `load_run`, eval,
    generate, export and `train.init_from` read it like any other checkpoint (it has no optimizer or loader state,
    so `--resume` cannot continue from it). Written into a temporary directory and renamed, as the trainer does."""
    from safetensors.torch import save_file

    from loopstack.fileio import atomic_write, fsync_path

    ckpt_dir = Path(run_dir) / "checkpoints"
    final, tmp = ckpt_dir / str(step), ckpt_dir / f".tmp-{step}"
    if final.exists():
        raise UserError(f"{final}: exists already")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp / WHOLE_FILE), metadata={"format": "pt", "writer": "loopstack"})
    fsync_path(tmp / WHOLE_FILE)
    record = {"step": step, "format": "whole", "world_size": 1, "tp": 1, "dp": 1, "time": time.time(),
              "config": config, "tokenizer_sha256": tokenizer_sha256,
              "param_shapes": {k: list(v.shape) for k, v in tensors.items()},
              "noise_seed": noise_seed,
              "files": {WHOLE_FILE: (tmp / WHOLE_FILE).stat().st_size},
              "sha256": {WHOLE_FILE: ckpt.sha256_file(tmp / WHOLE_FILE)}}
    atomic_write(tmp / ckpt.COMPLETE, json.dumps(record, indent=1))
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(ckpt_dir)
    atomic_write(ckpt_dir / ckpt.LATEST, f"{step}\n")
    return final

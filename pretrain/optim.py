"""Optimizers and learning-rate schedules.

    groups = build_param_groups(model, param_roles, cfg.train)       # who gets which lr / decay / update rule
    opt = build_optimizer(model, param_roles, cfg.train, tp_group=..)  # one torch optimizer DeepSpeed wraps
    set_lr(opt, step, cfg.train)                                     # before each optimizer step (0-based)

Parameter roles (given by the model, by parameter name): "matrix" = 2-D block matrices (decayed; Muon
when train.optimizer = muon), "embedding", "head", "norm", "injection", "lora" (per-loop LoRA adapters),
"bias" (AdamW, no decay); a role not in ROLES is an error. This is the recipe of the FLT and Parcae
papers: Muon for the block matrices, AdamW for the embedding, the head, gains and the injection
parameters, each group at its own learning rate. `train.adamw_lr_scaling: nanochat` scales the embedding and head
lrs by (d_model / 768)^-0.5 (`lr_scale`; each group carries the model's d_model); `train.muon_ns_dtype` picks the
Newton-Schulz dtype (`ns_dtype`).

Everything is one optimizer (`HybridOptimizer`) so that DeepSpeed can wrap it as a client optimizer under
any ZeRO stage; see `pretrain.muon` for how the Muon part stays correct under ZeRO 1/2/3 and TP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from pretrain.muon import (
    MatrixInfo,
    MuonStats,
    TPContext,
    Zero3Matrix,
    muon_step_flat,
    muon_step_shaped,
    muon_step_zero3,
)

ROLES = ("matrix", "embedding", "head", "norm", "injection", "lora", "bias")
# group name -> update rule; this order is the param-group order
GROUPS: dict[str, str] = {"muon": "muon", "adamw_decay": "adamw", "adamw_no_decay": "adamw",
                          "embedding": "adamw", "head": "adamw"}


# --- schedules ------------------------------------------------------------------------------------

def lr_at(step: int, train_cfg: Any) -> float:
    """LR multiplier in [0, 1] at 0-based optimizer step `step`.

    Warmup is linear, (step + 1) / warmup_steps, so the first step already moves. After it:
    cosine from 1 to min_lr_ratio; wsd holds 1, then decays linearly over the last
    round(decay_fraction * steps) steps; constant holds 1. Both decays reach min_lr_ratio at
    step == train.steps (one past the last step, so no step is spent at the floor) and stay there.
    """
    total, warm, floor = train_cfg.steps, train_cfg.warmup_steps, train_cfg.min_lr_ratio
    if step < warm:
        return (step + 1) / warm
    if train_cfg.schedule == "constant":
        return 1.0
    if train_cfg.schedule == "cosine":
        span = total - warm
        progress = 1.0 if span <= 0 else min(1.0, (step - warm) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if train_cfg.schedule == "wsd":
        start = max(warm, total - round(train_cfg.decay_fraction * total))
        if step < start:
            return 1.0
        span = total - start
        progress = 1.0 if span <= 0 else min(1.0, (step - start) / span)
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule {train_cfg.schedule!r}")


# train.adamw_lr_scaling: nanochat (the FLT paper's official code) scales its AdamW groups by (d_model / 768)^-0.5
NANOCHAT_LR_SCALED = ("embedding", "head")
NANOCHAT_REFERENCE_WIDTH = 768


def lr_scale(name: str, train_cfg: Any, d_model: int | None) -> float:
    """The multiplier `train.adamw_lr_scaling` puts on group `name`'s lr: none = 1; nanochat (nanochat
    `dmodel_lr_scale`) = (d_model / 768)^-0.5 for the embedding and head groups (nanochat's only AdamW groups),
    1 for Muon and the other AdamW groups (gains, injection, LoRA, biases; matrices under train.optimizer: adamw)."""
    if getattr(train_cfg, "adamw_lr_scaling", "none") == "none" or name not in NANOCHAT_LR_SCALED:
        return 1.0
    if not d_model:
        raise ValueError("train.adamw_lr_scaling: nanochat needs the model's d_model (pass d_model=, or a model "
                         "with .cfg.d_model)")
    return (d_model / NANOCHAT_REFERENCE_WIDTH) ** -0.5


def group_base_lr(name: str, train_cfg: Any, d_model: int | None = None) -> float:
    """Peak lr of a param group, read from the config (not the checkpoint: a resumed run may change it), times the
    `lr_scale` of train.adamw_lr_scaling (`d_model`: the model's width, which that rule needs)."""
    if name == "muon":
        return train_cfg.muon_lr
    if name == "embedding":
        return (train_cfg.embed_lr or train_cfg.lr) * lr_scale(name, train_cfg, d_model)
    if name == "head":
        return (train_cfg.head_lr or train_cfg.lr) * lr_scale(name, train_cfg, d_model)
    if name in GROUPS:
        return train_cfg.lr
    raise ValueError(f"param group {name!r} is not one of loopstack's groups {list(GROUPS)}")


def set_lr(optimizer: Any, step: int, train_cfg: Any, d_model: int | None = None) -> float:
    """Set every group's lr to its base lr times `lr_at(step)`; returns the multiplier.

    `optimizer` is ours or any DeepSpeed wrapper of it (they all expose the same `param_groups`). Each group carries
    the model's `d_model` from `build_param_groups` (an architecture constant, so a checkpoint's copy is the same).
    """
    mult = lr_at(step, train_cfg)
    for group in optimizer.param_groups:
        # d_model: a group restored from a checkpoint written before groups carried it takes the caller's
        group["lr"] = group_base_lr(group["name"], train_cfg, group.get("d_model") or d_model) * mult
    return mult


# --- param groups ---------------------------------------------------------------------------------

def build_param_groups(model: torch.nn.Module, param_roles: Mapping[str, str], train_cfg: Any, *,
                       d_model: int | None = None) -> list[dict]:
    """Trainable parameters sorted into the named groups, each with its lr and weight decay, and the model's width
    `d_model` (default: `model.cfg.d_model` when the model has a config; train.adamw_lr_scaling reads it)."""
    if d_model is None:
        d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, _ in named if n not in param_roles]  # extra names (frozen, tied aliases) are fine
    unknown = sorted({r for r in param_roles.values() if r not in ROLES})
    if missing or unknown:
        raise ValueError(f"param_roles: no role for {missing[:5]}; unknown roles {unknown} "
                         f"(roles: {', '.join(ROLES)})")
    muon = train_cfg.optimizer == "muon"
    members: dict[str, list[torch.nn.Parameter]] = {g: [] for g in GROUPS}
    for n, p in named:
        role = param_roles[n]
        if role == "matrix":
            if muon and p.dim() != 2:
                raise ValueError(f"{n}: role 'matrix' under Muon needs a 2-D tensor, got {tuple(p.shape)}")
            members["muon" if muon else "adamw_decay"].append(p)
        elif role in ("embedding", "head"):
            members[role].append(p)
        else:
            members["adamw_no_decay"].append(p)
    decay = {"muon": train_cfg.muon_weight_decay, "adamw_decay": train_cfg.weight_decay}
    return [dict(params=ps, name=g, kind=GROUPS[g], lr=group_base_lr(g, train_cfg, d_model),
                 weight_decay=decay.get(g, 0.0), d_model=d_model)
            for g, ps in members.items() if ps]


# --- the optimizer --------------------------------------------------------------------------------

class HybridOptimizer(torch.optim.Optimizer):
    """AdamW groups and Muon groups in one torch optimizer, with a step that can be vetoed.

    AdamW is torch's own (fused on CUDA), run on the AdamW groups and sharing this optimizer's state, so
    its checkpoints are plain `state_dict`s. Muon runs per group with `pretrain.muon`. `skip_next_step`
    makes `step()` a no-op: the engine sets it for a step every rank agreed to skip (non-finite loss or
    gradients), so neither weights nor moments, momenta or Adam step counts move. `skip_flag` is the same veto
    as a device tensor (1.0 = skip), read by no one on the host: for AdamW groups it is fused AdamW's
    `found_inf`, whose kernel leaves weights and moments alone and whose step count is put back on the
    device; Muon groups run their whole step and choose on the device, per tensor, between the new and the
    old weights and momenta (`pretrain.muon.momentum_update` / `apply_update_`: bit for bit the old ones on a
    skip, bit for bit today's update otherwise). An optimizer takes it when it has `masks_on_device` (its
    AdamW, if any, is fused); the engine reads the flag on the host for the others.

    The class name deliberately avoids 'muon' and the params carry no `use_muon`: DeepSpeed keys its own
    (shard-wise) Muon path on those.
    """

    def __init__(self, groups: list[dict], *, betas: tuple[float, float], eps: float, momentum: float,
                 fused: bool = False, tp_group: dist.ProcessGroup | None = None,
                 dp_group: dist.ProcessGroup | None = None, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32, muon_distributed: bool = True):
        super().__init__(groups, dict(lr=0.0, weight_decay=0.0, momentum=momentum))
        self.skip_next_step = False
        self.skip_flag: torch.Tensor | None = None
        self.tp = TPContext(tp_group)
        self.dp_group = dp_group
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype
        # distributed Muon: each matrix orthogonalised by one DP rank (pretrain.muon); False = every rank all
        self.muon_distributed = muon_distributed
        # bytes sent and NS FLOPs, summed since construction (or the last reset): DeepSpeed may call step()
        # several times per optimizer step (one group or sub-group at a time), so readers take differences
        self.muon_stats = MuonStats()
        # per Muon group: the model's matrices in group order (DeepSpeed may swap the group's tensors for
        # flat partitions or fp32 copies, which lose megatron's TP attributes)
        self.matrices: dict[str, tuple[list[torch.Tensor], list[MatrixInfo]]] = {
            g["name"]: (list(g["params"]), [MatrixInfo.of(p, self.tp.size) for p in g["params"]])
            for g in self.param_groups if g["kind"] == "muon"}
        # ZeRO-3 only: id of a sub-group's flat fp32 partition -> where its matrices sit (see bind_zero3)
        self.zero3_matrices: dict[int, list[Zero3Matrix]] = {}
        adam_groups = [g for g in self.param_groups if g["kind"] == "adamw"]
        self._adamw = torch.optim.AdamW(adam_groups, lr=0.0, betas=betas, eps=eps, weight_decay=0.0,
                                        fused=True if fused else None) if adam_groups else None
        # a skip can be applied on the device without the host reading the flag (see the class docstring)
        self.masks_on_device = bool(fused) or self._adamw is None
        # ZeRO 1/2 distributed Muon: each partition's fragment table, computed at the first step (pretrain.muon)
        self._muon_plans: dict = {}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - see the class docstring
        if closure is not None:
            raise NotImplementedError("HybridOptimizer.step does not take a closure")
        if self.skip_next_step:
            return None
        if self.skip_flag is not None and not self.masks_on_device:
            raise RuntimeError("skip_flag needs fused AdamW; read the flag and set skip_next_step")
        # DeepSpeed may call step with a subset of groups (ZeRO 1/2: one at a time) or emptied lists (ZeRO 3)
        adam = [g for g in self.param_groups if g["kind"] == "adamw" and g["params"]]
        if adam:
            self._adamw.param_groups = adam
            self._adamw.state = self.state
            self._adamw.found_inf = self.skip_flag  # fused AdamW's on-device veto (None: apply)
            try:
                self._adamw.step()
            finally:
                self._adamw.found_inf = None
        for group in self.param_groups:
            if group["kind"] == "muon" and group["params"]:
                self._muon_step(group)
        return None

    def bind_zero3(self, zero3: Any) -> None:
        """Under ZeRO-3 (DeepSpeed's stage-3 optimizer wrapping this one): record, for every Muon sub-group's
        flat fp32 partition, where each matrix's chunk sits, from ZeRO-3's own `grad_position`."""
        info_of = {id(p): info for lp, infos in self.matrices.values() for p, info in zip(lp, infos, strict=True)}
        self.dp_group = zero3.dp_process_group
        for sub_group, flat in enumerate(zero3.fp32_partitioned_groups_flat):
            if self.param_groups[zero3.sub_group_to_group_id[sub_group]]["kind"] != "muon":
                continue
            found = []
            for p in zero3.fp16_groups[sub_group]:
                group_index, offset, chunk = zero3.grad_position[zero3.get_param_id(p)]
                assert group_index == sub_group, (group_index, sub_group)
                found.append(Zero3Matrix(info_of[id(p)], offset, chunk, p.ds_numel))
            self.zero3_matrices[id(flat)] = found

    def _muon_step(self, group: dict) -> None:
        lp_params, infos = self.matrices[group["name"]]
        params = group["params"]
        keep = None if self.skip_flag is None else self.skip_flag.reshape(()) == 0  # on the device
        args = dict(lr=group["lr"], wd=group["weight_decay"], beta=group["momentum"], tp=self.tp,
                    steps=self.ns_steps, ns_dtype=self.ns_dtype, distributed=self.muon_distributed,
                    stats=self.muon_stats, keep=keep)
        if self.zero3_matrices:  # ZeRO-3 steps one sub-group's flat partition at a time
            for flat in params:
                muon_step_zero3(flat, self.zero3_matrices[id(flat)], self.state, dp_group=self.dp_group, **args)
        elif len(params) == len(infos) and all(p.shape == i.local_shape for p, i in zip(params, infos, strict=True)):
            muon_step_shaped(params, infos, self.state, dp_group=self.dp_group, **args)
        elif len(params) == 1 and params[0].dim() == 1:
            muon_step_flat(params[0], lp_params, infos, self.state, dp_group=self.dp_group, plans=self._muon_plans,
                           **args)
        else:
            raise RuntimeError(f"Muon group {group['name']!r}: unexpected parameter layout "
                               f"{[tuple(p.shape) for p in params][:4]}")


def build_optimizer(model: torch.nn.Module, param_roles: Mapping[str, str], train_cfg: Any, *,
                    tp_group: dist.ProcessGroup | None = None, dp_group: dist.ProcessGroup | None = None,
                    device: torch.device | None = None, fused: bool | None = None) -> HybridOptimizer:
    """The optimizer for `train_cfg.optimizer` ("adamw": all AdamW; "muon": Muon on matrices + AdamW). AdamW is
    torch's fused kernel on CUDA (`fused` None) or when `fused` is True (torch has a CPU one too)."""
    if fused is None:
        fused = device is not None and device.type == "cuda"
    return HybridOptimizer(build_param_groups(model, param_roles, train_cfg),
                           betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
                           momentum=train_cfg.muon_momentum, fused=fused, tp_group=tp_group, dp_group=dp_group,
                           ns_dtype=ns_dtype(train_cfg, device), muon_distributed=train_cfg.muon_distributed)


def ns_dtype(train_cfg: Any, device: torch.device | None) -> torch.dtype:
    """Muon's Newton-Schulz dtype, `train.muon_ns_dtype`: fp32 | bf16 as given; auto = bf16 on CUDA (fast, and what
    Muon's authors use), fp32 elsewhere (CPU bf16 matmuls are slow and gain nothing)."""
    choice = getattr(train_cfg, "muon_ns_dtype", "auto")
    if choice == "auto":
        choice = "bf16" if device is not None and device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]

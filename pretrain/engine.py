"""The DeepSpeed engine, built from our config, with a step guard that every rank agrees on.

    engine = build_engine(model, cfg, env, param_roles)
    set_lr(engine.optimizer, step, cfg.train)                     # pretrain.optim; step is 0-based
    for micro in range(cfg.train.grad_accum):
        loss = engine(tokens, labels, loops=k)                    # forward kwargs pass through
        engine.backward(loss)
        stepped, grad_norm = step_or_skip(engine, loss_is_finite=ok)  # = engine.step(ok); acts at the boundary

What DeepSpeed gets: our `HybridOptimizer` as a client optimizer (ZeRO 0/1/2/3 wrap it), micro batch,
grad accumulation, clipping, bf16, and megatron's groups through `MegatronMPU` (TP = model parallel).
bf16 keeps fp32 master weights and optimizer state (DeepSpeed's wrappers); with ZeRO >= 1 gradients
are also accumulated and reduced in fp32, with ZeRO 0 DeepSpeed accumulates them in bf16. bf16_autocast is
DeepSpeed fp32 (weights, gradients, optimizer) with the model's forward under torch.autocast (`autocast_dtype`).

Muon and AdamW work with every ZeRO stage and any TP (see `pretrain.muon`); under ZeRO-3 the optimizer is
told where each matrix sits in the flat sub-group partitions (`HybridOptimizer.bind_zero3`).
The global grad norm and clipping come from DeepSpeed for ZeRO 1-3 and from `Engine` for ZeRO 0.

Checkpoint files. DeepSpeed reads and writes its files through `engine.checkpoint_engine`; ours
(`_SafeCheckpointEngine`) loads with `pretrain.checkpoint.safe_load` (weights only: a file that would run
code is refused) and records a failed write (a full disk) instead of raising it, so a rank whose write fails
still goes through DeepSpeed's collectives and `pretrain.checkpoint.save_checkpoint` can agree on the failure
across ranks. The copy of DeepSpeed's recovery scripts (`zero_to_fp32.py`) into `checkpoints/` is guarded the
same way.

Skipping a step. DeepSpeed skips on overflow only for some stage/dtype combinations (never for ZeRO-0
fp32). Ours is uniform: gradient hooks and `backward` record on each rank, without a host sync, whether
any local loss or gradient was non-finite; at the boundary one all-reduce (max) over all ranks turns
that (and the caller's `loss_is_finite`) into one decision; then DeepSpeed's step runs as usual (so its
bookkeeping, gradient clearing and accumulation counters stay in step on every rank) but the optimizer
underneath does nothing. Weights, moments, Muon momenta and Adam step counts are untouched.

Host syncs (docs/performance.md, "Host syncs"). `step_deferred` takes the decision without reading it on
the host where it can: on CUDA with ZeRO 0/1/2, the agreed flag goes to the optimizer as a device tensor:
fused AdamW takes it as its `found_inf` (the kernel leaves weights and moments alone and the step count is
put back, all on device) and Muon groups pick, per tensor and on the device, the old or the new weights and
momenta; the ZeRO-0 clip is computed on device. Elsewhere (CPU, ZeRO-3, whose own DeepSpeed step reads its
grad norm on the host anyway) the flag is read on the host and `HybridOptimizer.skip_next_step` vetoes the
step as before; on CPU reading a tensor is no sync at all.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from pretrain.distributed import DistEnv, MegatronMPU, prepare_deepspeed
from pretrain.optim import HybridOptimizer, build_optimizer


class StepOutcome(NamedTuple):
    stepped: bool  # False on a non-boundary micro step and on a skipped step
    grad_norm: float  # global pre-clip gradient norm; nan off the boundary; inf/nan when non-finite


class DeviceStep(NamedTuple):
    """A boundary step as `Engine.step_deferred` leaves it: values the host reads when it needs them."""

    skipped: torch.Tensor  # float32 [1] on the device: 1.0 when every rank skipped the update, 0.0 when applied
    grad_norm: torch.Tensor | float  # the pre-clip global grad norm: a device tensor, or DeepSpeed's host value


def deepspeed_config(cfg: Any, env: DistEnv) -> dict:
    """The DeepSpeed config dict for this run (no optimizer section: we pass our own)."""
    t, stage = cfg.train, cfg.parallel.zero_stage
    bf16 = t.dtype == "bf16"  # bf16_autocast: DeepSpeed bf16 off (fp32 weights and grads; autocast in the model)
    conf = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * env.dp,
        "gradient_clipping": 0.0 if _clips_itself(cfg) else t.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # ours is a torch.optim.Optimizer DeepSpeed has not listed
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16 and stage > 0:
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    return conf


def _clips_itself(cfg: Any) -> bool:
    """ZeRO 0 norms and clips in `Engine`, not DeepSpeed: its fp32 path clips but keeps no norm, and its
    bf16 wrapper (FP16_UnfusedOptimizer) norms gradient tensors, which carry no TP attributes, so on TP
    ranks > 0 even the sharded gradients are dropped (a wrong norm, and wrong clipping, under TP)."""
    return cfg.parallel.zero_stage == 0


class _FiniteGuard:
    """A device flag that turns False when any gradient or loss seen since the last `take` is non-finite."""

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        # a tensor hook on a leaf sees its summed gradient once per backward, before DeepSpeed's hooks
        self.handles = [p.register_hook(self._check) for p in params if p.requires_grad]

    def _check(self, grad: torch.Tensor) -> None:
        self.ok.logical_and_(torch.isfinite(grad).all().to(self.ok.device))

    def note(self, loss: torch.Tensor) -> None:
        self.ok.logical_and_(torch.isfinite(loss.detach()).all().to(self.ok.device))

    def take(self) -> torch.Tensor:
        ok = self.ok.clone()
        self.ok.fill_(True)
        return ok


class Engine:
    """A thin wrapper over `DeepSpeedEngine`: the same calls, plus the agreed skip and the grad norm.

    Anything not defined here (`module`, `optimizer`, `global_steps`, `train()`, ...) is DeepSpeed's.
    """

    def __init__(self, ds_engine: Any, optimizer: HybridOptimizer, guard: _FiniteGuard, cfg: Any, env: DistEnv,
                 device_skip: bool | None = None):
        self.ds = ds_engine
        self.base_optimizer = optimizer
        self._guard = guard
        self._cfg, self._env = cfg, env
        self._last_skip: torch.Tensor | bool = False
        self._skip_count: torch.Tensor | int = 0
        self._grad_norm: torch.Tensor | float = math.nan
        # decide a skip on the device, with no host read (module docstring): ZeRO 0-2, fused AdamW (if any);
        # by default on CUDA only (on CPU a read costs nothing); `build_engine(device_skip=True)` forces it
        wanted = env.device.type == "cuda" if device_skip is None else device_skip
        self.device_skip = wanted and cfg.parallel.zero_stage < 3 and optimizer.masks_on_device

    def __getattr__(self, name: str) -> Any:  # only called for names not found on the wrapper
        ds = self.__dict__.get("ds")
        if ds is None:
            raise AttributeError(name)
        return getattr(ds, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._guard.note(loss)
        self.ds.backward(loss)

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.ds.is_gradient_accumulation_boundary()

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last boundary step was skipped (reads the device flag: a host sync on CUDA)."""
        return bool(self._last_skip)

    @property
    def skipped_steps(self) -> int:
        """Boundary steps skipped so far (reads a device counter: a host sync on CUDA)."""
        return int(self._skip_count)

    def step(self, loss_is_finite: bool = True) -> StepOutcome:
        """DeepSpeed's step; at the accumulation boundary, skipped on every rank if any rank saw a
        non-finite loss or gradient or was told `loss_is_finite=False` (e.g. a loss spike). Reads the outcome
        on the host (`step_deferred` does not)."""
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()
            return StepOutcome(False, math.nan)
        out = self.step_deferred(loss_is_finite)
        return StepOutcome(not bool(out.skipped.item()), host_norm(out.grad_norm))

    def step_deferred(self, loss_is_finite: bool | torch.Tensor = True) -> DeviceStep:
        """`step` at the accumulation boundary without reading the outcome: the agreed skip flag and the grad
        norm come back as device values. `loss_is_finite` may be a device bool tensor. Where the skip cannot
        be applied on the device (`device_skip` False) the flag is read here, as `step` always did."""
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("step_deferred is for the accumulation boundary; call step() on the micro steps")
        ok = self._guard.take()
        if isinstance(loss_is_finite, torch.Tensor):
            ok = ok & loss_is_finite.to(ok.device, torch.bool).reshape(())
        elif not loss_is_finite:
            ok = torch.zeros_like(ok)
        bad = (~ok).to(torch.float32).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # queued on the device; no host wait under NCCL
        norm = self._clip_zero0() if _clips_itself(self._cfg) else None
        if self.device_skip:
            self.base_optimizer.skip_flag = bad.reshape(())  # 0-dim, as GradScaler hands fused AdamW its found_inf
        else:
            self.base_optimizer.skip_next_step = bool(bad.item())
        try:
            self.ds.step()
        finally:
            self.base_optimizer.skip_next_step = False
            self.base_optimizer.skip_flag = None
        if norm is None:
            norm = self.ds.get_global_grad_norm()
            norm = math.nan if norm is None else norm
            if isinstance(norm, torch.Tensor):
                norm = norm.detach()
        self._grad_norm, self._last_skip = norm, bad
        self._skip_count = self._skip_count + bad  # a device tensor after the first boundary
        return DeviceStep(bad, norm)

    def get_global_grad_norm(self) -> float:
        """Pre-clip global gradient norm (TP shards counted once, DP-averaged grads) of the last boundary
        (read on the host: a sync on CUDA)."""
        return host_norm(self._grad_norm)

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        **kwargs: Any) -> Any:
        return self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, **kwargs: Any) -> Any:
        """DeepSpeed's: returns (path, client_state); path is None when nothing was found."""
        return self.ds.load_checkpoint(load_dir, tag=tag, **kwargs)

    @torch.no_grad()
    def _clip_zero0(self) -> torch.Tensor:
        """ZeRO 0: grads are whole and DP-averaged by now; megatron-style norm (a TP-replicated param
        counts once, on TP rank 0), then clip like torch's clip_grad_norm_. All on the device: the
        coefficient min(1, clip / (norm + 1e-6)) is computed in float64 as the host did it in Python and
        rounded to float32 as the kernel rounded the Python scalar, so grads are bit-identical to a host
        clip; a factor of exactly 1 (no clipping, or a non-finite norm) leaves every value as it was."""
        params = [p for p in self.ds.module.parameters() if p.grad is not None]
        tp_rank = self._env.tp_rank
        mine = [p.grad for p in params if tp_rank == 0 or getattr(p, "tensor_model_parallel", False)]
        sq = torch.zeros((), dtype=torch.float32, device=self._env.device)
        for g in mine:
            sq += g.detach().float().pow(2).sum()
        if self._env.tp > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
        norm = sq.sqrt()
        clip = self._cfg.train.grad_clip
        if clip > 0:
            coef = (clip / (norm.double() + 1e-6)).clamp(max=1.0)
            coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef)).float()
            for p in params:
                if p.grad.dtype == torch.float32:
                    p.grad.mul_(coef)
                else:  # bf16: the product in float32 rounded once, as the kernel does with a Python scalar
                    p.grad.copy_(p.grad.float() * coef)
        return norm


def host_norm(norm: torch.Tensor | float | None) -> float:
    """A grad norm as a Python float (nan for none); reading a device tensor is a host sync on CUDA."""
    if norm is None:
        return math.nan
    return float(norm)


def step_or_skip(engine: Engine, loss_is_finite: bool = True) -> StepOutcome:
    """`engine.step(loss_is_finite)`: call once per micro step (it is DeepSpeed's step on the others).

    At the boundary the decision is identical on every rank (one all-reduce of a flag); a skipped step
    leaves weights and optimizer state as they were and clears the gradients, so the next step starts
    clean. Returns (stepped, pre-clip global grad norm).
    """
    return engine.step(loss_is_finite)


class _DropMessage(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not all(n in record.getMessage() for n in self.needles)


def _quiet_root_output_warning(model: torch.nn.Module) -> None:
    """ZeRO-3 hooks each module's outputs to gather that module's own parameters before its backward; it
    cannot look into our model's output dataclass and logs so once per run. When the root module owns no
    parameters (all live in submodules, whose outputs are plain tensors) nothing is missed and the message
    is noise: drop exactly that one. A root with parameters of its own keeps the warning."""
    if any(True for _ in model.parameters(recurse=False)):
        return
    from deepspeed.utils import logger

    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("unknown inputs or outputs type", type(model).__module__))


def _use_safe_checkpoint_engine(ds_engine: Any) -> None:
    """Give DeepSpeed our checkpoint engine (see the module docstring); its default is the plain torch one."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from pretrain.checkpoint import guarded_write, safe_load

    class _SafeCheckpointEngine(TorchCheckpointEngine):
        write_failure: str | None = None

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location=map_location)

        def save(self, state_dict: Any, path: str) -> None:
            failed = guarded_write(Path(path), lambda: TorchCheckpointEngine.save(self, state_dict, path))
            self.write_failure = self.write_failure or failed

        def take_write_failure(self) -> str | None:
            """The first write that failed since the last call, as one line (None if all succeeded)."""
            failed, self.write_failure = self.write_failure, None
            return failed

    if type(ds_engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(ds_engine.checkpoint_engine).__name__}")
    engine = _SafeCheckpointEngine(ds_engine._config)
    ds_engine.checkpoint_engine = engine
    copy_scripts = getattr(ds_engine, "_copy_recovery_script", None)
    if copy_scripts is not None:  # rank 0 copies zero_to_fp32.py into checkpoints/ during every save
        def guarded_copy(save_path: str) -> None:
            failed = guarded_write(Path(save_path) / "zero_to_fp32.py", lambda: copy_scripts(save_path))
            engine.write_failure = engine.write_failure or failed

        ds_engine._copy_recovery_script = guarded_copy


def build_engine(model: torch.nn.Module, cfg: Any, env: DistEnv, param_roles: Mapping[str, str], *,
                 device_skip: bool | None = None) -> Engine:
    """`deepspeed.initialize` for `model` with our optimizer, config and megatron's groups.

    `device_skip` (None = on CUDA only): decide a skipped step on the device (`Engine.step_deferred`); True on CPU
    runs the same path there (fused AdamW on CPU), which is how the tests check it."""
    prepare_deepspeed()
    # DeepSpeed asserts LOCAL_RANK is set; a plain `python` single process (no torchrun) has none
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    import deepspeed
    from megatron.core import parallel_state as ps

    from pretrain.inference import RUN_DTYPES

    tp_group = ps.get_tensor_model_parallel_group() if env.tp > 1 else None
    dp_group = ps.get_data_parallel_group() if env.dp > 1 else None
    model.to(env.device)  # DeepSpeed would move it too; before, so fused AdamW sees device tensors
    if hasattr(model, "autocast_dtype"):  # train.dtype bf16_autocast: the model's forward and loss under autocast
        model.autocast_dtype = RUN_DTYPES[cfg.train.dtype][1]
    optimizer = build_optimizer(model, param_roles, cfg.train, tp_group=tp_group, dp_group=dp_group,
                                device=env.device, fused=device_skip or None)
    guard = _FiniteGuard([p for p in model.parameters()], env.device)
    # DeepSpeed's bf16 ZeRO-0 wrapper primes optimizer state with a zero-gradient step(); for AdamW that
    # would already apply one weight decay and advance the bias correction, so it must be a no-op.
    optimizer.skip_next_step = True
    try:
        ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, env),
                                             mpu=MegatronMPU())
    finally:
        optimizer.skip_next_step = False
    _use_safe_checkpoint_engine(ds_engine)
    if cfg.parallel.zero_stage == 3:
        optimizer.bind_zero3(ds_engine.optimizer)
        _quiet_root_output_warning(model)
        # ZeRO-3 gathers a module's own parameters around its forward/backward; a parameter used by another
        # module (a tied head reading the embedding) must be registered there, or it is seen partitioned (empty)
        for module, param in getattr(model, "external_parameters", lambda: [])():
            deepspeed.zero.register_external_parameter(module, param)
    return Engine(ds_engine, optimizer, guard, cfg, env, device_skip=device_skip)

"""The training job: `loopstack train CONFIG [--set ...] [--run-dir DIR] [--resume auto|PATH|none]`.

Reads like the recipe; each concern lives in its own module:
data (data_pipeline) -> model (pretrain.models) -> engine (pretrain.engine: DeepSpeed + optimizers)
-> loop of steps (depth sampling, guards) -> metrics / checkpoints / eval.

Exit codes: 0 finished; 75 (EXIT_REQUEUE) stopped by SIGUSR1/SIGTERM after writing a checkpoint;
2 user error (also: another trainer holds the run directory); 3 (EXIT_DIVERGED) the run diverged; 74
(EXIT_NO_SPACE) no space for a checkpoint. Run directory: LOCK (while a trainer runs), config.yaml,
metrics.jsonl, checkpoints/<step>/, checkpoints/latest, eval/.

`loopstack eval` (`evaluate_run`) needs no engine: the model is built as here and its weights are read from the
checkpoint by `pretrain.weights`; it writes eval/ and plots/ only.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from loopstack.errors import EXIT_REQUEUE, DivergedError, UserError
from loopstack.fileio import remove_stale_temps
from loopstack.runlock import RunLock
from loopstack.typed_config import to_dict
from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig, save_config
from pretrain.distributed import (
    DistEnv,
    capture_rng_state,
    init_distributed,
    prepare_deepspeed,
    restore_rng_state,
    shutdown,
    user_errors_agreed,
)
from pretrain.elastic import load_full_state, save_full_state
from pretrain.guards import DivergenceMonitor, LossGuard
from pretrain.inference import RUN_DTYPES, model_vocab_size
from pretrain.metrics import MetricsLogger, Throughput, device_peak_flops
from pretrain.weights import check_fits, global_param_shapes


@dataclass
class TrainState:
    """Counters that must survive a restart (the rest is in DeepSpeed's checkpoint and the loader)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0


class StopRequest:
    """SIGUSR1 / SIGTERM set a flag; all ranks agree to stop one step later, without a host sync.

    `poll` is called once per step, at the same point on every rank: it returns the agreement reached on the
    flags that the previous call sent (an all-reduce (max) issued with async_op=True and, on CUDA, copied to
    pinned host memory behind an event), then sends this step's flag. So a signal that arrives during step s
    stops the run after step s + 1, whose checkpoint is written (docs/performance.md, "Host syncs")."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._sent: tuple[dist.Work, _HostCopy | torch.Tensor] | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def poll(self, device: torch.device) -> bool:
        """The flag agreed at the previous call (False at the first); sends this step's flag unless it says stop."""
        agreed = self.wait()
        if not agreed:
            # filled on the device (torch.tensor(..., device=cuda) would copy from pageable memory: a sync)
            flag = torch.full((1,), int(self.signal is not None), dtype=torch.int32, device=device)
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
            if device.type == "cuda":  # the copy is ordered after the all-reduce on the stream, not on the host
                work.wait()
                self._sent = (work, _HostCopy(flag))
            else:  # gloo: the reduction runs in its thread; wait for it at the next poll
                self._sent = (work, flag)
        return agreed

    def wait(self) -> bool:
        """Finish the flag in flight (so no rank leaves a collective behind); whether it said stop."""
        if self._sent is None:
            return False
        work, flag = self._sent
        self._sent = None
        if isinstance(flag, _HostCopy):
            return bool(flag.get().item())
        work.wait()
        return bool(flag.item())


class _HostCopy:
    """A device tensor on its way to the host. On CUDA it is copied into pinned memory with non_blocking=True
    behind the work already queued and an event is recorded; `get` waits for that event only, not for work
    queued after it (the next step). On CPU the tensor is host memory already and `get` returns it."""

    def __init__(self, value: torch.Tensor):
        self.event = None
        if value.device.type == "cuda":
            self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = value

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


@dataclass
class _PendingStep:
    """A step queued on the device whose scalars the host has not read yet (`Trainer._settle` reads them)."""

    record: dict  # the host-known fields: step, lr, tokens, loops, ...
    values: _HostCopy  # float64 [loss, *stats, skipped, grad_norm if a tensor]
    stat_names: list[str]
    grad_norm: float | None  # DeepSpeed's host grad norm when it is no tensor
    diagnostics: object | None
    guarded: bool  # the loss guard already saw this loss before the step (train.spike_factor > 0)


def prepare_data(cfg: RunConfig) -> None:
    """Train the tokenizer / tokenize the corpus if the run's data is not there yet.

    Called by every rank *before* the process group exists: the pipeline forks workers, which is only safe
    in a process without gloo/OpenMP threads; a file lock lets one rank work while the others wait.
    """
    from data_pipeline.prepare import ensure_dataset

    ensure_dataset(cfg.data, cfg.tokenizer)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / cfg.name


def run(cfg: RunConfig, run_dir: Path | None = None, resume: str = "auto") -> int:
    """Entry for the CLI: one process, or one rank under torchrun."""
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    if resume not in ("auto", "none"):
        ckpt.find_resume(run_dir, resume)  # a wrong path fails now, before any setup
    prepare_data(cfg)
    env = init_distributed(tp=cfg.parallel.tp, seed=cfg.seed)
    lock = None
    try:
        lock = hold_run_dir(run_dir, env)
        return Trainer(cfg, run_dir, env).fit(resume)
    finally:
        if lock is not None:
            lock.release()
        shutdown()


def hold_run_dir(run_dir: Path, env: DistEnv) -> RunLock | None:
    """Global rank 0 takes the run directory's lock for the job's lifetime (the other ranks get None); a run
    directory held by a live trainer is refused on every rank with rank 0's one-line reason. With the lock
    held, temporary files that killed writers left behind are removed."""
    lock = None
    with user_errors_agreed():
        if env.is_main:
            lock = RunLock.acquire(run_dir)
            for directory in (run_dir, run_dir / "checkpoints", run_dir / "eval"):
                remove_stale_temps(directory)
    return lock


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, env: DistEnv):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.state = TrainState()
        self.tokens_per_step = cfg.train.micro_batch * cfg.train.grad_accum * env.dp * cfg.data.seq_len
        self.stop = StopRequest()
        prepare_deepspeed()
        self._setup_data()
        self._setup_model()
        self.guard = LossGuard(cfg.train.spike_factor, cfg.train.spike_rollback_after)
        self.divergence = DivergenceMonitor(cfg.train.diverge_loss or math.log(self.vocab_size) + 1.0,
                                            cfg.train.diverge_patience, cfg.train.max_rollbacks)
        self.log = MetricsLogger(run_dir, to_dict(cfg), enabled=env.is_main, total_steps=cfg.train.steps,
                                 console=cfg.logging.console, wandb_mode=cfg.logging.wandb,
                                 wandb_project=cfg.logging.wandb_project, run_name=cfg.name)

    # --- setup -------------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        from data_pipeline.loader import PackedDataset
        from data_pipeline.tokenizer import load_tokenizer

        cfg, env = self.cfg, self.env
        self.tokenizer = load_tokenizer(cfg.tokenizer.dir, cfg.tokenizer.kind)
        self.train_dirs = cfg.data.train or [cfg.data.out]
        self.train_data = PackedDataset(
            self.train_dirs, cfg.data.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=env.dp_rank,
            dp_size=env.dp, seed=cfg.seed, weights=cfg.data.weights or None, split="train",
            eval_fraction=0.0 if cfg.data.eval else cfg.data.eval_fraction,
            tokenizer_sha256=self.tokenizer.sha256, document_masking=cfg.data.document_masking)
        if cfg.data.prefetch:  # read ahead in a thread (data_pipeline/prefetch.py); checkpoints keep what was consumed
            from data_pipeline.prefetch import Prefetcher

            self.train_data = Prefetcher(self.train_data, cfg.data.prefetch)

    def eval_data(self):
        """A fresh eval stream from its start, so every eval sees the same sequences."""
        return eval_data(self.cfg, self.env, self.tokenizer.sha256)

    def _setup_model(self) -> None:
        from pretrain.engine import build_engine
        from pretrain.models import build_model, param_roles

        cfg = self.cfg
        self.vocab_size = model_vocab_size(cfg, self.tokenizer)
        torch.manual_seed(cfg.seed)  # identical init on every rank (megatron splits the master weights)
        model = build_model(cfg.model, cfg.loop, self.vocab_size,
                            activation_checkpointing=cfg.parallel.activation_checkpointing)
        if cfg.train.init_from:
            self._init_weights_from(model, cfg.train.init_from)
        model.loss_chunk = cfg.train.loss_chunk_tokens  # the chunked loss (models/looped.py), applied from outside
        if cfg.loop.exit_gate_only:  # the exit gate's stage II: the model frozen (no gradient, no optimizer state)
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("exit_gate."))
        if cfg.train.compile:  # the core layers' forward compiled once, reused by every loop (models/compile.py)
            from pretrain.models.compile import compile_model

            compile_model(model)
        self.engine = build_engine(model, cfg, self.env, param_roles(model))

    def _init_weights_from(self, model: torch.nn.Module, source: str) -> None:
        """`train.init_from`: start from another run's (or a converted model's) weights, with a fresh optimizer and
        step 0 (uptraining). The weights are read as `pretrain.inference.load_run` reads them (any TP size or
        ZeRO stage, resplit for this run's TP), checked against this run's model (names, whole shapes, tokenizer)
        first; the random-h_0 seed comes along. A resumed run restores its own checkpoint over them."""
        from pretrain.inference import find_checkpoint
        from pretrain.weights import fill_from_checkpoint

        say = print if self.env.is_main else (lambda text: None)
        with user_errors_agreed():
            _, info = find_checkpoint(source, warn=say)
            fill_from_checkpoint(model, info, self.env.tp_rank, self.env.tp, to_dict(self.cfg), self.tokenizer,
                                 self.cfg.tokenizer.dir)
        say(f"init_from: weights of {info.path} (step {info.step})")

    # --- resume / checkpoint ------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"config": to_dict(self.cfg), "tokenizer_sha256": self.tokenizer.sha256, "tp": self.env.tp,
                "dp": self.env.dp, "state": asdict(self.state),
                "param_shapes": global_param_shapes(self.engine.module, self.env.tp)}

    def save(self) -> Path:
        rank_state = {"loader": self.train_data.state_dict(), "rng": capture_rng_state(),
                      "state": asdict(self.state), "guard": self.guard.state_dict(),
                      "divergence": self.divergence.state_dict(),
                      "model_noise": self.engine.module.noise_state()}
        elastic = self.cfg.parallel.zero_stage >= 1 and self.cfg.checkpoint.elastic  # ZeRO-0 state is whole
        env = self.env
        write_extra = (lambda d: save_full_state(self.engine, d, env.tp_rank, env.dp_rank, env.dp)) if elastic \
            else None
        path = ckpt.save_checkpoint(self.engine, self.run_dir, self.state.step, rank_state, self._meta(),
                                    keep_last=self.cfg.checkpoint.keep_last,
                                    keep_every=self.cfg.checkpoint.keep_every, write_extra=write_extra)
        self.log.message(f"checkpoint: {path}")
        return path

    def restore(self, info: ckpt.CheckpointInfo, *, rollback: bool = False) -> None:
        """Load `info` into the engine, the loader and the counters. A refusal on any rank (a file only that
        rank reads, such as its trainer state) is raised on every rank, so no rank is left in a collective."""
        with user_errors_agreed():
            self._restore(info, rollback=rollback)

    def _restore(self, info: ckpt.CheckpointInfo, *, rollback: bool = False) -> None:
        meta = info.meta
        saved_cfg = meta.get("config", {})
        differs = check_fits(info, self.engine.module, self.env.tp, to_dict(self.cfg), self.tokenizer.sha256,
                             self.cfg.tokenizer.dir)
        stage, tp, dp = self.cfg.parallel.zero_stage, self.env.tp, self.env.dp
        saved_stage = saved_cfg.get("parallel", {}).get("zero_stage", stage)
        saved_tp, saved_dp = meta.get("tp", tp), meta.get("dp", dp)
        if saved_stage != stage and 0 in (saved_stage, stage):
            raise UserError(f"{info.path}: saved with parallel.zero_stage = {saved_stage}, this run has {stage}: "
                            f"ZeRO-0 and ZeRO 1-3 optimizer states do not convert; resume with zero_stage "
                            f"{saved_stage}")
        if saved_tp != tp and stage == 0:
            raise UserError(f"{info.path}: saved with parallel.tp = {saved_tp}, this run has {tp}: changing the "
                            f"tensor-parallel size needs a ZeRO 1-3 checkpoint (parallel.zero_stage >= 1)")
        # ZeRO 1-3 partitions are tied to the layout and stage: rebuild them from the whole tensors we saved
        resize = stage >= 1 and (saved_dp != dp or saved_tp != tp or saved_stage != stage)
        if resize:
            load_full_state(self.engine, info.path, self.env.tp_rank, saved_tp=saved_tp, tp=tp)
            if saved_stage != stage:
                self.log.message(f"resume: ZeRO stage {saved_stage} -> {stage}: weights and optimizer state "
                                 f"re-partitioned from the whole-tensor state")
        else:
            try:
                load_path, _ = self.engine.load_checkpoint(str(info.path.parent), tag=info.path.name,
                                                           load_lr_scheduler_states=False)
            except ckpt.LOAD_ERRORS as err:
                hint = f"; the run's config differs from the checkpoint's: {'; '.join(differs[:6])}" if differs else ""
                raise UserError(f"{info.path}: DeepSpeed could not load this checkpoint "
                                f"({ckpt.describe_error(err)}){hint}") from err
            if load_path is None:
                raise UserError(f"{info.path}: DeepSpeed could not load this checkpoint")
        same_layout = meta.get("world_size") == self.env.world_size and saved_tp == tp
        rank_state = ckpt.load_rank_state(info, self.env.rank if same_layout else 0)
        if rollback:  # keep the data position (skips the offending batches) and the counters of skips
            self.state.step = rank_state["state"]["step"]
            self.state.rollbacks += 1
            return
        self.state = TrainState(**rank_state["state"])
        self.train_data.load_state_dict(rank_state["loader"])
        self.guard.load_state_dict(rank_state["guard"])
        if "divergence" in rank_state:  # checkpoints written before the monitor existed start it afresh
            self.divergence.load_state_dict(rank_state["divergence"])
        if same_layout:
            restore_rng_state(rank_state["rng"])
            self.engine.module.load_noise_state(rank_state["model_noise"])
        else:
            changed = [f"{what} size {old} -> {new}" for what, old, new in
                       (("tensor-parallel", saved_tp, tp), ("data-parallel", saved_dp, dp)) if old != new]
            self.log.message(
                f"resume: {' and '.join(changed)}: model and optimizer loaded; the data stream continues from "
                f"global sample position of step {self.state.step} (no sample repeated or skipped), but each "
                f"rank's share of a global batch differs from the old layout, and RNG streams are re-seeded")

    # --- the loop ------------------------------------------------------------------------------------

    def fit(self, resume: str) -> int:
        cfg, env = self.cfg, self.env
        info = ckpt.find_resume(self.run_dir, resume, warn=self.log.message)
        if info is not None:
            self.restore(info)
            self.log.message(f"resumed from {info.path} at step {self.state.step}")
        # the run's record changes only now that the restore has succeeded; a fresh start drops the logged
        # steps of an earlier attempt that died before its first checkpoint
        self.log.truncate_after(self.state.step)
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        device_name, peak = device_peak_flops()
        throughput, t_start, steps_run = Throughput(), time.perf_counter(), 0
        pending: _PendingStep | None = None  # the previous step, not read yet (docs/performance.md, "Host syncs")
        while self.state.step < cfg.train.steps:
            throughput.start()
            current = self._queue_step()
            if pending is not None:  # read one step late, after this step was queued behind it
                record, pending = self._settle(pending), None
                diverged = self.divergence.observe(record["step"], record["loss"], skipped=bool(record["skipped"]))
                if diverged is not None:
                    self._stop_diverged(diverged)
            step = self.state.step
            stop = self.stop.poll(env.device)  # the flags of the previous step, agreed by now
            every = cfg.logging.every, cfg.checkpoint.every, cfg.eval.every or cfg.train.steps + 1
            if not (current.guarded or stop or step == cfg.train.steps or any(step % n == 0 for n in every)):
                throughput.stop(self.tokens_per_step)
                steps_run += 1
                pending = current
                continue
            record = self._settle(current)  # a step the host waits on anyway: logging, checkpoint, eval, stop
            throughput.stop(self.tokens_per_step)
            steps_run += 1
            if step % cfg.logging.every == 0 or step == cfg.train.steps:
                self._log_step(record, throughput, device_name, peak, time.perf_counter() - t_start, steps_run)
            diverged = self.divergence.observe(step, record["loss"], skipped=bool(record["skipped"]))
            if diverged is None and self.guard.wants_rollback:
                diverged = self.divergence.rolled_back(step)
                if diverged is None:
                    self._rollback()
                    continue
            if diverged is not None:
                self._stop_diverged(diverged)
            if stop:
                self.save()
                self.log.message(f"stopped by signal {self.stop.signal} at step {step}: checkpoint written, "
                                 f"exit {EXIT_REQUEUE} (requeue)")
                self.log.close()
                return EXIT_REQUEUE
            if step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                if self.divergence.suspect:  # do not let a good checkpoint be pruned for one that may be lost
                    self.log.message(f"step {step}: loss above {self.divergence.threshold:.3f} since step "
                                     f"{self.divergence.since}: checkpoint deferred")
                else:
                    self.save()
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                self.evaluate()
        self.stop.wait()  # the last step's flag: every rank finishes its all-reduce
        if info is None or info.step < cfg.train.steps:
            self.save()
        self.evaluate()
        if cfg.train.compile:
            self._log_compile_stats()
        self.log.close()
        self.log.message(f"done: {cfg.train.steps} steps. Outputs in {self.run_dir}/ (metrics.jsonl, checkpoints/, "
                         f"eval/, config.yaml)")
        return 0

    def _log_compile_stats(self) -> None:
        """`train.compile`: how many graphs dynamo built and how often the layer forward recompiled (a sampled loop
        count must not recompile: the loop stays in Python around one compiled layer graph), as a metrics record
        and a message."""
        from pretrain.models.compile import compile_stats

        stats = compile_stats()
        self.log.log({"step": self.state.step, "compile/graphs": stats["graphs"],
                      "compile/recompiles": stats["recompiles"]})
        self.log.message(f"compile: {stats['graphs']} graphs, {stats['recompiles']} recompiles")

    def train_step(self) -> dict:
        """One step, read at once: its metrics record (the benchmarks' entry; `fit` reads a step later)."""
        return self._settle(self._queue_step())

    def _queue_step(self) -> _PendingStep:
        """Queue one optimizer step (micro steps, the DP-mean loss and stats, the agreed skip, the update) and
        advance the counters that need no device value; the device values travel to the host behind it.

        With `train.spike_factor` > 0 the loss guard must see the loss before the update: it is read here (a
        host sync), as every step was before. Otherwise a non-finite loss is the engine's skip (every rank's
        local loss is checked on the device and the flag all-reduced), and the guard's moving average is fed
        when the step is settled."""
        from pretrain.batches import model_inputs
        from pretrain.models.depth import curriculum_cap, depth_for_step
        from pretrain.optim import lr_at, set_lr

        cfg, env, engine = self.cfg, self.env, self.engine
        step = self.state.step
        loops, backprop = depth_for_step(cfg.loop, cfg.model.loops, cfg.seed, step)
        loops_max = curriculum_cap(cfg.loop, cfg.model.loops, step)  # None without a depth curriculum
        set_lr(engine.optimizer, step, cfg.train, cfg.model.d_model)
        want_diag = bool(cfg.logging.diagnostics_every) and (step + 1) % cfg.logging.diagnostics_every == 0
        loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)
        diagnostics = None
        stats: dict[str, torch.Tensor] = {}  # the model's extra scalars (LoopedOutput.stats), summed over micro steps
        depths = self._sequence_depths(step) if cfg.loop.per_sequence else None  # [micro steps x dp, micro_batch]
        for micro in range(cfg.train.grad_accum):
            x = model_inputs(self.train_data.next_batch(), env.device)
            kw = dict(loops=loops, backprop_loops=backprop)
            if depths is not None:  # this rank's micro batch: row micro * dp + dp_rank (global_sequence_index)
                kw = dict(depths=torch.from_numpy(depths[micro * env.dp + env.dp_rank]),
                          backprop_loops=cfg.loop.backprop_loops)
            out = engine(x.inputs, x.labels, **kw, diagnostics=want_diag and micro == 0, doc_ids=x.doc_ids)
            engine.backward(out.loss)
            loss_sum += out.loss.detach().float()
            for name, value in out.stats.items():
                stats[name] = stats.get(name, 0) + value.detach().float()
            if micro == 0 and out.diagnostics is not None:
                diagnostics = out.diagnostics
            if micro < cfg.train.grad_accum - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro step
        loss = loss_sum / cfg.train.grad_accum
        dist.all_reduce(loss, group=_dp_group())
        loss = loss / env.dp
        names = sorted(stats)
        packed = torch.zeros(0, dtype=torch.float32, device=env.device)
        if stats:  # one all-reduce for all of them; the same names on every rank (the model's config decides them)
            packed = torch.stack([stats[k] for k in names]) / cfg.train.grad_accum
            dist.all_reduce(packed, group=_dp_group())
            packed = packed / env.dp
        guarded = bool(cfg.train.spike_factor)
        loss_ok = not self.guard.should_skip(loss.item()) if guarded else True
        done = engine.step_deferred(loss_ok)
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        record = {"step": self.state.step, "lr": cfg.train.lr * lr_at(step, cfg.train), "tokens": self.state.tokens,
                  "loops": loops, "backprop_loops": backprop}
        if depths is not None:  # loops: the deepest sequence of the global batch; loops_mean: the mean depth
            k, loops = cfg.loop.backprop_loops, int(depths.max())
            record.update(loops=loops, loops_mean=float(depths.mean()), backprop_loops=min(k, loops) if k else loops)
            self._depths = depths
        if loops_max is not None:
            record["loops_max"] = loops_max
        norm = done.grad_norm
        parts = [loss.reshape(1), packed, done.skipped.reshape(1)]
        if isinstance(norm, torch.Tensor):
            parts.append(norm.reshape(1))
        values = torch.cat([t.to(env.device, torch.float64) for t in parts])  # float64 holds each value exactly
        return _PendingStep(record, _HostCopy(values), names, None if isinstance(norm, torch.Tensor) else norm,
                            diagnostics, guarded)

    def _settle(self, pending: _PendingStep) -> dict:
        """Read a queued step's values (waiting for that step only) and finish its bookkeeping: the skip count,
        the loss guard's moving average (unless it saw the loss already) and the metrics record, with the same
        values and keys as when they were read during the step."""
        values = pending.values.get().tolist()
        n = len(pending.stat_names)
        loss, stats, skipped = values[0], values[1:1 + n], values[1 + n] > 0
        grad_norm = values[2 + n] if pending.grad_norm is None else pending.grad_norm
        if not pending.guarded:
            self.guard.should_skip(loss)  # spike_factor 0: only its moving average and counters move
        self.state.skipped_steps += skipped
        r = pending.record
        record = {"step": r["step"], "loss": loss, "lr": r["lr"], "grad_norm": grad_norm, "tokens": r["tokens"],
                  "loops": r["loops"], "backprop_loops": r["backprop_loops"], "skipped": int(skipped),
                  "skipped_total": self.state.skipped_steps}
        record.update((k, v) for k, v in r.items() if k not in record)
        record.update(zip(pending.stat_names, stats, strict=True))
        if pending.diagnostics is not None:
            record.update({f"diag/{k}": v for k, v in asdict(pending.diagnostics).items()})
        return record

    def _sequence_depths(self, step: int):
        """Per-sequence loop counts of step `step`'s global batch, [grad_accum x dp, micro_batch] (int64): row
        micro * dp + dp_rank is that rank's micro batch (`depth.global_sequence_index`). Every rank computes all
        of them (the same values, no communication) so the logged max / mean and FLOPs are the global batch's."""
        from pretrain.models.depth import sequence_loops

        cfg = self.cfg
        rows, mb = cfg.train.grad_accum * self.env.dp, cfg.train.micro_batch
        return sequence_loops(cfg.loop, cfg.model.loops, cfg.seed, step, 0, rows * mb).reshape(rows, mb)

    def _log_step(self, record: dict, throughput: Throughput, device_name: str, peak: float | None,
                  elapsed: float, steps_run: int) -> None:
        from pretrain.models.flops import flops_per_token, per_sequence_flops

        tok_s = throughput.take()
        if self.cfg.loop.per_sequence:  # model FLOPs from each sequence's depth, hardware from what each batch ran
            model_flops, hardware_flops = per_sequence_flops(
                self.cfg.model, self.cfg.data.seq_len, self._depths, self.cfg.loop.backprop_loops,
                self.cfg.parallel.activation_checkpointing, vocab_size=self.vocab_size)
        else:
            flops = flops_per_token(self.cfg.model, self.cfg.data.seq_len, record["loops"], record["backprop_loops"],
                                    self.cfg.parallel.activation_checkpointing, vocab_size=self.vocab_size,
                                    # the model's rule for which loops feed the loss (the exit gate: every loop)
                                    loss_on="all" if self.cfg.model.exit_gate else self.cfg.loop.loss_on)
            model_flops, hardware_flops = flops.model_flops, flops.hardware_flops
        record["tokens_per_s"] = tok_s
        record["model_flops_per_s"] = tok_s * model_flops
        record["mfu"] = record["model_flops_per_s"] / (peak * self.env.world_size) if peak else None
        record["hfu"] = tok_s * hardware_flops / (peak * self.env.world_size) if peak else None
        record["memory_gb"] = _memory_gb(self.env.device)
        self.log.log(record)
        self.log.progress(record["step"], record, elapsed, steps_run)

    def _stop_diverged(self, reason: str) -> None:
        """End the run: nothing more is saved; the message names the newest checkpoint from before the trouble."""
        first = self.divergence.first_bad_step() or self.divergence.trouble_step or self.state.step
        good = [c for c in ckpt.list_complete(self.run_dir / "checkpoints") if c.step < first]
        where = (f"last good checkpoint: {good[-1].path} (after changing the config, e.g. a lower train.lr, resume "
                 f"from it with --resume {good[-1].path})") if good else "no checkpoint from before it"
        self.stop.wait()
        self.log.close()
        raise DivergedError(f"{self.run_dir}: the run diverged: {reason}; {where}")

    def _rollback(self) -> None:
        found = ckpt.find_resume(self.run_dir, "auto", warn=self.log.message)
        if found is None:
            self.log.message("loss spikes in a row but no checkpoint to roll back to: continuing")
            self.guard.reset()
            return
        self.restore(found, rollback=True)
        self.guard.reset()
        self.log.message(f"rolled back to {found.path} after repeated loss spikes; the offending batches are "
                         f"skipped")

    def evaluate(self) -> dict[int, float]:
        """Loss vs loops on the eval stream: eval/<step>.json, and `eval/loss@<loops>` in metrics.jsonl and wandb."""
        result = evaluate_model(self.engine.module, self.cfg, self.env, self.eval_data, self.run_dir,
                                self.state.step, self.log.message)
        self.log.log({"step": self.state.step, **{f"eval/loss@{k}": v for k, v in result.items()}})
        return result


def eval_data(cfg: RunConfig, env: DistEnv, tokenizer_sha256: str):
    """A fresh eval stream from its start (this DP rank's share), so every eval sees the same sequences."""
    from data_pipeline.loader import PackedDataset

    dirs, split = (cfg.data.eval, "train") if cfg.data.eval else (cfg.data.train or [cfg.data.out], "eval")
    return PackedDataset(dirs, cfg.data.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=env.dp_rank,
                         dp_size=env.dp, seed=cfg.seed, split=split,
                         eval_fraction=0.0 if cfg.data.eval else cfg.data.eval_fraction,
                         tokenizer_sha256=tokenizer_sha256, document_masking=cfg.data.document_masking)


def evaluate_model(module: torch.nn.Module, cfg: RunConfig, env: DistEnv, make_data, run_dir: Path, step: int,
                   message) -> dict[int, float]:
    """Loss vs loop count of `module` on the eval stream (averaged over DP ranks); rank 0 writes eval/."""
    from pretrain.evaluate import loss_vs_loops, write_eval

    loops = cfg.eval.loops or sorted({1, cfg.model.loops, 2 * cfg.model.loops})
    started = time.perf_counter()

    def progress(i: int, n: int, loss: float) -> None:
        if env.is_main and len(loops) > 1:
            message(f"eval step {step}: loops={n} loss {loss:.4f} ({i}/{len(loops)}, "
                    f"{time.perf_counter() - started:.1f} s)")

    result = loss_vs_loops(module, make_data, loops, cfg.eval.batches, env.device, _dp_group(), progress)
    if env.is_main:
        path = write_eval(run_dir, step, result)
        table = "  ".join(f"loops={k}: {v:.4f}" for k, v in result.items())
        message(f"eval step {step}: {table}  ({path})")
    return result


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def evaluate_exit(model: torch.nn.Module, cfg: RunConfig, env: DistEnv, make_data, run_dir: Path, step: int,
                  rules: list[tuple[str, float]], loops: list[int], message) -> list[dict]:
    """`loopstack eval --exit-threshold/--exit-epsilon`: per-token adaptive depth at each rule and loop cap (the
    loss and the loops a token used on average) beside the fixed-depth loss at the same caps; rank 0 writes
    eval/exit_step_<n>.json."""
    from pretrain.evaluate import loss_vs_loops, loss_with_exit, write_exit_eval

    fixed = loss_vs_loops(model, make_data, loops, cfg.eval.batches, env.device, _dp_group())
    names = {"threshold": "exit threshold", "epsilon": "exit epsilon"}
    results = []
    for n in loops:
        message(f"eval step {step}: fixed depth {n} loops: loss {fixed[n]:.4f}")

        def progress(kind: str, value: float, row: dict, n: int = n) -> None:
            message(f"eval step {step}: {names[kind]} {value:g} (at most {n} loops): loss {row['loss']:.4f}, "
                    f"mean loops used {row['mean_loops']:.2f} of {n} ({row['mean_loops'] / n:.0%} of the "
                    f"fixed-depth loop compute)")

        results += loss_with_exit(model, make_data, n, rules, cfg.eval.batches, env.device, _dp_group(),
                                  progress if env.is_main else None)
    if env.is_main:
        message(f"eval step {step}: adaptive depth -> {write_exit_eval(run_dir, step, results, fixed)}")
    return results


def evaluate_run(cfg: RunConfig, run_dir: Path, checkpoint: str = "auto",
                 exit_rules: list[tuple[str, float]] | None = None, exit_loops: list[int] | None = None) -> int:
    """`loopstack eval`: load a run's checkpoint, measure loss vs loops, write eval/ and the plots.

    No DeepSpeed engine, optimizer or wandb: the model is built as the trainer builds it and filled by
    `pretrain.weights.fill_from_checkpoint` (in the run's dtype); nothing of the run but eval/ and plots/ is
    written. Under torchrun each TP rank loads its shards and DP ranks average, as in training. With `exit_rules`
    (`--exit-threshold`, `--exit-epsilon`): adaptive depth at the caps `exit_loops` (default model.loops) instead
    of the loss-vs-loops curve (`evaluate_exit`)."""
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.models import build_model
    from pretrain.plots import plot_run
    from pretrain.weights import fill_from_checkpoint

    prepare_data(cfg)
    env = init_distributed(tp=cfg.parallel.tp, seed=cfg.seed)
    say = print if env.is_main else (lambda text: None)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer.dir, cfg.tokenizer.kind)
        vocab = model_vocab_size(cfg, tokenizer)
        torch.manual_seed(cfg.seed)  # as the trainer builds it (the h_0 noise seed comes from the checkpoint)
        model = build_model(cfg.model, cfg.loop, vocab, activation_checkpointing=cfg.parallel.activation_checkpointing,
                            device=env.device)
        model.loss_chunk = cfg.train.loss_chunk_tokens
        info = ckpt.find_resume(run_dir, checkpoint, warn=say)  # collective: every rank hashes a share
        if info is None:
            raise UserError(f"{run_dir}: no complete checkpoint to evaluate")
        with user_errors_agreed():  # files only this rank reads may be refused: every rank raises the first
            weights_dtype, model.autocast_dtype = RUN_DTYPES[cfg.train.dtype]  # bf16_autocast: fp32 + autocast
            fill_from_checkpoint(model, info, env.tp_rank, env.tp, to_dict(cfg), tokenizer, cfg.tokenizer.dir,
                                 dtype=weights_dtype)
        make_data = lambda: eval_data(cfg, env, tokenizer.sha256)  # noqa: E731
        if exit_rules:
            evaluate_exit(model, cfg, env, make_data, run_dir, info.step, exit_rules,
                          exit_loops or [cfg.model.loops], say)
            return 0
        evaluate_model(model, cfg, env, make_data, run_dir, info.step, say)
        if env.is_main:
            for path in plot_run(run_dir):
                print(f"plot: {path}")
    finally:
        shutdown()
    return 0

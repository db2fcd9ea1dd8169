"""The training job: `loopstack train CONFIG [--set ...] [--run-dir DIR] [--resume auto|PATH|none]`.

Reads like the recipe; each concern lives in its own module:
data (data_pipeline) -> model (pretrain.models) -> engine (pretrain.engine: DeepSpeed + optimizers)
-> loop of steps (depth sampling, guards) -> metrics / checkpoints / eval.

Exit codes: 0 finished; 75 (EXIT_REQUEUE) stopped by SIGUSR1/SIGTERM after writing a checkpoint;
2 user error. Run directory: config.yaml, metrics.jsonl, checkpoints/<step>/, checkpoints/latest, eval/.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from loopstack.errors import EXIT_REQUEUE, UserError
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
)
from pretrain.elastic import load_full_state, save_full_state
from pretrain.guards import LossGuard
from pretrain.metrics import MetricsLogger, Throughput, device_peak_flops


@dataclass
class TrainState:
    """Counters that must survive a restart (the rest is in DeepSpeed's checkpoint and the loader)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0


class StopRequest:
    """SIGUSR1 / SIGTERM set a flag; the step in progress finishes, then all ranks agree to stop."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.signal is not None else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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
    try:
        return Trainer(cfg, run_dir, env).fit(resume)
    finally:
        shutdown()


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
        self.log = MetricsLogger(run_dir, to_dict(cfg), enabled=env.is_main, total_steps=cfg.train.steps,
                                 console=cfg.logging.console, wandb_mode=cfg.logging.wandb,
                                 wandb_project=cfg.logging.wandb_project, run_name=cfg.name)

    # --- setup -------------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        from data_pipeline.loader import PackedDataset
        from data_pipeline.tokenizer import load_tokenizer

        cfg, env = self.cfg, self.env
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        dist.barrier()
        self.tokenizer = load_tokenizer(cfg.tokenizer.dir)
        self.train_dirs = cfg.data.train or [cfg.data.out]
        self.train_data = PackedDataset(
            self.train_dirs, cfg.data.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=env.dp_rank,
            dp_size=env.dp, seed=cfg.seed, weights=cfg.data.weights or None, split="train",
            eval_fraction=0.0 if cfg.data.eval else cfg.data.eval_fraction,
            tokenizer_sha256=self.tokenizer.sha256, document_masking=cfg.data.document_masking)

    def eval_data(self):
        """A fresh eval stream from its start, so every eval sees the same sequences."""
        from data_pipeline.loader import PackedDataset

        cfg = self.cfg
        dirs, split = (cfg.data.eval, "train") if cfg.data.eval else (self.train_dirs, "eval")
        return PackedDataset(dirs, cfg.data.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=self.env.dp_rank,
                             dp_size=self.env.dp, seed=cfg.seed, split=split,
                             eval_fraction=0.0 if cfg.data.eval else cfg.data.eval_fraction,
                             tokenizer_sha256=self.tokenizer.sha256, document_masking=cfg.data.document_masking)

    def _setup_model(self) -> None:
        from pretrain.engine import build_engine
        from pretrain.models import build_model, param_roles

        cfg = self.cfg
        self.vocab_size = cfg.model.vocab_size or self.tokenizer.vocab_size
        if self.vocab_size < self.tokenizer.vocab_size:
            raise UserError(f"model.vocab_size = {self.vocab_size} is smaller than the tokenizer's "
                            f"{self.tokenizer.vocab_size} ({cfg.tokenizer.dir})")
        torch.manual_seed(cfg.seed)  # identical init on every rank (megatron splits the master weights)
        model = build_model(cfg.model, cfg.loop, self.vocab_size,
                            activation_checkpointing=cfg.parallel.activation_checkpointing)
        self.engine = build_engine(model, cfg, self.env, param_roles(model))

    # --- resume / checkpoint ------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"config": to_dict(self.cfg), "tokenizer_sha256": self.tokenizer.sha256, "tp": self.env.tp,
                "dp": self.env.dp, "state": asdict(self.state)}

    def save(self) -> Path:
        rank_state = {"loader": self.train_data.state_dict(), "rng": capture_rng_state(),
                      "state": asdict(self.state), "guard": self.guard.state_dict(),
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
        meta = info.meta
        if meta.get("tokenizer_sha256") not in (None, self.tokenizer.sha256):
            raise UserError(f"{info.path}: written with tokenizer {meta['tokenizer_sha256'][:12]}, this run uses "
                            f"{self.tokenizer.sha256[:12]} ({self.cfg.tokenizer.dir})")
        stage, tp, dp = self.cfg.parallel.zero_stage, self.env.tp, self.env.dp
        saved_stage = meta.get("config", {}).get("parallel", {}).get("zero_stage", stage)
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
                raise UserError(f"{info.path}: DeepSpeed could not load this checkpoint "
                                f"({ckpt.describe_error(err)})") from err
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
            self.log.truncate_after(self.state.step)
            self.log.message(f"resumed from {info.path} at step {self.state.step}")
        device_name, peak = device_peak_flops()
        throughput, t_start, steps_run = Throughput(), time.perf_counter(), 0
        while self.state.step < cfg.train.steps:
            throughput.start()
            record = self.train_step()
            throughput.stop(self.tokens_per_step)
            steps_run += 1
            step = self.state.step
            if step % cfg.logging.every == 0 or step == cfg.train.steps:
                self._log_step(record, throughput, device_name, peak, time.perf_counter() - t_start, steps_run)
            if self.guard.wants_rollback:
                self._rollback()
                continue
            if self.stop.agreed(env.device):
                self.save()
                self.log.message(f"stopped by signal {self.stop.signal} at step {step}: checkpoint written, "
                                 f"exit {EXIT_REQUEUE} (requeue)")
                self.log.close()
                return EXIT_REQUEUE
            if step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                self.save()
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                self.evaluate()
        if info is None or info.step < cfg.train.steps:
            self.save()
        self.evaluate()
        self.log.close()
        self.log.message(f"done: {cfg.train.steps} steps. Outputs in {self.run_dir}/ (metrics.jsonl, checkpoints/, "
                         f"eval/, config.yaml)")
        return 0

    def train_step(self) -> dict:
        from pretrain.engine import step_or_skip
        from pretrain.models.depth import depth_for_step
        from pretrain.optim import lr_at, set_lr

        cfg, env, engine = self.cfg, self.env, self.engine
        step = self.state.step
        loops, backprop = depth_for_step(cfg.loop, cfg.model.loops, cfg.seed, step)
        set_lr(engine.optimizer, step, cfg.train)
        want_diag = bool(cfg.logging.diagnostics_every) and (step + 1) % cfg.logging.diagnostics_every == 0
        loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)
        diagnostics = None
        for micro in range(cfg.train.grad_accum):
            batch = self.train_data.next_batch()
            tokens = torch.from_numpy(batch["tokens"]).to(env.device)
            doc_ids = torch.from_numpy(batch["doc_ids"]).to(env.device)[:, :-1] if "doc_ids" in batch else None
            out = engine(tokens[:, :-1], tokens[:, 1:], loops=loops, backprop_loops=backprop,
                         diagnostics=want_diag and micro == 0, doc_ids=doc_ids)
            engine.backward(out.loss)
            loss_sum += out.loss.detach().float()
            if micro == 0 and out.diagnostics is not None:
                diagnostics = out.diagnostics
            if micro < cfg.train.grad_accum - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro step
        loss = loss_sum / cfg.train.grad_accum
        dist.all_reduce(loss, group=_dp_group())
        loss = (loss / env.dp).item()
        skip = self.guard.should_skip(loss)
        stepped, grad_norm = step_or_skip(engine, not skip)
        if not stepped:
            self.state.skipped_steps += 1
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        record = {"step": self.state.step, "loss": loss, "lr": cfg.train.lr * lr_at(step, cfg.train),
                  "grad_norm": grad_norm, "tokens": self.state.tokens, "loops": loops, "backprop_loops": backprop,
                  "skipped": int(not stepped), "skipped_total": self.state.skipped_steps}
        if diagnostics is not None:
            record.update({f"diag/{k}": v for k, v in asdict(diagnostics).items()})
        return record

    def _log_step(self, record: dict, throughput: Throughput, device_name: str, peak: float | None,
                  elapsed: float, steps_run: int) -> None:
        from pretrain.models.flops import flops_per_token

        tok_s = throughput.take()
        loops = record["loops"]
        loss_loops = {"last": 1, "all": loops, "last_third": -(-loops // 3)}[self.cfg.loop.loss_on]
        flops = flops_per_token(self.cfg.model, self.cfg.data.seq_len, loops, record["backprop_loops"],
                                self.cfg.parallel.activation_checkpointing, vocab_size=self.vocab_size,
                                loss_loops=loss_loops)
        record["tokens_per_s"] = tok_s
        record["model_flops_per_s"] = tok_s * flops.model_flops
        record["mfu"] = record["model_flops_per_s"] / (peak * self.env.world_size) if peak else None
        record["hfu"] = tok_s * flops.hardware_flops / (peak * self.env.world_size) if peak else None
        record["memory_gb"] = _memory_gb(self.env.device)
        self.log.log(record)
        self.log.progress(record["step"], record, elapsed, steps_run)

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
        from pretrain.evaluate import loss_vs_loops, write_eval

        loops = self.cfg.eval.loops or sorted({1, self.cfg.model.loops, 2 * self.cfg.model.loops})
        result = loss_vs_loops(self.engine.module, self.eval_data, loops, self.cfg.eval.batches, self.env.device,
                               _dp_group())
        if self.env.is_main:
            path = write_eval(self.run_dir, self.state.step, result)
            table = "  ".join(f"loops={k}: {v:.4f}" for k, v in result.items())
            self.log.message(f"eval step {self.state.step}: {table}  ({path})")
        return result


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux



def evaluate_run(cfg: RunConfig, run_dir: Path, checkpoint: str = "auto") -> int:
    """`loopstack eval`: load a run's checkpoint, measure loss vs loops, write eval/ and the plots."""
    from pretrain.plots import plot_run

    prepare_data(cfg)
    env = init_distributed(tp=cfg.parallel.tp, seed=cfg.seed)
    try:
        trainer = Trainer(cfg, run_dir, env)
        info = ckpt.find_resume(run_dir, checkpoint, warn=trainer.log.message)
        if info is None:
            raise UserError(f"{run_dir}: no complete checkpoint to evaluate")
        trainer.restore(info)
        trainer.evaluate()
        if env.is_main:
            for path in plot_run(run_dir):
                print(f"plot: {path}")
    finally:
        shutdown()
    return 0

"""One checkpoint loader: a trained (or converted) model in one process, without DeepSpeed's engine, an optimizer or
wandb. `loopstack generate`, `export hf`, `harness` and `eval --task` use it.

    loaded = load_run("runs/smoke")                       # the newest complete, intact checkpoint
    loaded = load_run("runs/smoke", step=200, dtype="bf16")
    loaded = load_run("runs/smoke/checkpoints/200")       # one checkpoint directory
    loaded.model(tokens, loops=8).logits                  # LoopedLM at TP=1, eval mode

Any checkpoint loads here, whatever wrote it (`pretrain.weights`): any TP size (TP-split tensors are concatenated
along megatron's partition dim), ZeRO 0-2 (DeepSpeed's module state), ZeRO 1-3 with the whole-tensor state
(`checkpoint.elastic: true`, the default), and the whole-weights checkpoints of `loopstack convert hf`. The model's
config is the checkpoint's own (its COMPLETE record), so a run directory whose config.yaml was edited since still
loads what was trained; the tokenizer must be the one the checkpoint was written with (sha256). The random initial
state of Huginn/Parcae models is restored from the checkpoint, so eval-mode outputs are the trainer's.

Files are verified against the sha256 COMPLETE records before they are read (a damaged newest checkpoint is
skipped with a message; an explicit `step` or checkpoint directory that is damaged is refused in one line).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loopstack.errors import UserError
from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig, config_from_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# train.dtype -> (the parameters' dtype, the forward's autocast dtype or None): bf16_autocast keeps fp32 weights and
# runs the forward and loss under torch.autocast(bfloat16), in training and wherever its checkpoints are loaded
RUN_DTYPES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "bf16_autocast": (torch.float32, torch.bfloat16)}


@dataclass
class Loaded:
    """A model ready for inference and what it came from."""

    model: Any  # pretrain.models.LoopedLM, TP=1, eval mode
    cfg: RunConfig  # the checkpoint's config
    tokenizer: Any  # data_pipeline.tokenizer.Tokenizer (or its Hugging Face twin)
    info: ckpt.CheckpointInfo
    run_dir: Path

    @property
    def step(self) -> int:
        return self.info.step


def model_vocab_size(cfg: RunConfig, tokenizer) -> int:
    """The model's vocabulary: model.vocab_size, else the tokenizer's (never smaller than the tokenizer's)."""
    size = cfg.model.vocab_size or tokenizer.vocab_size
    if size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size = {size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                        f"({cfg.tokenizer.dir})")
    return size


def find_checkpoint(source: str | os.PathLike, step: int | None = None,
                    warn=print) -> tuple[Path, ckpt.CheckpointInfo]:
    """(run directory, checkpoint) for a run directory (its newest intact checkpoint, or `step`'s) or a checkpoint
    directory; a one-line UserError when there is none or it is damaged."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint directory")
    meta = ckpt.read_complete(path)
    if meta is not None:  # one checkpoint directory: <run>/checkpoints/<step>
        info = ckpt.CheckpointInfo(path, int(meta.get("step", -1)), meta)
        if step is not None and step != info.step:
            raise UserError(f"{path}: is the checkpoint of step {info.step}, not --step {step}")
        run_dir = path.parent.parent
    else:
        if not (path / "checkpoints").is_dir():
            raise UserError(f"{path}: not a run directory (no checkpoints/) nor a checkpoint (no {ckpt.COMPLETE})")
        run_dir, found = path, ckpt.list_complete(path / "checkpoints")
        if not found:
            raise UserError(f"{path}: no complete checkpoint in {path / 'checkpoints'}")
        if step is not None:
            chosen = [c for c in found if c.step == step]
            if not chosen:
                raise UserError(f"{path}: no complete checkpoint of step {step} (there are: "
                                f"{', '.join(str(c.step) for c in found)})")
            found = chosen
        for info in reversed(found):
            problem = ckpt.damage(info) or _content_problem(info)
            if problem is None:
                return run_dir, info
            if step is not None:
                break
            warn(f"skipping damaged checkpoint {info.path} ({problem})")
        else:
            raise UserError(f"{path}: every complete checkpoint is damaged")
        raise UserError(f"{info.path}: damaged checkpoint: {problem}")
    problem = ckpt.damage(info) or _content_problem(info)
    if problem is not None:
        raise UserError(f"{info.path}: damaged checkpoint: {problem}")
    return run_dir, info


def _content_problem(info: ckpt.CheckpointInfo) -> str | None:
    """sha256 of the files the model's weights come from (not optimizer state: a one-process load need not hash
    gigabytes it never reads)."""
    digests = info.meta.get("sha256", {})
    for name, digest in sorted(digests.items()):
        if name.endswith(".safetensors") or name.startswith("mp_rank_") or name.startswith("elastic_state_") \
                or name.startswith("trainer_state_rank0"):
            if ckpt.sha256_file(info.path / name) != digest:
                return f"{info.path / name}: content differs from the sha256 {ckpt.COMPLETE} recorded"
    return None


def near_run(path: str, run_dir: Path, present: Callable[[Path], bool] = Path.exists) -> Path | None:
    """A path from a run's config (tokenizer, data): as written (absolute, or relative to the current directory),
    else relative to the run directory or its parent (a run directory moved with its data); the first candidate
    that is `present`, None when none is."""
    d = Path(path)
    for candidate in ([d] if d.is_absolute() else [d, run_dir / d, run_dir.parent / d]):
        if present(candidate):
            return candidate
    return None


def load_tokenizer_for(cfg: RunConfig, run_dir: Path):
    from data_pipeline import tokenizer as tk

    directory = near_run(cfg.tokenizer.dir, run_dir) or Path(cfg.tokenizer.dir)  # missing: the loader says so
    return tk.load_tokenizer(directory, cfg.tokenizer.kind)


def load_run(source: str | os.PathLike, *, step: int | None = None, dtype: str | None = None,
             device: str | torch.device | None = None, warn=print) -> Loaded:
    """The model of a run or checkpoint in this process (TP=1), its config and tokenizer; see the module docstring.
    `dtype`: fp32 | bf16 | bf16_autocast (default: the run's train.dtype; `RUN_DTYPES`: bf16_autocast loads fp32
    weights and sets the model's autocast). Starts a one-process group and megatron's parallel state when none exists
    (the model's layers need them)."""
    from pretrain.models import build_model
    from pretrain.weights import fill_from_checkpoint

    if dtype is not None and dtype not in RUN_DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(RUN_DTYPES)}")
    run_dir, info = find_checkpoint(source, step, warn)
    saved = info.meta.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{info.path / ckpt.COMPLETE}: no config recorded")
    cfg = config_from_dict(saved, str(info.path / ckpt.COMPLETE))
    cfg.parallel.tp = 1
    tokenizer = load_tokenizer_for(cfg, run_dir)
    init_single_process(cfg.seed)
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loop, model_vocab_size(cfg, tokenizer), device=device)
    weights_dtype, model.autocast_dtype = RUN_DTYPES[dtype or cfg.train.dtype]
    fill_from_checkpoint(model, info, 0, 1, saved, tokenizer, cfg.tokenizer.dir, dtype=weights_dtype)
    model.eval()
    return Loaded(model=model, cfg=cfg, tokenizer=tokenizer, info=info, run_dir=run_dir)


def init_single_process(seed: int) -> None:
    """A one-process group and TP=1 parallel state, unless this process has them already."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pretrain.distributed import init_distributed

    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != 1:
            raise UserError("load_run builds a TP=1 model; this process runs with tensor parallelism")
        return
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        init_distributed(tp=1, seed=seed)
        return
    raise UserError("load_run runs in one process (not under torchrun with several ranks)")


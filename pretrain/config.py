"""The run config tree, loaded from YAML with `base:` inheritance and `--set` overrides.

    cfg = load_config("configs/smoke-cpu.yaml", ["model.loops=8", "train.lr=3e-4"])

Sections: data, tokenizer, model, loop, train, parallel, checkpoint, logging, eval, launch. Each is a
typed dataclass; the data and model sections live beside the code that reads them.
No torch import here (the CLI loads configs for `--help`-speed commands).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import DataConfig, TokenizerConfig
from loopstack.errors import ConfigError
from loopstack.fileio import atomic_write
from loopstack.typed_config import build, param, parse_override, set_dotted, to_dict
from pretrain.models.config import LoopConfig, ModelConfig


@dataclass
class TrainConfig:
    steps: int = param(100, min=0, help="optimizer steps")
    init_from: str = param("", help="start from the weights of this run or checkpoint directory (a fresh optimizer, "
                                    "step 0): uptrain a converted model (`loopstack convert hf`) or another run")
    micro_batch: int = param(8, min=1, help="sequences per data-parallel rank per micro step")
    grad_accum: int = param(1, min=1, help="micro steps per optimizer step")
    lr: float = param(3e-4, min=0.0, help="peak learning rate (AdamW params)")
    min_lr_ratio: float = param(0.0, min=0.0, max=1.0, help="final lr as a fraction of peak")
    schedule: Literal["cosine", "wsd", "constant"] = param("cosine", help="lr schedule after warmup")
    warmup_steps: int = param(0, min=0, help="linear warmup steps")
    decay_fraction: float = param(0.2, min=0.0, max=1.0, help="wsd: final fraction of steps decaying")
    optimizer: Literal["adamw", "muon"] = param("adamw", help="muon: Muon on block matrices + AdamW")
    muon_lr: float = param(0.02, min=0.0, help="Muon learning rate")
    muon_momentum: float = param(0.95, min=0.0, max=1.0, help="Muon momentum (Nesterov, EMA form)")
    muon_weight_decay: float = param(0.0, min=0.0, help="decoupled decay on Muon matrices (x muon_lr)")
    muon_distributed: bool = param(True, help="Muon across data-parallel ranks: each matrix is orthogonalised "
                                              "by one DP rank (batched Newton-Schulz) and the results are "
                                              "exchanged; false = every rank orthogonalises every matrix "
                                              "(same update, same optimizer state; pretrain/muon.py)")
    embed_lr: float = param(0.0, min=0.0, help="lr for the embedding (0 = train.lr)")
    head_lr: float = param(0.0, min=0.0, help="lr for an untied head (0 = train.lr)")
    weight_decay: float = param(0.1, min=0.0, help="AdamW decay on matrices")
    beta1: float = param(0.9, min=0.0, max=1.0)
    beta2: float = param(0.95, min=0.0, max=1.0)
    eps: float = param(1e-8, min=0.0)
    grad_clip: float = param(1.0, min=0.0, help="global norm clip; 0 = off")
    dtype: Literal["fp32", "bf16", "bf16_autocast"] = param(
        "fp32", help="fp32; bf16 = bf16 weights with fp32 master weights and optimizer state (DeepSpeed bf16); "
                     "bf16_autocast = fp32 weights, gradients and optimizer state, the forward and loss under "
                     "torch.autocast(bfloat16) (nanochat, the FLT paper's official code; CPU too)")
    adamw_lr_scaling: Literal["none", "nanochat"] = param(
        "none", help="nanochat (nanochat dmodel_lr_scale): the embedding and head lrs x (d_model / 768)^-0.5; "
                     "Muon and the other AdamW groups unscaled")
    muon_ns_dtype: Literal["auto", "fp32", "bf16"] = param(
        "auto", help="dtype of Muon's Newton-Schulz iteration: auto = bf16 on CUDA, fp32 on CPU; bf16 = always "
                     "(nanochat, the FLT paper's official code)")
    compile: bool = param(False, help="torch.compile the core layers once; every loop (any loop count) reuses the "
                                      "graph (pretrain/models/compile.py)")
    loss_chunk_tokens: int = param(0, min=0, help="compute the head and cross-entropy on this many tokens at a time, "
                                                  "recomputing each chunk's logits in backward, so the fp32 logits of "
                                                  "a whole micro batch never exist at once; 0 = all at once")
    spike_factor: float = param(0.0, min=0.0, help="skip a step whose loss > factor x moving average; 0 = off")
    spike_rollback_after: int = param(3, min=1, help="consecutive skipped steps before rolling back")
    max_rollbacks: int = param(3, min=0, help="spike rollbacks without getting past the step that caused the "
                                              "first; one more ends the run as diverged (exit 3); 0 = no limit")
    diverge_patience: int = param(10, min=0, help="steps in a row with loss above train.diverge_loss (or not "
                                                  "finite) that end the run as diverged (exit 3); 0 = off")
    diverge_loss: float = param(0.0, min=0.0, help="loss that counts as diverged; 0 = the uniform-prediction loss "
                                                   "ln(vocab) + 1")


@dataclass
class ParallelConfig:
    tp: int = param(1, min=1, help="tensor-parallel size; data-parallel size = world / tp")
    zero_stage: int = param(0, min=0, max=3, help="DeepSpeed ZeRO stage")
    activation_checkpointing: Literal["none", "loop", "layer"] = param(
        "none", help="recompute per loop iteration or per layer in backward")


@dataclass
class CheckpointConfig:
    every: int = param(100, min=1, help="save every N steps (and at the end)")
    keep_last: int = param(2, min=1, help="keep the newest N checkpoints")
    keep_every: int = param(0, min=0, help="also keep every M-th step; 0 = none")
    elastic: bool = param(True, help="ZeRO 1-3: also save each parameter's whole fp32 master and optimizer "
                                     "state, so the run can resume on another data-parallel size")


@dataclass
class LoggingConfig:
    every: int = param(10, min=1, help="write metrics every N steps")
    diagnostics_every: int = param(50, min=0, help="per-loop norms every N steps; 0 = off")
    wandb: Literal["offline", "online", "disabled"] = param("offline", help="wandb mode")
    wandb_project: str = param("loopstack")
    console: bool = param(True, help="progress bar on rank 0")


@dataclass
class EvalConfig:
    every: int = param(0, min=0, help="eval every N steps; 0 = only at the end")
    loops: list[int] = param([], help="loop counts to evaluate; [] = 1, training depth, 2x it")
    batches: int = param(4, min=1, help="eval batches per loop count")


@dataclass
class LaunchConfig:
    nodes: int = param(1, min=1)
    gpus_per_node: int = param(0, min=0, help="0 = CPU-only processes")
    procs_per_node: int = param(1, min=1, help="processes per node when gpus_per_node = 0")
    cpus_per_node: int = param(0, min=0, help="CPUs to request per node (sbatch --cpus-per-task); 0 = site default")
    time: str = param("01:00:00", help="SLURM time limit HH:MM:SS")
    partition: str = param("")
    account: str = param("")
    signal_grace_s: int = param(120, min=10, help="USR1 this many seconds before the time limit")
    max_restarts: int = param(20, min=0, help="stop requeueing after this many restarts")
    port: int = param(29500, min=1024, max=65535, help="rendezvous port")


@dataclass
class RunConfig:
    name: str = param("run", help="run name: outputs go to runs/<name>/ unless --run-dir is given")
    seed: int = param(1234, min=0)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def check(self) -> None:
        # d_model vs n_heads is ModelConfig.check's; here only what needs two sections
        m, tp = self.model, self.parallel.tp
        for name, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads or m.n_heads)):
            if value % tp:
                raise ConfigError(f"{name} = {value} is not divisible by parallel.tp = {tp}")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file and merge it over its `base:` (relative to the file), recursively."""
    if path in chain:
        raise ConfigError(f"{path}: `base:` cycle through {' -> '.join(map(str, chain + (path,)))}")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:  # an empty file, or only comments: almost always a truncated copy or the wrong path
        raise ConfigError(f"{path}: empty config file (at least `name:` or `base:` is expected)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None) or data.pop("extends", None)
    if base is None:
        return data
    parent = _read_yaml((path.parent / base).resolve() if not os.path.isabs(base) else Path(base), chain + (path,))
    return _deep_merge(parent, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """The resolved config: defaults <- YAML chain <- `--set` overrides, fully checked.

    Overrides are checked one by one against the tree so an error names the flag, not the file.
    """
    origin = str(path) if path else "defaults"
    data = _read_yaml(Path(path)) if path else {}
    build(RunConfig, data, origin)  # file errors name the file
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
        build(RunConfig, data, f"--set {key}")  # override errors name the flag
    cfg = build(RunConfig, data, origin)
    try:  # checks across keys that --set may fill one at a time: on the resolved config only
        cfg.loop.check_depth(cfg.model.loops)
        cfg.loop.check_adaptive(cfg.model)
        cfg.model.check_router(cfg.loop)
        cfg.model.check_positions(cfg.data.seq_len)
        cfg.model.check_init()
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    return cfg


def config_from_dict(data: dict[str, Any], origin: str = "config") -> RunConfig:
    """Rebuild a config saved next to a run (or sent to another process)."""
    return build(RunConfig, data, origin)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two config dicts (to_dict form)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (other tools read it)."""
    atomic_write(path, dump_config(cfg))

"""What a checkpoint costs, and what the layout-independent ("elastic") state adds to it.

Two processes (DP=2, gloo), a ~10M-parameter FLT, AdamW, fp32, for ZeRO-1 and ZeRO-3: the time of
`Trainer.save` and the bytes on disk with `checkpoint.elastic` off and on, then the time to restore on the
same layout (DeepSpeed's own files) and through the whole-tensor path (what a DP/TP/stage change uses).
Run: python -m benchmarks.bench_checkpoint  (writes benchmarks/results/checkpoint.json)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

SAVES = 3
MODEL = ["model.d_model=512", "model.n_heads=8", "model.n_core=2", "data.seq_len=128", "train.micro_batch=4",
         "train.optimizer=adamw"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _measure(zero: int, root: str) -> dict:
    """One rank of one launch: train 2 steps, then time saves (elastic off, then on) and restores."""
    import torch.distributed as dist

    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.distributed import init_distributed
    from pretrain.elastic import load_full_state
    from pretrain.models import count_parameters
    from pretrain.train import Trainer

    out: dict = {}
    env = None
    for elastic in (False, True):
        cfg = load_config("configs/quickstart.yaml", [
            *MODEL, f"parallel.zero_stage={zero}", f"checkpoint.elastic={str(elastic).lower()}",
            "logging.wandb=disabled", "logging.console=false", f"checkpoint.keep_last={SAVES + 1}",
            "train.steps=100"])
        env = env or init_distributed(tp=1, seed=cfg.seed)
        trainer = Trainer(cfg, Path(root) / f"z{zero}-elastic-{elastic}", env)
        for _ in range(2):
            trainer.train_step()
        times = []
        for _ in range(SAVES):
            trainer.state.step += 1  # a new checkpoint directory each time
            dist.barrier()
            t0 = time.perf_counter()
            path = trainer.save()
            times.append(time.perf_counter() - t0)
        key = "elastic" if elastic else "plain"
        out[f"save_s_{key}"] = statistics.median(times)
        out[f"bytes_{key}"] = _dir_bytes(path)
        if elastic:
            info = ckpt.find_resume(trainer.run_dir, "auto", warn=lambda _: None)
            dist.barrier()
            t0 = time.perf_counter()
            trainer.restore(info)
            out["restore_s_same_layout"] = time.perf_counter() - t0
            dist.barrier()
            t0 = time.perf_counter()
            load_full_state(trainer.engine, info.path, env.tp_rank)
            out["restore_s_whole_tensor_path"] = time.perf_counter() - t0
            out["elastic_file_bytes"] = sum(p.stat().st_size for p in info.path.glob("elastic_state_*"))
        out["parameters"] = count_parameters(cfg.model, trainer.vocab_size)
    return out


def main() -> dict:
    os.environ.setdefault("WANDB_MODE", "disabled")
    from benchmarks.common import write_result
    from data_pipeline.prepare import ensure_dataset
    from pretrain.config import load_config
    from tests.dist import run_distributed

    cfg = load_config("configs/quickstart.yaml", MODEL)
    ensure_dataset(cfg.data, cfg.tokenizer)
    results: dict = {"layout": "2 processes (DP=2, TP=1), gloo on CPU, fp32, AdamW, one shared local disk",
                     "model": dict(variant=cfg.model.variant, d_model=512, n_core=2, loops=cfg.model.loops)}
    for zero in (1, 3):
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as root:
            rank0 = run_distributed(_measure, 2, args=(zero, root), timeout=900)[0]
        rank0["elastic_save_overhead"] = rank0["save_s_elastic"] / rank0["save_s_plain"]
        rank0["elastic_bytes_overhead"] = rank0["bytes_elastic"] / rank0["bytes_plain"]
        results[f"zero{zero}"] = rank0
        print(f"ZeRO-{zero}: save {rank0['save_s_plain']:.2f} s -> {rank0['save_s_elastic']:.2f} s with the "
              f"whole-tensor state ({rank0['elastic_save_overhead']:.2f}x), {rank0['bytes_plain'] / 2**20:.0f} -> "
              f"{rank0['bytes_elastic'] / 2**20:.0f} MiB; restore {rank0['restore_s_same_layout']:.2f} s "
              f"(same layout) vs {rank0['restore_s_whole_tensor_path']:.2f} s (re-partitioned)")
    results["note"] = (f"medians of {SAVES} saves after 2 training steps; bytes are one checkpoint directory; "
                       f"the whole-tensor file holds fp32 weights + 2 AdamW moments per parameter")
    write_result("checkpoint", results)
    return results


if __name__ == "__main__":
    main()

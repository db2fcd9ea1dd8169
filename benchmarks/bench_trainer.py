"""Trainer overhead and throughput.

1. The trainer's step (loader, depth sampling, DeepSpeed engine, guards, loss all-reduce) against a bare
   torch loop (same model, same batch, torch AdamW, clip, no DeepSpeed) on one process: target <= 1.05x.
2. Tokens/s and model FLOP/s (MFU on a GPU) for the quickstart model at its training shape.
Run: python -m benchmarks.bench_trainer  (writes benchmarks/results/trainer.json)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

STEPS, WARMUP = 30, 5


def _time_steps(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> dict:
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from benchmarks.common import write_result
    from data_pipeline.prepare import ensure_dataset
    from pretrain.batches import model_inputs
    from pretrain.config import load_config
    from pretrain.distributed import init_distributed, shutdown
    from pretrain.models import build_model
    from pretrain.models.flops import flops_per_token
    from pretrain.train import Trainer

    tmp = tempfile.mkdtemp(prefix="bench-trainer-")
    cfg = load_config("configs/quickstart.yaml", [
        "parallel.zero_stage=0", "logging.wandb=disabled", "logging.console=false",
        f"train.steps={STEPS + WARMUP}", "train.grad_clip=1.0"])
    ensure_dataset(cfg.data, cfg.tokenizer)
    env = init_distributed(tp=1, seed=cfg.seed)
    try:
        trainer = Trainer(cfg, Path(tmp) / "run", env)
        vocab_size = trainer.vocab_size
        trainer_times = _time_steps(trainer.train_step, STEPS, WARMUP)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.loop, trainer.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                weight_decay=cfg.train.weight_decay)
        x = model_inputs(trainer.train_data.next_batch(), env.device)

        def bare_step() -> None:
            out = model(x.inputs, x.labels, loops=cfg.model.loops, doc_ids=x.doc_ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        bare_times = _time_steps(bare_step, STEPS, WARMUP)
    finally:
        shutdown()
    t_trainer, t_bare = statistics.median(trainer_times), statistics.median(bare_times)
    tokens = cfg.train.micro_batch * cfg.train.grad_accum * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len, cfg.model.loops, cfg.loop.backprop_loops,
                            cfg.parallel.activation_checkpointing, vocab_size=vocab_size, loss_on=cfg.loop.loss_on)
    results = {
        "model": {"variant": cfg.model.variant, "loops": cfg.model.loops, "d_model": cfg.model.d_model,
                  "n_core": cfg.model.n_core, "seq_len": cfg.data.seq_len, "micro_batch": cfg.train.micro_batch},
        "trainer_step_s_median": t_trainer, "bare_torch_step_s_median": t_bare,
        "trainer_over_bare": t_trainer / t_bare, "target_trainer_over_bare": 1.05,
        "meets_target": t_trainer / t_bare <= 1.05,
        "tokens_per_s_trainer": tokens / t_trainer, "tokens_per_s_bare": tokens / t_bare,
        "model_flops_per_token": flops.model_flops, "hardware_flops_per_token": flops.hardware_flops,
        "model_flops_per_s_trainer": tokens / t_trainer * flops.model_flops,
        "note": "one process, ZeRO-0, fp32; trainer step includes loader, depth sampling, lr, guard, DP loss "
                "all-reduce and DeepSpeed's step; medians of 30 steps after 5 warmup steps",
    }
    write_result("trainer", results)
    print(f"trainer {t_trainer * 1e3:.1f} ms/step vs bare torch {t_bare * 1e3:.1f} ms/step "
          f"({t_trainer / t_bare:.3f}x), {tokens / t_trainer:,.0f} tok/s")
    return results


if __name__ == "__main__":
    main()

"""`loopstack research stability`: does a looped baseline collapse as the training loop count grows while the Fully
Looped Transformer does not? (loopstack issue 19, part 1; docs/research/stability.md.)

Every (variant, training loop count, seed) is trained from one config with the same data, width, optimizer,
learning rates, token budget and schedule: only `model.variant`, `model.loops` and `seed` differ between runs
(never a per-variant tuning). Per run, besides what the worker records from training (loss, lr, grad norm,
per-loop `diag/*` from metrics.jsonl, the gradient-oscillation statistic), `evaluate` measures the final model:

- held-out loss at each test-time loop count (`test_loops`: 1, L/2, L, 3L/2, 2L for a run trained at L loops), on
  the run's held-out stream (`pretrain.train.eval_data`, the same sequences `loopstack eval` uses): the trainer's own
  final eval (`eval/step_<N>.json`, the run's eval.loops are its test loops), measured here only if that is missing;
- per-loop state norms and relative changes on one fixed held-out batch (the first eval batch) at each of those loop
  counts, from the model's own `forward(..., diagnostics=True)` (`LoopDiagnostics`): what the report plots as the
  final per-loop state norm, and what the tests recompute from the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from pretrain.research.sweep import RunSpec

VARIANTS = ("looped", "lt", "lt_i", "lt_ia", "flt_res", "flt", "recall", "recall_internal", "huginn", "parcae")


def test_loops(loops: int) -> list[int]:
    """Test-time loop counts for a run trained at `loops`: 1 to 2x the trained count (1, L/2, L, 3L/2, 2L)."""
    return sorted({1, max(1, loops // 2), loops, (3 * loops) // 2, 2 * loops})


def make_specs(config: str, overrides: list[str], variants: list[str], loops: list[int], seeds: int,
               base_seed: int) -> list[RunSpec]:
    """One spec per (variant, loops, seed): the shared overrides, then the run's own (which win)."""
    specs = []
    for variant in variants:
        for n in loops:
            for s in range(seeds):
                tl = test_loops(n)
                own = [f"model.variant={variant}", f"model.loops={n}", f"seed={base_seed + s}",
                       f"eval.loops=[{','.join(map(str, tl))}]"]
                specs.append(RunSpec(kind="stability", name=f"{variant}-L{n}-s{s}", config=config,
                                     overrides=[*overrides, *own], variant=variant, loops=n, seed=s, test_loops=tl))
    return specs


def fixed_batch(cfg, tokenizer_sha256: str, device):
    """The first batch of the run's held-out stream as model inputs: the batch the final diagnostics use."""
    from pretrain.batches import model_inputs
    from pretrain.train import eval_data

    return model_inputs(eval_data(cfg, SimpleNamespace(dp_rank=0, dp=1), tokenizer_sha256).next_batch(), device)


def loop_diagnostics(model, batch, loops: int) -> dict:
    """Per-loop state norm and relative change of `model` on `batch` at `loops` loops (eval mode, no gradient)."""
    import torch

    with torch.no_grad():
        out = model(batch.inputs, batch.labels, loops=loops, backprop_loops=0, diagnostics=True,
                    doc_ids=batch.doc_ids)
    return {"state_norm": out.diagnostics.state_norm, "rel_change": out.diagnostics.rel_change}


def trainer_eval(run_dir: Path, step: int, loops: list[int]) -> dict[int, float] | None:
    """The held-out loss the trainer measured at the end of training (`eval/step_<step>.json`: the same
    `loss_vs_loops` on the same eval stream, since every run sets eval.loops to its test-time loops), or None when
    that file is missing or lacks one of `loops`."""
    import json

    try:
        record = json.loads((run_dir / "eval" / f"step_{step}.json").read_text())["loss_vs_loops"]
        return {n: float(record[str(n)]) for n in loops}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate(spec: RunSpec, run_dir: Path) -> dict:
    """Held-out loss and final per-loop diagnostics at each test-time loop count (see the module docstring)."""
    from pretrain.evaluate import loss_vs_loops
    from pretrain.inference import load_run
    from pretrain.train import eval_data

    loaded = load_run(run_dir)
    cfg, model = loaded.cfg, loaded.model
    device = next(model.parameters()).device
    env = SimpleNamespace(dp_rank=0, dp=1)
    losses = trainer_eval(run_dir, loaded.step, spec.test_loops)
    if losses is None:  # the trainer's final eval is missing (or at other loop counts): measure it here
        losses = loss_vs_loops(model, lambda: eval_data(cfg, env, loaded.tokenizer.sha256), spec.test_loops,
                               cfg.eval.batches, device)
    batch = fixed_batch(cfg, loaded.tokenizer.sha256, device)
    final = {str(n): loop_diagnostics(model, batch, n) for n in spec.test_loops}
    held = losses[spec.loops]
    return {"step": loaded.step, "heldout_loss": {str(k): v for k, v in losses.items()},
            "final_loss": held, "final_diagnostics": final,
            "summary": f"held-out {held:.4f} at {spec.loops} loops, train {cfg.train.steps} steps"}


def run_command(args: argparse.Namespace) -> int:
    """`loopstack research stability [CONFIG] ...`: validate, prepare data once, sweep, report."""
    from pretrain.research import common

    variants, loops = common.parse_grid(args, VARIANTS)
    cfg = common.load_base(args)
    specs = make_specs(args.config, args.overrides, variants, loops, args.seeds, cfg.seed)
    return common.sweep_and_report(args, cfg, specs, "stability")

"""Held-out loss as a function of test-time loop count: the curve a looped model is judged by.

`loss_vs_loops` runs the same eval sequences at each loop count (fewer or more than trained), built into model
inputs as training builds them (`pretrain.batches.model_inputs`: document masking included), averages
over data-parallel ranks, and `write_eval` stores `eval/step_<n>.json` plus `eval/latest.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from loopstack.fileio import atomic_write
from pretrain.batches import model_inputs


@torch.no_grad()
def loss_vs_loops(model: torch.nn.Module, make_data: Callable, loops: list[int], batches: int,
                  device: torch.device, dp_group=None,
                  progress: Callable[[int, int, float], None] | None = None) -> dict[int, float]:
    """Mean eval loss at each loop count (the same sequences for each); `progress(i, loops, loss)` after the i-th."""
    was_training = model.training
    model.eval()
    result = {}
    try:
        for n in loops:
            data = make_data()
            total = torch.zeros((), dtype=torch.float64, device=device)
            for _ in range(batches):
                x = model_inputs(data.next_batch(), device)  # as in training: doc_ids mask attention if present
                out = model(x.inputs, x.labels, loops=n, backprop_loops=0, doc_ids=x.doc_ids)
                total += out.loss.double()
            total /= batches
            if dp_group is not None and dist.is_initialized():
                dist.all_reduce(total, group=dp_group)
                total /= dist.get_world_size(dp_group)
            result[n] = total.item()
            if progress is not None:
                progress(len(result), n, result[n])
    finally:
        model.train(was_training)
    return result


def write_eval(run_dir: Path, step: int, result: dict[int, float]) -> Path:
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "loss_vs_loops": {str(k): v for k, v in result.items()}}
    path = out / f"step_{step}.json"
    atomic_write(path, json.dumps(record, indent=1))
    atomic_write(out / "latest.json", json.dumps(record, indent=1))
    return path


def exit_kwargs(rule: tuple[str, float]) -> dict:
    """The model-forward keywords of an exit rule: ("threshold", q) -> the learned gate, ("epsilon", eps) ->
    convergence, both per token."""
    kind, value = rule
    return dict(exit_threshold=value) if kind == "threshold" else dict(exit_epsilon=value, exit_per_token=True)


@torch.no_grad()
def loss_with_exit(model: torch.nn.Module, make_data: Callable, loops: int, rules: list[tuple[str, float]],
                   batches: int, device: torch.device, dp_group=None,
                   progress: Callable[[str, float, dict], None] | None = None) -> list[dict]:
    """Adaptive depth on the eval stream: for each rule ("threshold", q) (the learned exit gate) or ("epsilon", eps)
    (convergence), per token, at most `loops` loops: the mean loss and the mean loops a (labelled) token used.
    The same sequences for every rule; batch means averaged as in `loss_vs_loops`, loops per token over all
    labelled tokens; both averaged over data-parallel ranks."""
    was_training = model.training
    model.eval()
    results = []
    try:
        for kind, value in rules:
            data = make_data()
            total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, loops used sum, token count
            for _ in range(batches):
                x = model_inputs(data.next_batch(), device)
                out = model(x.inputs, x.labels, loops=loops, backprop_loops=0, doc_ids=x.doc_ids,
                            **exit_kwargs((kind, value)))
                labelled = x.labels >= 0
                total += torch.stack([out.loss.double(), out.exit_loops[labelled].double().sum(),
                                      labelled.sum().double()])
            if dp_group is not None and dist.is_initialized():
                dist.all_reduce(total, group=dp_group)
            loss, used, count = total.tolist()
            world = dist.get_world_size(dp_group) if dp_group is not None and dist.is_initialized() else 1
            row = {kind: value, "loops": loops, "loss": loss / (batches * world), "mean_loops": used / max(count, 1)}
            results.append(row)
            if progress is not None:
                progress(kind, value, row)
    finally:
        model.train(was_training)
    return results


def write_exit_eval(run_dir: Path, step: int, results: list[dict], fixed: dict[int, float]) -> Path:
    """eval/exit_step_<n>.json (+ exit_latest.json): the adaptive-depth rows and the fixed-depth losses beside them."""
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "exit": results, "fixed_depth": {str(k): v for k, v in fixed.items()}}
    path = out / f"exit_step_{step}.json"
    atomic_write(path, json.dumps(record, indent=1))
    atomic_write(out / "exit_latest.json", json.dumps(record, indent=1))
    return path

"""`train.compile: true`: the core layers compiled once with `torch.compile`, and that graph reused by every loop.

Compiling is applied from outside the model (torchtitan-style), to the built `LoopedLM` before the DeepSpeed
engine wraps it: `compile_model(model)` replaces the forward of each *core* layer (`Layer.forward`) by
`torch.compile` of it. The loop itself stays a Python loop (`LoopedLM._loops`), so each loop calls the same
compiled layer graph:

- the loop count never enters a graph: compiling `forward(tokens, loops=n)` would specialise on n (one graph per
  loop count, and eager after dynamo's cache limit of 8), so a sampled depth (`loop.sampler: uniform`) would
  recompile on most steps. A layer's inputs are only the state, the rotary tables, the mask and the optional
  FLT query / recall tensors: their shapes are fixed by (micro batch, seq_len, d_model), so one graph serves
  every loop and every step.
- all core layers share one code object (`Layer.forward`) and, with dynamo's inlined nn.Module parameters (the
  default), their parameters are graph inputs: the second core layer reuses the first one's graph.
- per-loop LoRA (`model.loop_lora_rank`): the adapters are handed in as callables bound to the loop index;
  dynamo would specialise on that int (one graph per loop index). With LoRA on, the adapter calls are kept
  outside the compiled region (`torch.compiler.disable`: a graph break around each adapter), so the base
  projections, norms and attention are still compiled once.
- megatron's tensor-parallel autograd functions (copy_to / reduce_from region, the linear's autograd function)
  are traced by dynamo as custom autograd functions; activation checkpointing (loop or layer, non-reentrant)
  wraps the compiled layer from outside, so it recomputes through the same graph.

The embedding, prelude, coda, head and the loss stay eager (they run once per forward; compiling them would
add compile time for little gain on the looped part). With `train.compile: false` (the default) nothing here
runs and the model is exactly the eager one.

Recompilations that do happen are a fixed handful, whatever the loop counts: one per variant of the layer's
inputs (FLT: no `query` in the first loop, a tensor after; grad on in training, off in eval and in loops before
the truncated-backprop window) and, at TP > 1, one when megatron's one-time `warned` flag flips.

`compile_stats()` reads dynamo's counters: the number of graphs compiled and of recompilations (guard failures
of an already-compiled frame), which the trainer logs at the end of a run (`compile: N graphs, M recompiles`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn


def _outside_graph(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An adapter delta run eagerly (a graph break), so its loop index never specialises a compiled graph."""

    @torch.compiler.disable
    def run(x: torch.Tensor) -> torch.Tensor:
        return fn(x)

    return run


def _compiled_layer_forward(compiled: Callable) -> Callable:
    """The layer's forward: the compiled graph, with any per-loop LoRA adapters wrapped to run outside it."""

    def forward(x: torch.Tensor, rope, **kw):
        lora = kw.get("lora")
        if lora is not None:
            kw["lora"] = {name: _outside_graph(fn) for name, fn in lora.items()}
        return compiled(x, rope, **kw)

    return forward


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile each core layer's forward of a `LoopedLM` in place (see the module docstring) and return the model.
    Idempotent: a layer already compiled is left as it is."""
    # megatron-core 0.16 warns (warnings.warn, filtered out in layers.py) on every linear call; a warning call is a
    # graph break (six per layer) unless dynamo is told to drop it from the traced code (a process-wide dynamo
    # setting: warnings.warn inside any compiled code of this process is skipped)
    torch._dynamo.config.ignore_logging_functions.add(warnings.warn)
    for layer in model.core:
        if getattr(layer, "_loopstack_compiled", False):
            continue
        compiled = torch.compile(layer.forward, **compile_kwargs)
        layer.forward = _compiled_layer_forward(compiled)
        layer._loopstack_compiled = True
    return model


def compile_stats() -> dict[str, int]:
    """Graphs dynamo compiled in this process (`unique_graphs`), and recompilations: over every code object dynamo
    was handed (the layer forward, the resume functions after graph breaks, anything else compiled in-process),
    the cache entries beyond the first, each one a compilation of that code under guards the earlier ones failed
    (a new loop count would show up here if it were specialised on). Dynamo's own bookkeeping, read, not changed."""
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"]["unique_graphs"])
    try:  # private dynamo bookkeeping (torch 2.11-2.13): -1 where a torch version lacks it
        from torch._dynamo.convert_frame import input_codes
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return {"graphs": graphs, "recompiles": -1}
    recompiles = 0
    for ref in input_codes.seen:
        code = ref()
        if code is not None:
            recompiles += max(len(_debug_get_cache_entry_list(code)) - 1, 0)
    return {"graphs": graphs, "recompiles": recompiles}

"""Loop count per training step, how many of those loops carry gradient, and which of them feed the loss.

Samplers (`loop.sampler`):
    fixed              T = model.loops
    poisson_lognormal  tau ~ Normal(log(m - 1) - s^2 / 2, s),  T = 1 + Poisson(exp(tau))      (Huginn)
                       E[exp(tau)] = m - 1, so E[T] = m = model.loops; heavy right tail; s = loop.sigma
    uniform            T ~ Uniform{min_loops .. max_loops}; max_loops = 0 means 2 m - min_loops (mean m)
`loop.max_loops` > 0 caps every sampler. One draw per step for the whole batch, or, with `loop.per_sequence`
(Parcae), one draw per sequence of the global batch (`sequence_loops`, indexed by `global_sequence_index`).

Depth curriculum (`loop.curriculum_start` = L_0 > 0, `loop.curriculum_steps` = S): the loop count at 0-based
step s is capped at

    L_max(s) = min(L_target, L_0 + floor((L_target - L_0) * s / S))

(integer arithmetic), which reaches L_target at step S and stays there. L_target is the sampler's upper bound
(`LoopConfig.depth_target`): model.loops for `fixed` (so T = L_max(s)), max_loops or 2 m - min_loops for
`uniform`, max_loops for `poisson_lognormal` (required with a curriculum). Sampled depth is drawn exactly as
without the curriculum, then clamped: T = min(draw, L_max(s)); the draws themselves (and so every depth after
the ramp) are those of the same run without a curriculum. A cap below `min_loops` makes every draw the cap.
`loop.backprop_loops` applies to the clamped count. s counts optimizer steps taken (metrics.jsonl logs step
s as `"step": s + 1`, with `loops_max` = L_max(s)). `LoopConfig.check_depth` refuses, in one line naming the
key: curriculum_steps < 1 with a curriculum, curriculum_steps without curriculum_start, a start above L_target,
poisson_lognormal without max_loops; `curriculum_cap` (so every step's depth) runs it.

Everything here is a pure function of (config, seed, step): a draw uses a numpy generator seeded with
(seed, purpose, step). Every rank computes the same value with no communication, and a resumed run repeats
the same depths and caps.

Loss loops (`loop.loss_on`): `loss_loop_indices` is the one rule, used by the model (which loops get a loss
head) and by the FLOP count (how many heads to count).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pretrain.models.config import LoopConfig

_PURPOSE = 0x100B5  # separates this stream from any other use of (seed, step)
_PURPOSE_SEQ = 0x100B6  # the per-sequence draws


class Depth(NamedTuple):
    total: int  # loops run this step
    backprop: int  # the last `backprop` of them carry gradient


def curriculum_cap(loop_cfg: LoopConfig, mean_loops: int, step: int) -> int | None:
    """L_max(step) of the depth curriculum (see the module docstring), or None when it is off. Raises
    ConfigError when the curriculum does not fit the sampler (no target, or a start above it)."""
    loop_cfg.check_depth(mean_loops)
    start = loop_cfg.curriculum_start
    if not start:
        return None
    target = loop_cfg.depth_target(mean_loops)
    return min(target, start + (target - start) * max(step, 0) // loop_cfg.curriculum_steps)


def sample_loops(loop_cfg: LoopConfig, mean_loops: int, seed: int, step: int) -> int:
    """Loop count for training step `step` (0-based), the curriculum's cap applied."""
    n = _draw(loop_cfg, mean_loops, np.random.default_rng([seed, _PURPOSE, step]))
    cap = curriculum_cap(loop_cfg, mean_loops, step)
    return n if cap is None else min(n, cap)


def global_sequence_index(micro: int, dp_rank: int, dp: int, micro_batch: int) -> int:
    """Global index of the first sequence of micro step `micro` on data-parallel rank `dp_rank`: the step's
    global batch is grad_accum x dp x micro_batch sequences, numbered in the order the loader hands them out
    (micro step, then DP rank, then row), so row i of that micro batch is this + i. TP ranks share a DP rank."""
    return (micro * dp + dp_rank) * micro_batch


def sequence_loops(loop_cfg: LoopConfig, mean_loops: int, seed: int, step: int, first: int, count: int) -> np.ndarray:
    """Per-sequence depth (`loop.per_sequence`): loop counts [count] (int64) of global sequences first ..
    first + count - 1 of step `step`, each drawn by the configured sampler from its own generator seeded with
    (seed, purpose, step, global index) and clamped to the curriculum cap: a pure function of those four, so
    every rank, micro step and resumed run agrees without communication."""
    cap = curriculum_cap(loop_cfg, mean_loops, step)
    out = np.empty(count, dtype=np.int64)
    for j in range(count):
        n = _draw(loop_cfg, mean_loops, np.random.default_rng([seed, _PURPOSE_SEQ, step, first + j]))
        out[j] = n if cap is None else min(n, cap)
    return out


def _draw(loop_cfg: LoopConfig, mean_loops: int, rng: np.random.Generator) -> int:
    """One draw of the sampler (max_loops applied, no curriculum)."""
    if loop_cfg.sampler == "fixed":
        n = mean_loops
    elif loop_cfg.sampler == "poisson_lognormal":
        if mean_loops <= 1:
            n = 1
        else:
            s = loop_cfg.sigma
            tau = rng.normal(math.log(mean_loops - 1) - s * s / 2, s)
            n = 1 + int(rng.poisson(math.exp(tau)))
    elif loop_cfg.sampler == "uniform":
        lo = loop_cfg.min_loops
        hi = loop_cfg.max_loops or 2 * mean_loops - lo
        n = int(rng.integers(lo, max(hi, lo) + 1))
    else:
        raise ValueError(f"unknown loop.sampler {loop_cfg.sampler!r}")
    return max(1, min(n, loop_cfg.max_loops) if loop_cfg.max_loops else n)


def depth_for_step(loop_cfg: LoopConfig, mean_loops: int, seed: int, step: int) -> Depth:
    """(total, backprop) loops for step `step`: backprop = min(total, loop.backprop_loops), or total when 0."""
    total = sample_loops(loop_cfg, mean_loops, seed, step)
    k = loop_cfg.backprop_loops
    return Depth(total, total if k <= 0 else min(k, total))


def loss_loop_indices(loss_on: str, total: int, backprop: int = 0) -> range:
    """The 1-based loops whose output feeds the loss, out of `total`: those `loss_on` chooses (last: the last;
    all: every loop; last_third: the last ceil(total / 3)) that also carry gradient (the last `backprop`; 0 =
    all). Both sets are suffixes, so this is the last min(chosen, backprop) loops, never empty."""
    if loss_on == "last":
        chosen = 1
    elif loss_on == "all":
        chosen = total
    elif loss_on == "last_third":
        chosen = math.ceil(total / 3)
    else:
        raise ValueError(f"loss_on must be last, all or last_third, not {loss_on!r}")
    k = total if backprop <= 0 else min(backprop, total)
    return range(total - min(chosen, k) + 1, total + 1)

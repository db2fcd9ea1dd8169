"""Loop count per training step, and how many of those loops carry gradient.

Samplers (`loop.sampler`):
    fixed              T = model.loops
    poisson_lognormal  tau ~ Normal(log(m - 1) - s^2 / 2, s),  T = 1 + Poisson(exp(tau))      (Huginn)
                       E[exp(tau)] = m - 1, so E[T] = m = model.loops; heavy right tail; s = loop.sigma
    uniform            T ~ Uniform{min_loops .. max_loops}; max_loops = 0 means 2 m - min_loops (mean m)
`loop.max_loops` > 0 caps every sampler. One draw per step for the whole batch.

A draw is a pure function of (seed, step): a numpy generator seeded with (seed, purpose, step). Every rank
computes the same value with no communication, and a resumed run repeats the same depths.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pretrain.models.config import LoopConfig

_PURPOSE = 0x100B5  # separates this stream from any other use of (seed, step)


class Depth(NamedTuple):
    total: int  # loops run this step
    backprop: int  # the last `backprop` of them carry gradient


def sample_loops(loop_cfg: LoopConfig, mean_loops: int, seed: int, step: int) -> int:
    """Loop count for training step `step`."""
    rng = np.random.default_rng([seed, _PURPOSE, step])
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

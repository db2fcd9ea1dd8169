"""Loop-count samplers: pure functions of (seed, step), right mean, bounds respected."""

import statistics

import pytest

from pretrain.models.config import LoopConfig
from pretrain.models.depth import depth_for_step, sample_loops


def test_fixed():
    assert {sample_loops(LoopConfig(), 6, seed=1, step=s) for s in range(20)} == {6}


@pytest.mark.parametrize("sampler", ["poisson_lognormal", "uniform"])
def test_pure_function_of_seed_and_step(sampler):
    cfg = LoopConfig(sampler=sampler)
    a = [sample_loops(cfg, 8, seed=7, step=s) for s in range(200)]
    assert a == [sample_loops(cfg, 8, seed=7, step=s) for s in range(200)]  # repeatable (resume, every rank)
    assert a[::-1] == [sample_loops(cfg, 8, seed=7, step=s) for s in reversed(range(200))]  # no hidden state
    assert a != [sample_loops(cfg, 8, seed=8, step=s) for s in range(200)]  # the seed matters
    assert len(set(a)) > 3


def test_poisson_lognormal_mean_and_tail():
    draws = [sample_loops(LoopConfig(sampler="poisson_lognormal", sigma=0.5), 8, seed=0, step=s) for s in range(4000)]
    assert min(draws) >= 1
    assert statistics.mean(draws) == pytest.approx(8, rel=0.04)
    assert max(draws) >= 20  # heavy right tail (lognormal rate)
    capped = [sample_loops(LoopConfig(sampler="poisson_lognormal", max_loops=12), 8, 0, s) for s in range(500)]
    assert max(capped) == 12


def test_uniform_range_and_mean():
    draws = [sample_loops(LoopConfig(sampler="uniform", min_loops=2), 6, seed=3, step=s) for s in range(3000)]
    assert set(draws) == set(range(2, 11))  # 2 .. 2 x 6 - 2
    assert statistics.mean(draws) == pytest.approx(6, rel=0.04)
    bounded = {sample_loops(LoopConfig(sampler="uniform", min_loops=3, max_loops=5), 6, 3, s) for s in range(300)}
    assert bounded == {3, 4, 5}


def test_depth_for_step_truncates_backprop():
    cfg = LoopConfig(sampler="poisson_lognormal", backprop_loops=4)
    for s in range(100):
        d = depth_for_step(cfg, 8, seed=1, step=s)
        assert d.total == sample_loops(cfg, 8, 1, s) and d.backprop == min(4, d.total)
    assert depth_for_step(LoopConfig(), 5, 0, 0) == (5, 5)  # backprop_loops 0 = all

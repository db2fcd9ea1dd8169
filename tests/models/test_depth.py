"""Loop-count samplers: pure functions of (seed, step), right mean, bounds respected."""

import statistics

import pytest

from pretrain.models.config import LoopConfig
from pretrain.models.depth import curriculum_cap, depth_for_step, sample_loops


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


# --- depth curriculum: L_max(s) = min(target, start + floor((target - start) s / steps)) ---------------------

def test_curriculum_ramps_the_fixed_depth():
    cfg = LoopConfig(curriculum_start=1, curriculum_steps=9)
    loops = [sample_loops(cfg, 4, seed=0, step=s) for s in range(13)]
    assert loops == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4]  # reaches model.loops at step curriculum_steps
    assert loops == [curriculum_cap(cfg, 4, s) for s in range(13)]
    assert [sample_loops(LoopConfig(curriculum_start=2, curriculum_steps=3), 8, 0, s) for s in range(5)] == \
        [2, 4, 6, 8, 8]
    assert curriculum_cap(LoopConfig(), 4, 0) is None  # off by default
    assert [depth_for_step(LoopConfig(curriculum_start=1, curriculum_steps=4, backprop_loops=2), 5, 0, s)
            for s in range(5)] == [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2)]  # truncation applies to the ramped count


@pytest.mark.parametrize("sampler,extra,target", [
    ("uniform", {}, 15),  # 2 x 8 - min_loops
    ("uniform", {"min_loops": 2, "max_loops": 12}, 12),
    ("poisson_lognormal", {"max_loops": 20}, 20),
])
def test_curriculum_clamps_sampled_depth(sampler, extra, target):
    """Every draw is the draw without a curriculum, clamped to the cap; after the ramp nothing changes."""
    plain = LoopConfig(sampler=sampler, **extra)
    cur = LoopConfig(sampler=sampler, curriculum_start=1, curriculum_steps=100, **extra)
    assert plain.depth_target(8) == target
    caps = [curriculum_cap(cur, 8, s) for s in range(300)]
    assert caps[0] == 1 and caps[100:] == [target] * 200 and caps == sorted(caps)
    draws = [sample_loops(cur, 8, seed=5, step=s) for s in range(300)]
    assert draws == [min(sample_loops(plain, 8, 5, s), c) for s, c in enumerate(caps)]
    assert draws[::-1] == [sample_loops(cur, 8, seed=5, step=s) for s in reversed(range(300))]  # pure: resume
    assert any(d < c for d, c in zip(draws, caps, strict=True))  # still sampled below the cap
    assert draws[100:] == [sample_loops(plain, 8, 5, s) for s in range(100, 300)]


@pytest.mark.parametrize("loop,needle", [
    ({"curriculum_start": 2}, "loop.curriculum_steps = 0: the depth curriculum (loop.curriculum_start = 2) needs "
                              "loop.curriculum_steps >= 1"),
    ({"curriculum_steps": 5}, "loop.curriculum_steps = 5 has no effect without loop.curriculum_start"),
    ({"curriculum_start": 2, "curriculum_steps": 5, "sampler": "poisson_lognormal"},
     "loop.curriculum_start needs loop.max_loops with sampler poisson_lognormal"),
    ({"curriculum_start": 7, "curriculum_steps": 5, "sampler": "uniform", "max_loops": 6},
     "loop.curriculum_start = 7 is above the curriculum's target 6 (loop.max_loops:"),
    ({"curriculum_start": 5, "curriculum_steps": 5}, "loop.curriculum_start = 5 is above the curriculum's target 4 "
                                                     "(model.loops:"),
    ({"curriculum_start": 8, "curriculum_steps": 5, "sampler": "uniform", "min_loops": 2},
     "loop.curriculum_start = 8 is above the curriculum's target 6 (2 x model.loops - loop.min_loops:"),
])
def test_curriculum_config_errors_are_one_line(loop, needle):
    """Checked on the resolved config (model.loops = 4 here) when the trainer takes a step's depth."""
    from loopstack.errors import ConfigError

    cfg = LoopConfig(**loop)
    for check in (lambda: cfg.check_depth(4), lambda: curriculum_cap(cfg, 4, 0), lambda: sample_loops(cfg, 4, 0, 0)):
        with pytest.raises(ConfigError) as err:
            check()
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_curriculum_flags_load_in_any_order():
    from loopstack.errors import ConfigError
    from pretrain.config import load_config

    for flags in (["loop.curriculum_start=1", "loop.curriculum_steps=9"],
                  ["loop.curriculum_steps=9", "loop.curriculum_start=1"]):
        cfg = load_config(None, ["model.loops=4", *flags])
        assert (cfg.loop.curriculum_start, cfg.loop.curriculum_steps) == (1, 9)
    with pytest.raises(ConfigError, match="loop.curriculum_start = -1: expected a value >= 0"):
        load_config(None, ["loop.curriculum_start=-1"])


def test_curriculum_valid_edges():
    assert curriculum_cap(LoopConfig(curriculum_start=4, curriculum_steps=1), 4, 0) == 4  # start = target: flat
    cfg = LoopConfig(sampler="uniform", min_loops=3, curriculum_start=1, curriculum_steps=2)
    assert [sample_loops(cfg, 4, 0, s) for s in range(2)] == [1, 3]  # a cap below min_loops: every draw is the cap

"""Checkpoint selection, pruning and the loss guard, without a model (fast)."""

import json

import pytest

from loopstack.errors import UserError
from pretrain.checkpoint import COMPLETE, find_resume, list_complete, prune
from pretrain.guards import LossGuard


def _ckpt(root, step, complete=True):
    d = root / "checkpoints" / str(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / COMPLETE).write_text(json.dumps({"step": step, "world_size": 1}))
    return d


def test_resume_auto_takes_newest_complete_and_ignores_partial(tmp_path):
    assert find_resume(tmp_path, "auto") is None
    _ckpt(tmp_path, 10)
    _ckpt(tmp_path, 20)
    _ckpt(tmp_path, 30, complete=False)  # killed while saving
    (tmp_path / "checkpoints" / ".tmp-40").mkdir()
    bad = _ckpt(tmp_path, 25, complete=False)
    (bad / COMPLETE).write_text("{trunc")  # a COMPLETE cut mid-write does not count either
    info = find_resume(tmp_path, "auto")
    assert info.step == 20 and info.path.name == "20"
    assert find_resume(tmp_path, "none") is None
    assert find_resume(tmp_path, str(tmp_path / "checkpoints" / "10")).step == 10
    with pytest.raises(UserError, match="not a complete checkpoint"):
        find_resume(tmp_path, str(tmp_path / "checkpoints" / "30"))


def test_damaged_checkpoint_is_passed_over_by_auto_and_refused_by_path(tmp_path):
    good, newest = _ckpt(tmp_path, 10), _ckpt(tmp_path, 20)
    for d in (good, newest):
        meta = json.loads((d / COMPLETE).read_text())
        (d / COMPLETE).write_text(json.dumps(dict(meta, files={"mp_rank_00_model_states.pt": 1})))
    assert find_resume(tmp_path, "auto").step == 20
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"")  # truncated after it was completed
    said = []
    assert find_resume(tmp_path, "auto", warn=said.append).step == 10
    assert said == [f"resume: skipping damaged checkpoint {newest} ({newest}/mp_rank_00_model_states.pt: 0 bytes, "
                    f"COMPLETE recorded 1)"]
    with pytest.raises(UserError, match="damaged checkpoint: .*20/mp_rank_00_model_states.pt: 0 bytes"):
        find_resume(tmp_path, str(newest))
    (good / "mp_rank_00_model_states.pt").unlink()
    assert find_resume(tmp_path, "auto", warn=said.append) is None
    assert said[-1].endswith("10/mp_rank_00_model_states.pt: missing)")


def test_prune_keeps_last_n_and_every_mth(tmp_path):
    for s in (100, 200, 300, 400, 500):
        _ckpt(tmp_path, s)
    (tmp_path / "checkpoints" / ".tmp-600").mkdir()
    prune(tmp_path / "checkpoints", keep_last=2, keep_every=200)
    assert [c.step for c in list_complete(tmp_path / "checkpoints")] == [200, 400, 500]
    assert not (tmp_path / "checkpoints" / ".tmp-600").exists()


def test_loss_guard_skips_nan_and_spikes_then_asks_rollback():
    g = LossGuard(spike_factor=2.0, rollback_after=2, warmup=3)
    assert not any(g.should_skip(x) for x in (5.0, 4.9, 4.8, 4.7))
    assert g.should_skip(float("nan")) and g.should_skip(float("inf"))
    assert g.should_skip(50.0) and not g.wants_rollback
    assert g.should_skip(60.0) and g.wants_rollback
    g.reset()
    assert not g.should_skip(4.6) and not g.wants_rollback
    off = LossGuard(spike_factor=0.0, rollback_after=1)
    assert not any(off.should_skip(x) for x in (1.0, 100.0, 1000.0))
    state = g.state_dict()
    h = LossGuard(2.0, 2, warmup=3)
    h.load_state_dict(state)
    assert h.state_dict() == state


def test_divergence_monitor_streaks_skips_and_rollback_limit():
    from pretrain.guards import DivergenceMonitor

    m = DivergenceMonitor(threshold=7.0, patience=3, max_rollbacks=2)
    assert m.observe(1, 6.0) is None and not m.suspect
    assert m.observe(2, float("nan"), skipped=True) is None and not m.suspect  # skipped: weights unchanged
    assert m.observe(3, 8.0) is None and m.suspect and m.first_bad_step() == 2
    reason = m.observe(4, 9.5)
    assert reason is not None and "for 3 steps in a row since step 2" in reason
    m.observe(5, 5.0)
    assert not m.suspect and m.first_bad_step() is None  # a good step ends the streak
    # rollbacks: two are allowed while the run has not got past the trouble; the third is divergence
    assert m.rolled_back(10) is None and m.rolled_back(9) is None
    assert "after 2 rollback(s)" in m.rolled_back(10) and m.trouble_step == 10
    m.observe(11, 5.0)  # past step 10: the rollbacks worked, the count starts over
    assert m.rollbacks == 0 and m.rolled_back(20) is None
    restored = DivergenceMonitor(7.0, 3, 2)
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()
    assert DivergenceMonitor(7.0, 0, 0).observe(1, float("inf")) is None  # patience 0: off

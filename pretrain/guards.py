"""Training guards: skip steps whose loss is non-finite or spikes, and ask for a rollback when spikes persist.

The decision is taken on the data-parallel-averaged loss, which every rank holds, so all ranks agree
without an extra collective. Non-finite gradients are handled by the engine's `step_or_skip`.

When the trainer calls them (docs/performance.md, "Host syncs"): with `train.spike_factor` > 0 the LossGuard
must veto the update, so it sees each loss before its step (a host read per step). With it 0 (the default) it
can only skip non-finite losses, which the engine already skips on the device, and it is fed each loss when the
trainer reads it, one step late at most; the DivergenceMonitor likewise. Both see the same losses in the same
order, and the trainer reads every pending step before a checkpoint, so their saved state is the same.
"""

from __future__ import annotations

import math


class LossGuard:
    """Skip when loss is NaN/inf, or when `spike_factor` > 0 and loss > spike_factor x its moving average.
    After `rollback_after` consecutive spike skips, `wants_rollback` turns true."""

    def __init__(self, spike_factor: float, rollback_after: int, ema_decay: float = 0.95, warmup: int = 10):
        self.spike_factor = spike_factor
        self.rollback_after = rollback_after
        self.ema_decay = ema_decay
        self.warmup = warmup  # steps before the average is trusted
        self.ema: float | None = None
        self.seen = 0
        self.consecutive = 0

    def should_skip(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if self.spike_factor and self.ema is not None and self.seen >= self.warmup \
                and loss > self.spike_factor * self.ema:
            self.consecutive += 1
            return True
        self.consecutive = 0
        self.seen += 1
        self.ema = loss if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * loss
        return False

    @property
    def wants_rollback(self) -> bool:
        return self.consecutive >= self.rollback_after

    def reset(self) -> None:
        self.consecutive = 0

    def state_dict(self) -> dict:
        return {"ema": self.ema, "seen": self.seen, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.seen, self.consecutive = state["ema"], state["seen"], state["consecutive"]


class DivergenceMonitor:
    """Decides that a run has diverged, which no skip or rollback will cure:

    - the loss is above `threshold` (by default the uniform-prediction loss ln(vocab) plus one nat: a model
      predicting worse than knowing nothing) or non-finite for `patience` consecutive steps; or
    - loss spikes kept coming back: more than `max_rollbacks` rollbacks without the run getting past the step
      that triggered the first of them.

    `observe` and `rolled_back` return the reason (one sentence) once the run has diverged, else None. Every
    rank sees the same data-parallel-averaged loss, so every rank decides alike without a collective.
    """

    def __init__(self, threshold: float, patience: int, max_rollbacks: int):
        self.threshold, self.patience, self.max_rollbacks = threshold, patience, max_rollbacks
        self.streak = 0
        self.since: int | None = None  # the step (1-based, as logged) that began the current streak
        self.applied = 0  # steps of the streak whose update was applied (not skipped): the weights moved
        self.rollbacks = 0  # rollbacks since the run last got past the step that triggered one
        self.trouble_step: int | None = None

    @property
    def suspect(self) -> bool:
        """Updates were applied during a streak of diverged-looking steps: a checkpoint now might save weights
        that are already lost (skipped steps left the weights as they were)."""
        return self.applied > 0

    def observe(self, step: int, loss: float, skipped: bool = False) -> str | None:
        if not math.isfinite(loss) or loss > self.threshold:
            self.streak += 1
            self.since = step if self.streak == 1 else self.since
            self.applied += not skipped
        else:
            self.streak, self.since, self.applied = 0, None, 0
        if self.trouble_step is not None and step > self.trouble_step:
            self.rollbacks, self.trouble_step = 0, None  # got past the trouble: the rollbacks worked
        if self.patience and self.streak >= self.patience:
            shown = f"{loss:.3f}" if math.isfinite(loss) else str(loss)
            return (f"loss {shown} at step {step}, above {self.threshold:.3f} (or not finite) for {self.streak} "
                    f"steps in a row since step {self.since}")
        return None

    def rolled_back(self, step: int) -> str | None:
        """Call when spikes ask for a rollback at `step`; a reason when this one is past the limit."""
        self.rollbacks += 1
        self.trouble_step = step if self.trouble_step is None else max(self.trouble_step, step)
        if self.max_rollbacks and self.rollbacks > self.max_rollbacks:
            return (f"loss spikes came back after {self.max_rollbacks} rollback(s) without the run getting past "
                    f"step {self.trouble_step}")
        return None

    def first_bad_step(self) -> int | None:
        """The step whose loss was the first sign (None when none is known)."""
        return self.since

    def state_dict(self) -> dict:
        return {"streak": self.streak, "since": self.since, "applied": self.applied, "rollbacks": self.rollbacks,
                "trouble_step": self.trouble_step}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.since, self.applied = state["streak"], state["since"], state["applied"]
        self.rollbacks, self.trouble_step = state["rollbacks"], state["trouble_step"]

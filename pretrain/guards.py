"""Training guards: skip steps whose loss is non-finite or spikes, and ask for a rollback when spikes persist.

The decision is taken on the data-parallel-averaged loss, which every rank holds, so all ranks agree
without an extra collective. Non-finite gradients are handled by the engine's `step_or_skip`.
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

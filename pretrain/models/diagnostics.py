"""What is observed about the loop (it watches the driver, `LoopedLM._loops`): per-loop health for the logger,
and per-sequence early exit (inference)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoopDiagnostics:
    """Per-loop health of the recurrence, as plain floats for the logger.

    state_norm[t]: mean per-token L2 norm of loop t+1's output before outer normalisation (residual growth).
    rel_change[t]: ||h_{t+2} - h_{t+1}|| / ||h_{t+1}|| over the batch, between consecutive loop states (loops-1).
    grad_norm[t]:  norm of dL/dh_{t+1}, the gradient reaching loop t+1's output; written by backward hooks, so
                   read it after backward; 0.0 for loops run without gradient.
    extra:         injection-specific values (Parcae: max of exp(delta A)).
    """

    loops: int
    state_norm: list[float] = field(default_factory=list)
    rel_change: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


class Recorder:
    """Collects diagnostics during one forward as device tensors; `finish` converts them with one sync."""

    def __init__(self, loops: int):
        self.diag = LoopDiagnostics(loops=loops, grad_norm=[0.0] * loops)
        self._norms: list[torch.Tensor] = []
        self._rels: list[torch.Tensor] = []

    def observe(self, steps):
        """Record every step of the loop driver (`LoopedLM._loops`) as it passes, before any consumer sees it."""
        for step in steps:
            self.record(step.t, step.prev, step.state, step.pre_norm)
            yield step

    def record(self, t: int, h: torch.Tensor | None, h_next: torch.Tensor, pre_norm: torch.Tensor) -> None:
        self._norms.append(pre_norm.detach().float().norm(dim=-1).mean())
        if h is not None and t > 0:
            old = h.detach().float()
            self._rels.append((h_next.detach().float() - old).norm() / old.norm().clamp_min(1e-30))
        if h_next.requires_grad:
            h_next.register_hook(self._grad_hook(t))

    def _grad_hook(self, t: int):
        def hook(grad: torch.Tensor) -> None:
            self.diag.grad_norm[t] = float(grad.detach().float().norm())
        return hook

    def finish(self, extra: dict[str, float]) -> LoopDiagnostics:
        values = torch.stack(self._norms + self._rels).tolist()
        n = len(self._norms)
        self.diag.state_norm, self.diag.rel_change = values[:n], values[n:]
        self.diag.extra.update(extra)
        return self.diag


class ExitRule:
    """What every early-exit rule keeps (inference; the model's exit driver, `LoopedLM._run_with_exit`, calls `step`
    after each loop): `done` ([B] per sequence or [B, T] per token), `loops_run` (after which loop each stopped; the
    loop count for those that ran every loop) and `valid` ([B, T], False = padding, which per token counts as done
    from the start: nothing real attends to it). A rule's `step(t, h, h_next)` returns the state after loop t with
    what has stopped frozen, and marks what stops now (`_stop`)."""

    def __init__(self, shape: tuple[int, ...], loops: int, device: torch.device, valid: torch.Tensor | None,
                 padding_done: bool):
        self.loops_run = torch.full(shape, loops, dtype=torch.long, device=device)
        self.valid = valid
        self.done = torch.zeros(shape, dtype=torch.bool, device=device)
        if padding_done and valid is not None:
            self.done |= ~valid

    def _freeze(self, h: torch.Tensor, h_next: torch.Tensor) -> torch.Tensor:
        """h_next, with the state of what stopped at an earlier loop kept as it was (h)."""
        keep = self.done.view(*self.done.shape, *[1] * (h.dim() - self.done.dim()))
        return torch.where(keep, h, h_next)

    def _stop(self, t: int, newly: torch.Tensor) -> None:
        """Mark what stops after (0-based) loop t."""
        newly = newly & ~self.done
        self.loops_run[newly] = t + 1
        self.done |= newly

    def all_done(self) -> bool:
        return bool(self.done.all())

    def exited(self) -> torch.Tensor:
        """Real tokens (sequences) that have stopped (padding, done from the start, is not among them)."""
        return self.done if self.valid is None else self.done & self.valid


class EarlyExit(ExitRule):
    """Exit once ||h_t - h_{t-1}|| / ||h_{t-1}|| < epsilon, per sequence (the norms over all its positions) or per
    token (`per_token`: the norms over d_model at each position). An exited sequence's (token's) state is frozen:
    later loops leave it unchanged, and `loops_run` ([B], or [B, T] per token) says after which loop it stopped.
    `valid` ([B, T], True = a real token; padding otherwise): padding is left out of the norms, and per token it
    counts as exited from the start (its state stays whatever it is: nothing real attends to it)."""

    def __init__(self, epsilon: float, batch: int, loops: int, device: torch.device, *, per_token: bool = False,
                 length: int = 0, valid: torch.Tensor | None = None):
        super().__init__((batch, length) if per_token else (batch,), loops, device, valid, padding_done=per_token)
        self.epsilon, self.per_token = epsilon, per_token

    def step(self, t: int, h: torch.Tensor | None, h_next: torch.Tensor) -> torch.Tensor:
        if h is None or t == 0:  # the first change is measured between loops 1 and 2
            return h_next
        diff, ref = (h_next - h).float(), h.float()
        if self.valid is not None:
            keep = self.valid[..., None].to(diff.dtype)
            diff, ref = diff * keep, ref * keep
        if self.per_token:
            rel = diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
        else:
            rel = diff.flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)
        h_next = self._freeze(h, h_next)
        self._stop(t, rel < self.epsilon)
        return h_next

"""A learned per-token exit gate (Ouro / LoopLM, "Scaling Latent Reasoning via Looped Language Models", Zhu et al.
2025): easy tokens stop looping early, hard ones think longer. `model.exit_gate: true` builds it.

The gate reads each token's loop state after loop t through the final norm (the representation the head reads),
lambda_t = sigmoid(w . norm(h_t) + b), a Linear(d, 1) with bias, replicated over TP, in fp32. With T loops:

    S_0 = 1,  S_t = prod_{j<=t} (1 - lambda_j)          (the probability of still looping after loop t)
    p(t) = lambda_t S_{t-1}  for t < T,  p(T) = S_{T-1}  (the exit distribution; the last gate is unused)

Stage I (training; `exit_objective`): the expected loss over exit steps minus an entropy bonus, per token,
    L = sum_t p(t) L^(t) - beta H(p),  H = -sum_t p(t) log p(t),  beta = loop.exit_entropy (Ouro: 0.1)
with L^(t) the token's cross-entropy of the head on loop t's state (every loop is supervised); averaged over the
tokens like the language-model loss. Gate and model train together.

Stage II (`loop.exit_gate_only`; `gate_only_objective`): the model is frozen, only the gate trains, towards
"continue" where the loop improved the token's loss:
    I^(t) = max(0, L^(t-1) - L^(t)),  w^(t) = sigmoid(k (I^(t) - gamma))     (Ouro: k = 50, gamma = 0.005)
    L = (1/T) sum_{t=2..T} mean_tokens[ -(w^(t) log(1 - lambda_t) + (1 - w^(t)) log lambda_t) ]
as the paper prints it (Eq. 5-6: the normaliser is 1/T over T-1 terms; lambda_1 gets no Stage-II signal).

Inference (`GateExit`): a token exits after the first loop n whose cumulative exit probability CDF(n) = 1 - S_n
reaches the threshold q (`--exit-threshold`); its state is frozen there. q = 1 runs every loop (the fixed-depth
forward, bit for bit: a saturated sigmoid does not make a token exit); smaller q exits earlier. Exact with a KV cache
in the same way as the convergence rule (`diagnostics.EarlyExit` per token).

The gate's initialisation is not published: ours is weight ~ N(0, init_std), bias 0 (lambda ~ 1/2 at every loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.diagnostics import ExitRule
from pretrain.models.layers import replicated


class ExitGate(nn.Module):
    """lambda = sigmoid(Linear(d, 1)(x)) per token, computed in fp32 (the logit is returned; see module docstring)."""

    def __init__(self, d: int, init_std: float, dtype: torch.dtype):
        super().__init__()
        self.weight = replicated(nn.Parameter(torch.empty(1, d, dtype=dtype)), role="injection")
        self.bias = replicated(nn.Parameter(torch.zeros(1, dtype=dtype)), role="injection")
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exit logit z [B, T] of the normalised states x [B, T, d] (lambda = sigmoid(z))."""
        return F.linear(x.float(), self.weight.float(), self.bias.float())[..., 0]


def exit_distribution(logits: list[torch.Tensor]) -> torch.Tensor:
    """p(t) [T, B, L] from the gate logits of loops 1..T (each [B, L]): lambda_t S_{t-1} for t < T, S_{T-1} at T.
    Computed in log space (log lambda = logsigmoid(z), log(1 - lambda) = logsigmoid(-z)): stable when a gate
    saturates."""
    log_stay = torch.zeros_like(logits[0])  # log S_{t-1}
    out = []
    for z in logits[:-1]:
        out.append(torch.exp(F.logsigmoid(z) + log_stay))
        log_stay = log_stay + F.logsigmoid(-z)
    out.append(torch.exp(log_stay))
    return torch.stack(out)


def exit_objective(ce: list[torch.Tensor], logits: list[torch.Tensor], valid: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage I: mean over valid tokens of sum_t p(t) CE^(t) - beta H(p). `ce`: per-token cross-entropy of each loop
    [B, L]; `logits`: the gate's logits per loop; `valid` [B, L] bool. Returns the loss and its parts (stats)."""
    p = exit_distribution(logits)  # [T, B, L]
    ce_t = torch.stack(ce)
    expected = (p * ce_t).sum(0)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(0)
    w = valid.to(expected.dtype)
    count = w.sum().clamp_min(1)
    mean = lambda x: (x * w).sum() / count  # noqa: E731 - a token average
    steps = torch.arange(1, len(ce) + 1, dtype=p.dtype, device=p.device)[:, None, None]
    stats = {"exit/expected_loss": mean(expected).detach(), "exit/entropy": mean(entropy).detach(),
             "exit/loss_last": mean(ce_t[-1]).detach(), "exit/mean_loops": mean((p * steps).sum(0)).detach()}
    return mean(expected - beta * entropy), stats


def gate_only_objective(ce: list[torch.Tensor], logits: list[torch.Tensor], valid: torch.Tensor, sharpness: float,
                        margin: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage II (model frozen): binary cross-entropy of each loop's gate (t >= 2) against w^(t) = sigmoid(k (I^(t) -
    gamma)), the soft "continue" target from the improvement I^(t) = max(0, CE^(t-1) - CE^(t)) (detached)."""
    w = valid.to(torch.float32)
    count = w.sum().clamp_min(1)
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    cont = []
    for t in range(1, len(ce)):
        improve = (ce[t - 1] - ce[t]).detach().clamp_min(0)
        target = torch.sigmoid(sharpness * (improve - margin))  # probability that looping on pays
        z = logits[t]
        bce = -(target * F.logsigmoid(-z) + (1 - target) * F.logsigmoid(z))
        total = total + (bce * w).sum() / count
        cont.append((target * w).sum() / count)
    loss = total / len(ce)
    stats = {"exit/gate_loss": loss.detach()}
    if cont:
        stats["exit/continue_target"] = torch.stack(cont).mean().detach()
    return loss, stats


class GateExit(ExitRule):
    """Inference: a token exits after the first loop n < T with 1 - S_n >= q (q < 1; q >= 1 never exits early) and
    keeps that state; `loops_run` [B, L] says where each token stopped (T for those that ran every loop). Padding
    (`valid` False) counts as exited from the start. An `ExitRule` like the convergence rule
    (`diagnostics.EarlyExit`), so the model's exit driver serves both."""

    def __init__(self, gate, threshold: float, batch: int, length: int, loops: int, device: torch.device,
                 valid: torch.Tensor | None = None):
        super().__init__((batch, length), loops, device, valid, padding_done=True)
        self.gate, self.threshold, self.loops = gate, threshold, loops
        self.log_stay = torch.zeros((batch, length), dtype=torch.float32, device=device)

    def step(self, t: int, h: torch.Tensor | None, h_next: torch.Tensor) -> torch.Tensor:
        if h is not None:  # tokens that exited earlier keep their state
            h_next = self._freeze(h, h_next)
        if self.threshold >= 1.0 or t + 1 >= self.loops:
            return h_next
        self.log_stay = self.log_stay + F.logsigmoid(-self.gate(h_next))
        self._stop(t, 1 - torch.exp(self.log_stay) >= self.threshold)
        return h_next

"""PNG plots of a run: training loss (with per-loop state norms when logged) and eval loss vs loop count."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.metrics import read_metrics


def plot_run(run_dir: Path) -> list[Path]:
    """Write `plots/loss.png` (loss curve | loss vs loops) under the run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir) if isinstance(r.get("loss"), (int, float))]
    evals = sorted((json.loads(p.read_text()) for p in (run_dir / "eval").glob("step_*.json")),
                   key=lambda r: r["step"])
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if records:
        ax1.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
    ax1.set(xlabel="step", ylabel="train loss", title=f"{run_dir.name}: training loss")
    ax1.grid(alpha=0.3)
    for ev in evals[-3:]:
        pairs = sorted((int(k), v) for k, v in ev["loss_vs_loops"].items())
        ax2.plot([k for k, _ in pairs], [v for _, v in pairs], marker="o", label=f"step {ev['step']}")
    trained = next((r["loops"] for r in reversed(records) if "loops" in r), None)
    if trained:
        ax2.axvline(trained, ls="--", c="grey", lw=1, label=f"trained loops ({trained})")
    ax2.set(xlabel="loops at test time", ylabel="held-out loss", title="loss vs loop count")
    ax2.grid(alpha=0.3)
    if evals:
        ax2.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

"""The report of a research sweep: `OUT/report.md`, `OUT/plots/*.png` and `OUT/plot_data.json`.

Everything plotted is first collected into `plot_data.json` (the exact arrays each plot draws), then drawn from it,
so a test can compare the plotted numbers with values computed directly from a run's model.

Stability plots (side by side, one colour per variant):
- `loss_vs_train_loops.png`: final held-out loss (at the trained loop count) vs training loop count; mean over seeds
  with min-max bars; a diverged run is an x at the top of the axis.
- `state_norm.png`: top row, per variant: the final model's per-loop state norm on a fixed held-out batch, run to 2x
  the trained count (dashed line: the trained count), one line per training loop count; bottom row: the last loop's
  state norm over training (`diag/state_norm` of metrics.jsonl).
- `grad_norm.png`: per variant, the gradient norm over training per training loop count (seed 0), the legend giving
  the oscillation statistic (`worker.grad_oscillation`).
- `test_time_loops.png`: per training loop count, held-out loss vs test-time loops (1 to 2x), one line per variant.

Extrapolation plots: `accuracy_vs_depth.png` (per variant, one line per test-time loop count, trained range
shaded) and `accuracy_vs_loops.png` (per variant, accuracy on the trained and the beyond-trained difficulties vs
loops).

The table gives mean and spread (min-max, and std with 2+ seeds) over seeds; per training loop count, each
variant's difference to the best one is labelled "within seed spread" when it is not larger than the larger of the
two runs' min-max ranges (with one seed there is no spread to compare with: "1 seed").
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from loopstack.fileio import atomic_write, atomic_write_json
from pretrain.metrics import format_duration
from pretrain.research.sweep import RunSpec

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def spread(values: Sequence[float]) -> dict:
    """mean, min, max and std (None with one value) of the finite values; empty dict when there are none."""
    vals = [v for v in values if _finite(v)]
    if not vals:
        return {}
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else None}


def group(specs: Sequence[RunSpec], results: dict[str, dict], key) -> dict:
    """{key(spec): [(spec, result), ...]} in spec order."""
    out: dict = {}
    for spec in specs:
        out.setdefault(key(spec), []).append((spec, results.get(spec.name) or {}))
    return out


def stability_data(specs: Sequence[RunSpec], results: dict[str, dict]) -> dict:
    """The arrays every stability plot draws, per variant and training loop count (strings as JSON keys)."""
    data: dict = {}
    for (variant, loops), runs in group(specs, results, lambda s: (s.variant, s.loops)).items():
        ok = [(s, r) for s, r in runs if r.get("status") == "ok"]
        entry = {
            "status": [r.get("status", "missing") for _, r in runs],
            "final_loss": [r["final_loss"] for _, r in ok],
            "heldout_loss": {},
            "grad_oscillation": [r.get("grad_oscillation") for _, r in runs if r.get("grad_oscillation") is not None],
            "wall_s": [r.get("wall_s") for _, r in runs if r.get("wall_s") is not None],
        }
        for _, r in ok:
            for k, v in r["heldout_loss"].items():
                entry["heldout_loss"].setdefault(k, []).append(v)
        first = next((r for _, r in ok), None)
        if first is not None:  # the per-loop diagnostics plotted: seed 0 (the first ok seed)
            deepest = str(max(int(k) for k in first["final_diagnostics"]))
            entry["final_state_norm"] = first["final_diagnostics"][deepest]["state_norm"]
            entry["final_state_norm_loops"] = int(deepest)
        first_any = next((r for _, r in runs if r.get("train")), None)
        if first_any is not None:
            train = first_any["train"]
            entry["train_step"], entry["grad_norm"] = train["step"], train["grad_norm"]
            entry["diag_step"] = [d["step"] for d in train["diagnostics"]]
            entry["diag_last_state_norm"] = [d["state_norm"][-1] for d in train["diagnostics"]]
        data.setdefault(variant, {})[str(loops)] = entry
    return data


def plot_stability(data: dict, out: Path) -> list[Path]:
    plt = _plt()
    variants = list(data)
    color = {v: COLORS[i % len(COLORS)] for i, v in enumerate(variants)}
    all_loops = sorted({int(k) for v in data.values() for k in v})
    paths = []

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    top = max([x for v in data.values() for e in v.values() for x in e["final_loss"]] or [1.0])
    for v in variants:
        xs, means, lo, hi = [], [], [], []
        for k, e in sorted(data[v].items(), key=lambda kv: int(kv[0])):
            st = spread(e["final_loss"])
            if st:
                xs.append(int(k))
                means.append(st["mean"])
                lo.append(st["mean"] - st["min"])
                hi.append(st["max"] - st["mean"])
            if any(s == "diverged" for s in e["status"]):
                ax.plot([int(k)], [top * 1.02], marker="x", ms=10, c=color[v], ls="none")
        ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, c=color[v], label=v)
    ax.set(xscale="log", xlabel="training loop count", ylabel="final held-out loss (at the trained count)",
           title="held-out loss vs training loops (x = diverged)")
    ax.set_xticks(all_loops, [str(n) for n in all_loops])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "loss_vs_train_loops.png", plt))

    fig, axes = plt.subplots(2, len(variants), figsize=(4 * len(variants), 7), squeeze=False)
    for j, v in enumerate(variants):
        for i, (k, e) in enumerate(sorted(data[v].items(), key=lambda kv: int(kv[0]))):
            c = COLORS[i % len(COLORS)]
            if "final_state_norm" in e:
                norms = e["final_state_norm"]
                axes[0][j].plot(range(1, len(norms) + 1), norms, marker=".", c=c, label=f"trained {k}")
                axes[0][j].axvline(int(k), c=c, ls="--", lw=0.8)
            if e.get("diag_step"):
                axes[1][j].plot(e["diag_step"], e["diag_last_state_norm"], c=c, label=f"trained {k}")
        axes[0][j].set(title=f"{v}: final per-loop state norm", xlabel="loop (to 2x trained)", ylabel="state norm")
        axes[1][j].set(title=f"{v}: last-loop state norm in training", xlabel="step", ylabel="state norm")
        for a in (axes[0][j], axes[1][j]):
            _auto_log(a)
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:  # nothing drawn (too few diagnostics steps): no empty legend
                a.legend(fontsize=7)
    paths.append(_save(fig, out / "state_norm.png", plt))

    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 3.6), squeeze=False)
    for j, v in enumerate(variants):
        for i, (k, e) in enumerate(sorted(data[v].items(), key=lambda kv: int(kv[0]))):
            if e.get("train_step"):
                osc = spread(e["grad_oscillation"])
                label = f"trained {k}" + (f" (osc {osc['mean']:.3f})" if osc else "")
                axes[0][j].plot(e["train_step"], e["grad_norm"], c=COLORS[i % len(COLORS)], lw=0.8, label=label)
        axes[0][j].set(title=f"{v}: gradient norm", xlabel="step", ylabel="grad norm")
        _auto_log(axes[0][j])
        axes[0][j].grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    paths.append(_save(fig, out / "grad_norm.png", plt))

    fig, axes = plt.subplots(1, len(all_loops), figsize=(4 * len(all_loops), 3.6), squeeze=False)
    for j, n in enumerate(all_loops):
        a = axes[0][j]
        for v in variants:
            e = data[v].get(str(n))
            if not e or not e["heldout_loss"]:
                continue
            pairs = sorted((int(k), statistics.fmean(vals)) for k, vals in e["heldout_loss"].items())
            a.plot([p for p, _ in pairs], [q for _, q in pairs], marker="o", c=color[v], label=v)
        a.axvline(n, c="grey", ls="--", lw=0.8)
        a.set(title=f"trained at {n} loops", xlabel="test-time loops", ylabel="held-out loss")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    paths.append(_save(fig, out / "test_time_loops.png", plt))
    return paths


def _auto_log(ax) -> None:
    """A log y axis when the plotted values span more than 10x (a growing norm), else linear (readable ticks)."""
    ys = [float(y) for line in ax.get_lines() if not line.get_label().startswith("_")  # not the axvline markers
          for y in line.get_ydata() if _finite(float(y)) and y > 0]
    if ys and max(ys) > 10 * min(ys):
        ax.set_yscale("log")


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "-"


def stability_table(data: dict) -> list[str]:
    lines = ["| variant | train loops | runs (ok/div/fail) | held-out loss mean | min-max | std | loss at 2x loops "
             "| grad oscillation | vs best at these loops |", "|---|---|---|---|---|---|---|---|---|"]
    best: dict[str, tuple[str, dict]] = {}
    for v, per in data.items():
        for k, e in per.items():
            st = spread(e["final_loss"])
            if st and (k not in best or st["mean"] < best[k][1]["mean"]):
                best[k] = (v, st)
    for v, per in data.items():
        for k, e in sorted(per.items(), key=lambda kv: int(kv[0])):
            st = spread(e["final_loss"])
            counts = "/".join(str(sum(s == x for s in e["status"])) for x in ("ok", "diverged"))
            counts += "/" + str(sum(s not in ("ok", "diverged") for s in e["status"]))
            twice = spread(e["heldout_loss"].get(str(2 * int(k)), []))
            osc = spread(e["grad_oscillation"])
            if not st:
                cmp = "no finished run"
            elif best[k][0] == v:
                cmp = "best"
            else:
                diff = st["mean"] - best[k][1]["mean"]
                ranges = [st["max"] - st["min"], best[k][1]["max"] - best[k][1]["min"]]
                if min(st["n"], best[k][1]["n"]) < 2:
                    cmp = f"+{diff:.4f} (1 seed: spread unknown)"
                elif diff <= max(ranges):
                    cmp = f"+{diff:.4f}, within seed spread"
                else:
                    cmp = f"+{diff:.4f}, beyond seed spread"
            lines.append(f"| {v} | {k} | {counts} | {_fmt(st.get('mean'))} | "
                         f"{_fmt(st.get('min'))}-{_fmt(st.get('max'))} | {_fmt(st.get('std'))} | "
                         f"{_fmt(twice.get('mean'))} | {_fmt(osc.get('mean'), 3)} | {cmp} |")
    return lines


def runs_table(specs: Sequence[RunSpec], results: dict[str, dict]) -> list[str]:
    lines = ["| run | status | wall time | final train loss | reason |", "|---|---|---|---|---|"]
    for spec in specs:
        r = results.get(spec.name) or {}
        wall = format_duration(r["wall_s"]) if _finite(r.get("wall_s")) else "-"
        reason = (r.get("reason") or "").replace("|", "/")
        lines.append(f"| {spec.name} | {r.get('status', 'missing')} | {wall} | {_fmt(r.get('final_train_loss'))} "
                     f"| {reason} |")
    return lines


def header(meta: dict, title: str) -> list[str]:
    m = meta["machine"]
    return [f"# {title}", "", f"Command: `{meta['command']}`", "",
            f"Config: `{meta['config']}`, overrides: `{' '.join(meta['overrides']) or '-'}`", "",
            f"Machine: {m.get('host')} ({m.get('cpu')}, {m.get('cores')} cores, device {m.get('device', '?')}, "
            f"torch {m.get('torch', '?')}); {meta['jobs']} run(s) at a time, {meta['threads']} thread(s) each; "
            f"this invocation took {format_duration(meta['sweep_wall_s'])}, finished {meta['finished']}.", ""]


def write_report(out: Path, specs: Sequence[RunSpec], results: dict[str, dict], meta: dict) -> Path:
    """plot_data.json, the plots and report.md of a sweep (either kind); returns report.md's path."""
    out = Path(out)
    atomic_write_json(out / "sweep.json", meta)
    if meta["kind"] == "stability":
        data = stability_data(specs, results)
        atomic_write_json(out / "plot_data.json", data)
        plots = plot_stability(data, out / "plots")
        lines = header(meta, "Stability sweep") + [
            "Final held-out loss at the trained loop count, over seeds (gradient oscillation: std of the step-to-step "
            "change of log grad norm over the constant-lr phase).", "", *stability_table(data), ""]
    else:
        from pretrain.research.extrapolate import extrapolate_data, extrapolate_table, plot_extrapolate

        data = extrapolate_data(specs, results)
        atomic_write_json(out / "plot_data.json", data)
        plots = plot_extrapolate(data, out / "plots")
        lines = header(meta, f"Extrapolation sweep ({specs[0].extra['task'] if specs else '?'})") + [
            *extrapolate_table(data), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + ["", "## Runs", "",
                                                                                     *runs_table(specs, results), ""]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path


def load(out: Path) -> tuple[dict, dict]:
    """(sweep.json, plot_data.json) of a finished sweep directory."""
    return json.loads((out / "sweep.json").read_text()), json.loads((out / "plot_data.json").read_text())

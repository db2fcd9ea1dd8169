"""`loopstack research extrapolate`: do looped variants answer harder problems than they were trained on when given
more loops? (loopstack issue 19, part 2; docs/research/extrapolation.md.)

The sweep writes one synthetic task once (`data_pipeline.synth.synthesize`: difficulties 1..d for training, d+1..
max_depth held out, under OUT/data/), then trains every (variant[, outer norm], training loops, seed) on it with one
config (only model.variant, model.outer_norm, model.loops and seed differ) and measures the final model's answer
accuracy by difficulty 1..max_depth (default 3d) at test-time loops 1 to 4x the trained count, with
`pretrain.taskeval.accuracy_table` (the same problems, rule and seeds as `loopstack eval RUN --task`).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from loopstack.errors import UserError
from pretrain.research.report import COLORS, _fmt, _plt, _save, spread
from pretrain.research.sweep import RunSpec, parse_list

VARIANTS = ("looped", "lt", "lt_i", "lt_ia", "flt_res", "flt", "recall", "recall_internal", "huginn", "parcae")
PROBLEMS = 200  # problems per difficulty (the same at every loop count)


def test_loops(loops: int) -> list[int]:
    """Test-time loop counts for a run trained at `loops`: 1 to 4x the trained count."""
    return sorted({1, max(1, loops // 2), loops, 2 * loops, 3 * loops, 4 * loops})


def make_specs(config: str, overrides: list[str], variants: list[str], outer: list[str | None], loops: list[int],
               seeds: int, base_seed: int, extra: dict) -> list[RunSpec]:
    specs = []
    for variant in variants:
        for norm in outer:
            label = variant if norm is None else f"{variant}-outer_{norm}"
            for n in loops:
                for s in range(seeds):
                    own = [f"model.variant={variant}", f"model.loops={n}", f"seed={base_seed + s}", "eval.loops=[1]"]
                    if norm is not None:
                        own.append(f"model.outer_norm={'true' if norm == 'on' else 'false'}")
                    specs.append(RunSpec(kind="extrapolate", name=f"{label}-L{n}-s{s}", config=config,
                                         overrides=[*overrides, *own], variant=variant, loops=n, seed=s,
                                         test_loops=test_loops(n), extra={**extra, "label": label}))
    return specs


def evaluate(spec: RunSpec, run_dir: Path) -> dict:
    """Answer accuracy[depth][test loops] of the final model (see the module docstring)."""
    from pretrain.inference import load_run
    from pretrain.taskeval import TaskEvalConfig, accuracy_table, chance, resolve_depths, task_data

    task = spec.extra["task"]
    loaded = load_run(run_dir)
    cfg = loaded.cfg
    settings = TaskEvalConfig(train_depth=spec.extra["train_depth"], max_depth=spec.extra["max_depth"])
    train_depth, depths, size, seed = resolve_depths(task, settings, task_data(cfg, loaded.run_dir, task), run_dir)
    context = [] if cfg.data.document_masking else [loaded.tokenizer.eos_id]
    table = accuracy_table(loaded.model, loaded.tokenizer, task, depths, spec.test_loops, spec.extra["problems"],
                           seed=seed, size=size, context=context)
    trained = [table[d][spec.loops] for d in depths if d <= train_depth]
    beyond = [table[d][spec.loops] for d in depths if d > train_depth]
    best = max(spec.test_loops, key=lambda k: statistics.fmean(table[d][k] for d in depths if d > train_depth))
    return {"step": loaded.step, "task": task, "train_depth": train_depth, "depths": depths, "size": size,
            "problem_seed": seed, "chance": chance(task, size),
            "accuracy": {str(d): {str(k): v for k, v in row.items()} for d, row in table.items()},
            "summary": f"accuracy at {spec.loops} loops: trained depths {statistics.fmean(trained):.3f}, beyond "
                       f"{statistics.fmean(beyond):.3f} (best beyond at {best} loops)"}


def extrapolate_data(specs: Sequence[RunSpec], results: dict[str, dict]) -> dict:
    """Per label (variant[-outer_on|off]) and training loop count: accuracy[depth][test loops] (mean over seeds),
    the per-seed mean accuracy on trained and beyond-trained depths at each test loop count, statuses."""
    data: dict = {}
    for spec in specs:
        entry = data.setdefault(spec.extra["label"], {}).setdefault(str(spec.loops), {
            "status": [], "accuracy": {}, "trained": {}, "beyond": {}, "train_depth": spec.extra["train_depth"]})
        r = results.get(spec.name) or {}
        entry["status"].append(r.get("status", "missing"))
        if r.get("status") != "ok":
            continue
        entry["chance"] = r["chance"]
        for d, row in r["accuracy"].items():
            for k, v in row.items():
                entry["accuracy"].setdefault(d, {}).setdefault(k, []).append(v)
        for k in map(str, spec.test_loops):
            inside = [r["accuracy"][d][k] for d in r["accuracy"] if int(d) <= r["train_depth"]]
            outside = [r["accuracy"][d][k] for d in r["accuracy"] if int(d) > r["train_depth"]]
            entry["trained"].setdefault(k, []).append(statistics.fmean(inside))
            entry["beyond"].setdefault(k, []).append(statistics.fmean(outside))
    for per in data.values():
        for entry in per.values():
            entry["accuracy"] = {d: {k: statistics.fmean(v) for k, v in row.items()}
                                 for d, row in entry["accuracy"].items()}
    return data


def plot_extrapolate(data: dict, out: Path) -> list[Path]:
    plt = _plt()
    panels = [(label, k, e) for label, per in data.items() for k, e in sorted(per.items(), key=lambda x: int(x[0]))]
    cols = min(4, max(len(panels), 1))
    rows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for a in axes.flat[len(panels):]:
        a.set_visible(False)
    for j, (label, k, e) in enumerate(panels):
        a = axes.flat[j]
        depths = sorted(map(int, e["accuracy"]))
        loops = sorted({int(x) for row in e["accuracy"].values() for x in row})
        for i, n in enumerate(loops):
            a.plot(depths, [e["accuracy"][str(d)][str(n)] for d in depths], marker="o", ms=3,
                   c=COLORS[i % len(COLORS)], label=f"{n} loops")
        a.axvspan(0.5, e["train_depth"] + 0.5, color="grey", alpha=0.12, label="trained")
        if "chance" in e:
            a.axhline(e["chance"], c="k", ls=":", lw=0.8)
        a.set(title=f"{label}, trained {k} loops", xlabel="difficulty", ylabel="accuracy", ylim=(-0.02, 1.02))
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    paths = [_save(fig, out / "accuracy_vs_depth.png", plt)]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for i, (label, k, e) in enumerate(panels):
        for a, part in zip(axes[0], ("trained", "beyond"), strict=True):
            pairs = sorted((int(n), statistics.fmean(v)) for n, v in e[part].items())
            a.plot([p for p, _ in pairs], [q for _, q in pairs], marker="o", c=COLORS[i % len(COLORS)],
                   label=f"{label} (trained {k})")
    for a, part in zip(axes[0], ("trained", "beyond"), strict=True):
        a.set(title=f"accuracy on {part} difficulties", xlabel="test-time loops", ylabel="mean accuracy",
              ylim=(-0.02, 1.02))
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    paths.append(_save(fig, out / "accuracy_vs_loops.png", plt))
    return paths


def extrapolate_table(data: dict) -> list[str]:
    lines = ["Mean answer accuracy over the trained difficulties (1..d) and beyond them, at the trained loop count "
             "and at the best test-time loop count; mean and min-max over seeds.", "",
             "| variant | train loops | runs ok | trained, at trained loops | beyond, at trained loops "
             "| beyond, best loops | best loops |", "|---|---|---|---|---|---|---|"]
    for label, per in data.items():
        for k, e in sorted(per.items(), key=lambda x: int(x[0])):
            ok = sum(s == "ok" for s in e["status"])
            if not e["beyond"]:
                lines.append(f"| {label} | {k} | {ok}/{len(e['status'])} | - | - | - | - |")
                continue
            tr, be = spread(e["trained"].get(k, [])), spread(e["beyond"].get(k, []))
            best = max(e["beyond"], key=lambda n: statistics.fmean(e["beyond"][n]))
            bb = spread(e["beyond"][best])

            def cell(st: dict) -> str:
                return f"{_fmt(st.get('mean'), 3)} ({_fmt(st.get('min'), 3)}-{_fmt(st.get('max'), 3)})"

            lines.append(f"| {label} | {k} | {ok}/{len(e['status'])} | {cell(tr)} | {cell(be)} | {cell(bb)} "
                         f"| {best} |")
    return lines


def prepare_task(out: Path, task: str, train_depth: int, max_depth: int, train_docs: int) -> Path:
    """The task's data under OUT/data (made once: a complete earlier one with the same settings is kept)."""
    import json

    from data_pipeline.synth import synthesize

    data = out / "data"
    stamp = data / "research-settings.json"
    settings = {"task": task, "train_depth": train_depth, "max_depth": max_depth, "train_docs": train_docs}
    if stamp.exists() and (data / "train" / "manifest.json").exists() and (data / "eval" / "manifest.json").exists():
        if json.loads(stamp.read_text()) != settings:
            raise UserError(f"{data}: made for {json.loads(stamp.read_text())}, not {settings}: use another --out")
        return data
    synthesize(task, data, train_depth=train_depth, eval_depth=max_depth, train_docs=train_docs,
               eval_docs=PROBLEMS, verbose=True)
    from loopstack.fileio import atomic_write_json

    atomic_write_json(stamp, settings)
    return data


def run_command(args: argparse.Namespace) -> int:
    """`loopstack research extrapolate [CONFIG] --task T ...`: validate, write the task once, sweep, report."""
    from data_pipeline.synth import task_size
    from pretrain.research import common

    variants, loops = common.parse_grid(args, VARIANTS)
    outer: list[str | None] = [None]
    if args.outer_norm:
        outer = list(parse_list(args.outer_norm, "--outer-norm", ("on", "off")))
    if args.train_depth < 1:
        raise UserError(f"--train-depth {args.train_depth}: expected at least 1")
    max_depth = args.max_depth or 3 * args.train_depth
    if max_depth <= args.train_depth:
        raise UserError(f"--max-depth {max_depth}: must exceed --train-depth {args.train_depth}")
    try:
        task_size(args.task, 0, max_depth)
    except UserError as err:
        raise UserError(f"--max-depth {max_depth}: {str(err).split(': ', 1)[-1]}") from None
    out = Path(args.out)
    data = out / "data"
    overrides = [f"tokenizer.dir={data / 'tokenizer'}", f"data.train=[{data / 'train'}]",
                 f"data.eval=[{data / 'eval'}]", "data.sources=[]", *args.overrides]
    args.overrides = overrides
    cfg = common.load_base(args)
    extra = {"task": args.task, "train_depth": args.train_depth, "max_depth": max_depth, "problems": args.problems}
    specs = make_specs(args.config, overrides, variants, outer, loops, args.seeds, cfg.seed, extra)
    common.validate(specs)
    prepare_task(out, args.task, args.train_depth, max_depth, args.train_docs)
    return common.sweep_and_report(args, cfg, specs, "extrapolate")

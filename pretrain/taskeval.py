"""Answer accuracy on a synthetic depth task by difficulty: `loopstack eval RUN --task khop|prefix_sum|parity|chain`.

A looped model trained on `loopstack data synth --task T` (depths 1..train_depth) should answer deeper problems when
given more loops. This eval measures it directly, as the fraction of problems answered correctly, per difficulty
(depth) and per test-time loop count, inside and beyond the trained depth:

- Problems: `data_pipeline.synth.problems` (the generators `data synth` writes with), `n` per depth, seeded by the
  data's synth seed and the eval split, so the depths beyond the trained range are exactly the problems `data
  synth` held out (for depths within it the eval split's draws are not the training documents, though short
  parity problems repeat by necessity). Problem size (khop / chain letters, prefix_sum digits) is the data's.
- Trained depth: read from the run's training data manifests (`data.train`, settings of `data synth`: task, split,
  depths, size, seed), else given with `--set task.train_depth=N` (a run trained on another task or on mixed
  data). Depths evaluated: 1..2 x train_depth by default (`task.max_depth`; prefix_sum at most its `size` digits,
  chain at most `size` - 5).
- Accuracy: the model reads the problem up to and including `=` (preceded by an EOS, as every packed training
  document follows the previous one's EOS; no EOS when the run used document masking, where a document never
  saw it) and its answer is the greedy continuation. A problem counts when the argmax at every answer position
  is the answer token (teacher-forced over the answer, which is greedy exact match; synth answers are one
  character, so this is the argmax at the `=` position). Problems of one depth have one length per task, but
  batches are right-padded anyway: the model is causal, so padding after a position never changes its logits
  (nor does the eval-mode random h_0 of Huginn/Parcae, a function of position only).
- Loops: `--loops` (comma-separated), else the run's `eval.loops`, else 1, trained, 2 x trained.
- Amount: `--batches B` batches of `task.batch_size` (100) problems per depth and loop count (default B = 2: 200
  problems), the same problems at every loop count.

The model comes from `pretrain.inference.load_run` (one process, TP=1, the run's dtype). A run whose tokenizer is
not the synth character tokenizer (sha256) is refused in one line: its ids would not mean the task's characters.
Outputs: a table on stdout (rows = depth, marked trained/beyond; columns = loop counts), printed row by row as it
runs, `<run>/eval/task_<task>_step_<N>.json` ({task, step, loops, depths, accuracy[depth][loops], n, ...}) and
`<run>/plots/task_<task>.png` (accuracy vs depth, one line per loop count, the trained range shaded).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loopstack.errors import ConfigError, UserError
from loopstack.fileio import atomic_write
from loopstack.typed_config import build, param, parse_override, set_dotted

SET_PREFIX = "task."


@dataclass
class TaskEvalConfig:
    """`--set task.<key>=value` settings of `loopstack eval --task` (the run's own config is not changed)."""

    train_depth: int = param(0, min=0, help="deepest trained difficulty (0: from the run's synth data manifests)")
    max_depth: int = param(0, min=0, help="deepest difficulty evaluated (0: 2 x train_depth)")
    batch_size: int = param(100, min=1, help="problems per forward pass (--batches of them per depth)")
    seed: int = param(-1, help="problem seed (-1: the data's synth seed, else 0)")
    size: int = param(0, min=0, help="khop / chain letters, prefix_sum digits (0: the data's, else synth's default)")
    dtype: str = param("", help="fp32 or bf16 (default: the run's train.dtype)")


def parse_task_settings(overrides: Sequence[str]) -> TaskEvalConfig:
    """The `--set` strings of `eval --task`: only `task.*` keys (one-line error for anything else)."""
    data: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith(SET_PREFIX):
            raise ConfigError(f"--set {text}: with --task only task.* settings apply (task.train_depth, "
                              f"task.max_depth, task.batch_size, task.seed, task.size, task.dtype); the model's "
                              f"config is the checkpoint's")
        set_dotted(data, key[len(SET_PREFIX):], value)
    settings = build(TaskEvalConfig, data, "--set", prefix=SET_PREFIX)
    if settings.dtype not in ("", "fp32", "bf16"):
        raise ConfigError(f"--set task.dtype={settings.dtype}: expected fp32 or bf16")
    return settings


def parse_loops(text: str) -> list[int]:
    """`--loops 1,4,8`: the loop counts (`loopstack.commands.parse_loop_list`), ascending, each once."""
    from loopstack.commands import parse_loop_list

    return sorted(set(parse_loop_list(text)))


# --- the measurement ------------------------------------------------------------------------------------------

def encode_problems(tokenizer, pairs: Sequence[tuple[str, str]],
                    context: Sequence[int] = ()) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per (prompt, answer) text pair; `context` ids go before each prompt. The split
    must be a token boundary: encode(prompt + answer) == encode(prompt) + encode(answer) (true for the synth
    character tokenizer), else the answer ids would not be what the model was trained to emit."""
    out = []
    for prompt, answer in pairs:
        p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
        if not a or tokenizer.encode(prompt + answer) != p + a:
            raise UserError(f"tokenizer {getattr(tokenizer, 'path', '')}: {prompt + answer!r} does not split into "
                            f"prompt and answer tokens at '='")
        out.append(([*context, *p], a))
    return out


@torch.no_grad()
def answer_correct(model: torch.nn.Module, problems: Sequence[tuple[list[int], list[int]]], loops: int, *,
                   batch_size: int = 100, pad_id: int = 0, exit_rule: tuple[str, float] | None = None,
                   loops_used: list[float] | None = None) -> torch.Tensor:
    """bool [len(problems)]: the model's greedy answer (argmax at each answer position, teacher-forced over the
    answer) equals the answer, at `loops` loops. Batches are right-padded (causal: no effect on the positions
    read). Runs in eval mode (deterministic; the random h_0 a function of position), the mode restored after.
    `exit_rule` ("threshold", q) or ("epsilon", eps): per-token adaptive depth with at most `loops` loops; the mean
    loops used at each problem's answer positions are appended to `loops_used`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return _answer_correct(model, problems, loops, batch_size, pad_id, device, exit_rule, loops_used)
    finally:
        model.train(was_training)


def _answer_correct(model: torch.nn.Module, problems: Sequence[tuple[list[int], list[int]]], loops: int,
                    batch_size: int, pad_id: int, device: torch.device, exit_rule: tuple[str, float] | None = None,
                    loops_used: list[float] | None = None) -> torch.Tensor:
    from pretrain.evaluate import exit_kwargs

    kw = exit_kwargs(exit_rule) if exit_rule is not None else {}
    result = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        seqs = [p + a[:-1] for p, a in chunk]
        width = max(map(len, seqs))
        tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s)
        out = model(tokens.to(device), loops=loops, **kw)
        pred = out.logits.argmax(dim=-1).cpu()
        used = out.exit_loops.cpu() if out.exit_loops is not None else None
        for i, (p, a) in enumerate(chunk):
            at = torch.arange(len(p) - 1, len(p) - 1 + len(a))
            result.append(bool(torch.equal(pred[i, at], torch.tensor(a))))
            if used is not None and loops_used is not None:
                loops_used.append(float(used[i, at].double().mean()))
    return torch.tensor(result, dtype=torch.bool)


def accuracy_table(model: torch.nn.Module, tokenizer, task: str, depths: Sequence[int], loops: Sequence[int], n: int,
                   *, seed: int, size: int, batch_size: int = 100, context: Sequence[int] = (),
                   on_row: Callable[[int, dict[int, float]], None] | None = None) -> dict[int, dict[int, float]]:
    """accuracy[depth][loops]: the fraction of `n` problems of `task` at that depth answered correctly at that loop
    count (the same problems at every loop count). `on_row(depth, row)` is called as each depth finishes."""
    from data_pipeline.synth import problems

    table: dict[int, dict[int, float]] = {}
    for depth in depths:
        encoded = encode_problems(tokenizer, problems(task, depth, n, seed=seed, size=size), context)
        table[depth] = {k: int(answer_correct(model, encoded, k, batch_size=batch_size,
                                              pad_id=max(tokenizer.pad_id, 0)).sum()) / n for k in loops}
        if on_row is not None:
            on_row(depth, table[depth])
    return table


def exit_table(model: torch.nn.Module, tokenizer, task: str, depths: Sequence[int], loops: int,
               rules: Sequence[tuple[str, float]], n: int, *, seed: int, size: int, batch_size: int = 100,
               context: Sequence[int] = (), on_row: Callable[[int, dict], None] | None = None) -> dict[int, dict]:
    """Adaptive depth by difficulty: table[depth][rule label] = {"accuracy", "loops"} (the mean loops used at the
    answer positions), at most `loops` loops, the same problems for every rule. Under a learned exit gate, deeper
    problems should use more loops."""
    from data_pipeline.synth import problems

    table: dict[int, dict] = {}
    for depth in depths:
        encoded = encode_problems(tokenizer, problems(task, depth, n, seed=seed, size=size), context)
        row = {}
        for rule in rules:
            used: list[float] = []
            correct = answer_correct(model, encoded, loops, batch_size=batch_size, pad_id=max(tokenizer.pad_id, 0),
                                     exit_rule=rule, loops_used=used)
            row[rule_label(rule)] = {"accuracy": int(correct.sum()) / n, "loops": sum(used) / len(used)}
        table[depth] = row
        if on_row is not None:
            on_row(depth, row)
    return table


def rule_label(rule: tuple[str, float]) -> str:
    return f"q={rule[1]:g}" if rule[0] == "threshold" else f"eps={rule[1]:g}"


# --- what the run trained on ----------------------------------------------------------------------------------

@dataclass
class TaskData:
    """What the run's synth data says about a task: trained depths, problem size and seed (None: not recorded)."""

    train_depth: int | None
    size: int | None
    seed: int | None


def _data_dir(path: str, run_dir: Path) -> Path | None:
    """A data directory (one holding manifest.json) of the run's config, found as `inference.near_run` finds it."""
    from pretrain.inference import near_run

    return near_run(path, run_dir, lambda d: (d / "manifest.json").is_file())


def task_data(cfg, run_dir: Path, task: str) -> TaskData:
    """The run's training manifests made by `data synth --task task`: deepest trained depth, size and seed. Data
    that cannot be found or is not synth data is skipped (the caller then needs --set task.train_depth)."""
    from data_pipeline.shards import read_manifest

    depths, sizes, seeds = [], set(), set()
    for path in cfg.data.train or [cfg.data.out]:
        d = _data_dir(path, run_dir)
        if d is None:
            continue
        try:
            settings = read_manifest(d).get("settings", {})
        except UserError:
            continue
        if settings.get("task") != task or settings.get("split") != "train":
            continue
        depths += list(settings.get("depths", []))
        sizes.add(settings.get("size"))
        seeds.add(settings.get("seed"))
    if not depths:
        return TaskData(None, None, None)
    return TaskData(max(depths), sizes.pop() if len(sizes) == 1 else None, seeds.pop() if len(seeds) == 1 else None)


def resolve_depths(task: str, settings: TaskEvalConfig, data: TaskData,
                   run_dir: Path) -> tuple[int, list[int], int, int]:
    """(train_depth, depths, size, seed) from the settings, else the data's record, else defaults."""
    from data_pipeline.synth import task_size

    train_depth = settings.train_depth or data.train_depth
    if not train_depth:
        raise UserError(f"{run_dir}: the run's training data (data.train) holds no `data synth --task {task}` "
                        f"manifest to read the trained depth from: give it with --set task.train_depth=N")
    max_depth = settings.max_depth or 2 * train_depth
    known = settings.size or data.size or 0
    try:  # unknown: what `data synth` would have used for depths up to max_depth
        size = task_size(task, known, 0 if known else max_depth)
    except UserError as err:
        flag = f"task.size={known}" if known else f"task.max_depth={max_depth}"
        raise UserError(f"--set {flag}: {str(err).split(': ', 1)[-1]}") from None
    deepest = {"prefix_sum": size, "chain": size - 5}.get(task)  # the deepest problem of that size
    if deepest is not None and max_depth > deepest:
        if settings.max_depth:
            what = f"{size} digits" if task == "prefix_sum" else f"{size} letters (query chain depth + 5)"
            raise UserError(f"--set task.max_depth={max_depth}: {task} problems have {what} (the data's size): at "
                            f"most {deepest}")
        max_depth = deepest
    seed = settings.seed if settings.seed >= 0 else (data.seed if data.seed is not None else 0)
    return train_depth, list(range(1, max_depth + 1)), size, seed


# --- outputs ----------------------------------------------------------------------------------------------------

def chance(task: str, size: int) -> float:
    """Accuracy of guessing uniformly among the possible answers (chain: among the 3 chains' ends, the score of a
    model that knows an answer ends a chain but does not follow the pointers)."""
    return {"khop": 1 / max(size, 1), "prefix_sum": 0.1, "parity": 0.5, "chain": 1 / 3}[task]


def write_task_eval(run_dir: Path, record: dict) -> Path:
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"task_{record['task']}_step_{record['step']}.json"
    atomic_write(path, json.dumps(record, indent=1))
    return path


def plot_task_eval(run_dir: Path, record: dict) -> Path:
    """`plots/task_<task>.png`: accuracy vs depth, one line per loop count, trained depths shaded, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    depths, acc = record["depths"], record["accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    trained = record["train_depth"]
    ax.axvspan(0.5, trained + 0.5, color="grey", alpha=0.15, label=f"trained depths (1..{trained})")
    for i, k in enumerate(record["loops"]):  # distinct markers: equal accuracies draw on top of each other
        ax.plot(depths, [acc[str(d)][str(k)] for d in depths], marker="os^Dv<>p"[i % 8], alpha=0.8,
                label=f"loops {k}" + (" (trained)" if k == record["trained_loops"] else ""))
    ax.axhline(record["chance"], ls="--", c="grey", lw=1, label="chance")
    ax.set(xlabel="depth (difficulty)", ylabel="answer accuracy", ylim=(-0.02, 1.02),
           title=f"{run_dir.name}: {record['task']} at step {record['step']} ({record['n']} problems per depth)")
    ax.set_xticks(depths)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"task_{record['task']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_exit_eval(run_dir: Path, record: dict) -> Path:
    """`plots/task_<task>_exit.png`: loops used (left) and accuracy (right) vs depth, one line per exit rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    depths, table, trained = record["depths"], record["exit"], record["train_depth"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "loops", "mean loops used (answer token)"), (axes[1], "accuracy", "accuracy")):
        ax.axvspan(0.5, trained + 0.5, color="grey", alpha=0.15, label=f"trained depths (1..{trained})")
        for i, rule in enumerate(record["rules"]):
            ax.plot(depths, [table[str(d)][rule][key] for d in depths], marker="os^Dv<>p"[i % 8], label=rule)
        ax.set(xlabel="depth (difficulty)", ylabel=label)
        ax.set_xticks(depths)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0.9, record["max_loops"] + 0.1)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].axhline(record["chance"], ls="--", c="grey", lw=1, label="chance")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{run_dir.name}: {record['task']} with adaptive depth (at most {record['max_loops']} loops), "
                 f"step {record['step']}")
    fig.tight_layout()
    path = out_dir / f"task_{record['task']}_exit.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_exit_task_eval(loaded, task: str, run_dir: Path, depths: list[int], train_depth: int, cap: int,
                       rules: list[tuple[str, float]], n: int, seed: int, size: int, settings: TaskEvalConfig,
                       context: list[int]) -> int:
    """`eval --task T --exit-threshold Q[,Q...]` (or --exit-epsilon): accuracy and loops used per depth and rule."""
    labels = [rule_label(r) for r in rules]
    width = max(16, *(len(x) + 2 for x in labels))
    print(f"{'depth':>5} {'':7} " + " ".join(f"{x + ' acc/loops':>{width}}" for x in labels), flush=True)

    def on_row(depth: int, row: dict) -> None:
        mark = "trained" if depth <= train_depth else "beyond"
        cells = [f"{row[x]['accuracy']:.3f} / {row[x]['loops']:.2f}" for x in labels]
        print(f"{depth:>5} {mark:7} " + " ".join(f"{c:>{width}}" for c in cells), flush=True)

    table = exit_table(loaded.model, loaded.tokenizer, task, depths, cap, rules, n, seed=seed, size=size,
                       batch_size=settings.batch_size, context=context, on_row=on_row)
    record = {"task": task, "step": loaded.step, "max_loops": cap, "rules": labels, "depths": depths,
              "exit": {str(d): row for d, row in table.items()}, "n": n, "train_depth": train_depth,
              "trained_loops": loaded.cfg.model.loops, "seed": seed, "size": size, "chance": chance(task, size),
              "checkpoint": str(loaded.info.path)}
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"task_{task}_exit_step_{loaded.step}.json"
    atomic_write(path, json.dumps(record, indent=1))
    plot = plot_exit_eval(run_dir, record)
    print(f"eval --task {task}: adaptive depth, mean loops used per depth -> {path}; plot -> {plot}", flush=True)
    return 0


def run_task_eval(args: argparse.Namespace, rules: list[tuple[str, float]] | None = None) -> int:
    """`loopstack eval RUN --task TASK [--checkpoint DIR] [--loops 1,4,8] [--batches B] [--set task.KEY=V]`."""
    from data_pipeline.synth import synth_tokenizer
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.inference import load_run

    task, run_dir = args.task, Path(args.run_dir)
    settings = parse_task_settings(args.overrides)
    loops = parse_loops(args.loops) if args.loops else None
    if args.batches < 0:
        raise UserError(f"--batches {args.batches}: expected a positive number of batches")
    n = (args.batches or 2) * settings.batch_size
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    source = run_dir if args.checkpoint == "auto" else args.checkpoint
    loaded = load_run(source, dtype=settings.dtype or None)
    synth_sha = Tokenizer(synth_tokenizer()).sha256
    if loaded.tokenizer.sha256 != synth_sha:
        raise UserError(f"{loaded.info.path}: trained with tokenizer {loaded.tokenizer.sha256[:12]} "
                        f"({loaded.cfg.tokenizer.dir}), not the synth tasks' character tokenizer {synth_sha[:12]}: "
                        f"--task {task} needs a run trained on `loopstack data synth` data")
    cfg = loaded.cfg
    loops = loops or list(cfg.eval.loops) or sorted({1, cfg.model.loops, 2 * cfg.model.loops})
    train_depth, depths, size, seed = resolve_depths(task, settings, task_data(cfg, loaded.run_dir, task), run_dir)
    context = [] if cfg.data.document_masking else [loaded.tokenizer.eos_id]

    if rules:
        if any(kind == "threshold" for kind, _ in rules):
            from pretrain.models.config import require_exit_gate

            require_exit_gate(cfg.model, run_dir)
        cap = max(parse_loops(args.loops)) if args.loops else cfg.model.loops
        print(f"eval --task {task}: {loaded.info.path} (step {loaded.step}), adaptive depth with at most {cap} loops, "
              f"depths 1..{depths[-1]} (trained 1..{train_depth}), {n} problems per depth", flush=True)
        return run_exit_task_eval(loaded, task, run_dir, depths, train_depth, cap, rules, n, seed, size, settings,
                                  context)

    print(f"eval --task {task}: {loaded.info.path} (step {loaded.step}, trained {cfg.model.loops} loops), depths "
          f"1..{depths[-1]} (trained 1..{train_depth}), {n} problems per depth, seed {seed}"
          + (f", size {size}" if task != "parity" else ""), flush=True)
    width = max(9, *(len(f"loops={k}") for k in loops))
    print(f"{'depth':>5} {'':7} " + " ".join(f"{'loops=' + str(k):>{width}}" for k in loops), flush=True)

    def on_row(depth: int, row: dict[int, float]) -> None:
        mark = "trained" if depth <= train_depth else "beyond"
        print(f"{depth:>5} {mark:7} " + " ".join(f"{row[k]:>{width}.3f}" for k in loops), flush=True)

    table = accuracy_table(loaded.model, loaded.tokenizer, task, depths, loops, n, seed=seed, size=size,
                           batch_size=settings.batch_size, context=context, on_row=on_row)
    record = {"task": task, "step": loaded.step, "loops": loops, "depths": depths,
              "accuracy": {str(d): {str(k): v for k, v in row.items()} for d, row in table.items()}, "n": n,
              "train_depth": train_depth, "trained_loops": cfg.model.loops, "seed": seed, "size": size,
              "chance": chance(task, size), "checkpoint": str(loaded.info.path)}
    path = write_task_eval(run_dir, record)
    plot = plot_task_eval(run_dir, record)
    print(f"eval --task {task}: table -> {path}; plot -> {plot}", flush=True)
    return 0

"""`loopstack harness`: lm-evaluation-harness tasks on a loopstack checkpoint, at several loop counts.

    loopstack harness runs/x --tasks hellaswag,arc_easy --loops 1,4,8 --limit 500
    loopstack harness runs/x --tasks my_task --include-path my_tasks/ --loops 1,2,4

writes `<out>/step_<N>.json` (and `latest.json`): {step, loops: {L: {task: {metric: value}}}, lm_eval_version,
limit, command, ...}, and `<out>/step_<N>.png`, each task's main metric vs loops (`<out>` = `<run>/harness`).

Design.
- The model adapter is an lm-eval `TemplateLM` (an `lm_eval.api.model.LM` that keeps lm-eval's own
  context/continuation encoding: the whole string and the context are encoded, the continuation's tokens are the
  tail of the whole) over one loaded LoopedLM at one loop count. The weights are loaded once (`load_run`); each loop
  count gets its own adapter over the same model. `LoopstackLM` is built on first use (module `__getattr__`), so
  importing this module needs neither lm-eval nor its import time; `run_harness` says "pip install lm-eval" when it
  is missing.
- loglikelihood scores exactly as lm-eval's HFLM: requests sorted by length (longest first) and batched, one forward
  per (context + continuation[:-1]) shared by one-token continuations (lm-eval's Collator), inputs cut from the left
  to the trained window (`data.seq_len`), right-padded. The model is causal and, in eval mode, its random initial
  state (Huginn, Parcae) is a fixed function of position, so right padding leaves every real position's logits
  unchanged; only real positions are read. Log-probabilities are a log_softmax in fp32 over the real vocabulary (the
  model returns the padded vocabulary with padding ids at -inf).
- loglikelihood_rolling: lm-eval's rolling windows of `data.seq_len` tokens (first window after the prefix token,
  each token predicted once, every window with the longest context that fits), scored as above and summed.
- generate_until: loopstack's batched greedy generation (`pretrain.models.generate.generate_batch`: prompts
  left-padded and masked with per-row positions, so each row generates what it would alone; exact KV cache), at most
  `max_gen_toks` tokens, ended by EOS; the text is cut at the first `until` string, as HFLM cuts it. (A batch runs
  on until EOS or `max_gen_toks` even after every row has produced a stop string: generate_batch has no stop hook.)
  Prompts are cut from the left to window - max_gen_toks tokens, as HFLM cuts them.
- Prefix token: EOS. loopstack's shards are EOS-terminated documents without BOS, so EOS is what precedes a
  document in training (and lm-eval's default prefix); an empty context is conditioned on it.
- Tasks: with --include-path, the task index is built from that directory alone when every task is found there
  (lm-eval's 14,000-task default index takes ~15 s to build), else from lm-eval's tasks too. Unknown names are one
  line. lm-eval resolves a task YAML's relative `data_files` against the working directory, so lm-eval runs with the
  --include-path directory as its working directory: a local task's files are named relative to that directory.
  Tasks (and their datasets) are loaded once and evaluated at every loop count.
- The JSON of a step merges runs with the same --limit: a later run with other loop counts or tasks adds to it (a
  run with another --limit replaces it). The environment is left alone (set HF_DATASETS_OFFLINE=1 yourself offline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loopstack.errors import UserError

# the metric each task's plot shows: the first of these the task reports, else its first metric
MAIN_METRICS = ("acc", "acc_norm", "exact_match", "em", "f1", "mcc", "bleu", "bits_per_byte", "word_perplexity",
                "byte_perplexity")
MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that set no max_gen_toks


def _require_lm_eval():
    """lm_eval, or a one-line UserError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UserError("loopstack harness needs lm-evaluation-harness: pip install lm-eval") from None
    return lm_eval


# --- the model adapter --------------------------------------------------------------------------------------------

class _LoopstackScoring:
    """What `LoopstackLM` adds to lm-eval's `TemplateLM`: scoring and generation with a LoopedLM at a fixed loop
    count (see the module docstring). Mixed in front of TemplateLM, so its methods implement TemplateLM's abstract
    ones."""

    backend = "causal"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, loops: int, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = MAX_GEN_TOKS):
        super().__init__()
        if loops < 1 or max_length < 1 or batch_size < 1:
            raise ValueError(f"loops, max_length and batch_size must be >= 1 (got {loops}, {max_length}, "
                             f"{batch_size})")
        model.eval()  # a random initial state is a fixed function of position only in eval mode
        self.model, self.tokenizer = model, tokenizer
        self.loops, self.max_length, self.batch_size, self.max_gen_toks = loops, max_length, batch_size, max_gen_toks
        self.vocab_size = model.vocab_size
        self._device = next(model.parameters()).device
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = pad if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0  # any id: never read
        self._warned_sampling = False

    # --- tokenizer ---------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_id", None)
        if isinstance(eos, int) and eos >= 0:
            return eos
        bos = getattr(self.tokenizer, "bos_id", None)
        if isinstance(bos, int) and bos >= 0:
            return bos
        raise UserError("the run's tokenizer has neither an EOS nor a BOS id to condition an empty context on")

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return f"loopstack-{str(getattr(self.tokenizer, 'sha256', 'tokenizer'))[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # --- scoring -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, V_padded] logits of the final state at this adapter's loop count."""
        return self.model(tokens.to(self._device), loops=self.loops).logits

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy one) per (key, context ids, continuation
        ids), in request order; batched and deduplicated as HFLM does."""
        from lm_eval.models.utils import Collator
        from tqdm import tqdm

        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise UserError(f"a loglikelihood request with an empty {'context' if not ctx else 'continuation'} "
                                f"after tokenization (lm-eval requests need both)")
            if len(cont) > self.max_length:
                raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's window of "
                                f"{self.max_length} tokens (data.seq_len)")

        # longest first (HFLM's order); one forward per context + continuation[:-1] serves every one-token
        # continuation of that context
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"loglikelihood @{self.loops} loops")
        for chunk in order.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            batch = torch.full((len(inputs), max(map(len, inputs))), self.pad_id, dtype=torch.long)
            for i, ids in enumerate(inputs):  # right padding: a causal model's real positions are unaffected
                batch[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logits = self._logits(batch)
            for (key, ctx, cont), ids, row in zip(chunk, inputs, logits, strict=True):
                # positions len(ids) - len(cont) .. len(ids) - 1 predict the continuation's tokens
                real = row[len(ids) - len(cont):len(ids), :self.vocab_size]
                logprobs = F.log_softmax(real.float(), dim=-1)[None]  # [1, len(cont), V]
                for req_key, cont_ids, lp in order.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont,
                                                             logits=logprobs):
                    target = torch.tensor(cont_ids, dtype=torch.long, device=lp.device)
                    lp = lp[0, -len(cont_ids):]
                    answer = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                    results.append(answer)
                    if req_key is not None:
                        self.cache_hook.add_partial("loglikelihood", req_key, answer)
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string in windows of `max_length` tokens (lm-eval's rolling windows: the
        first after the prefix token, each token predicted exactly once)."""
        from lm_eval import utils

        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            pairs = utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                    prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(utils.make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm),
                                   strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first `until` string; batched by generation settings, longest first."""
        from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
        from tqdm import tqdm

        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"generate_until @{self.loops} loops")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            if (kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0) and not self._warned_sampling:
                print("harness: sampling was asked for; loopstack harness generates greedily", flush=True)
                self._warned_sampling = True
            room = self.max_length - max_new
            if room < 1:
                raise UserError(f"a generation task asks for max_gen_toks = {max_new}, which leaves no room for its "
                                f"prompt in the model's window of {self.max_length} tokens (data.seq_len)")
            prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
            texts = self._greedy(prompts, max_new, until)
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts, strict=True):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        """Greedy text after each prompt (`pretrain.models.generate.generate_batch`: left-padded and masked, exact
        KV cache; a row stops at EOS or once its text holds a stop string), cut at its first stop string."""
        from pretrain.models.generate import generate_batch

        def stopped(row: int, ids: list[int]) -> bool:
            return bool(until) and any(s in self.tok_decode(ids) for s in until)

        result = generate_batch(self.model, prompts, max_new, loops=self.loops, temperature=0.0,
                                eos_id=self.eot_token_id, pad_id=self.pad_id, stop=stopped)
        texts = []
        for ids in result.tokens:
            text = self.tok_decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`LoopstackLM`: the adapter class, built on first use (it subclasses lm-eval's TemplateLM)."""
    if name != "LoopstackLM":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        _require_lm_eval()
        from lm_eval.api.model import TemplateLM

        cls = type("LoopstackLM", (_LoopstackScoring, TemplateLM), {
            "__module__": __name__,
            "__doc__": "An lm-eval LM over a loopstack LoopedLM at one loop count: LoopstackLM(model, tokenizer, "
                       "loops=, max_length=, batch_size=, max_gen_toks=).",
        })
        _CLASSES[name] = cls
    return _CLASSES[name]


# --- tasks --------------------------------------------------------------------------------------------------------

def _task_names(text: str) -> list[str]:
    """The --tasks list: names, patterns (arc_*) or task YAML files (made absolute: lm-eval runs elsewhere)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks {text!r}: expected comma-separated task names, e.g. hellaswag,arc_easy")
    names = [str(Path(n).resolve()) if n.endswith((".yaml", ".yml")) and Path(n).is_file() else n for n in names]
    return list(dict.fromkeys(names))


def _include_dir(path: str | None) -> Path | None:
    if path is None:
        return None
    d = Path(path).resolve()
    if not d.is_dir():
        raise UserError(f"--include-path {path}: not a directory (expected a directory of task YAMLs)")
    return d


@contextlib.contextmanager
def _lm_eval_context(include: Path | None) -> Iterator[None]:
    """Where lm-eval runs: the --include-path directory as the working directory (relative data_files in local
    task YAMLs resolve against it), and no `git describe` (lm-eval records its caller's git hash; outside a
    repository git prints "fatal: not a git repository")."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        with contextlib.chdir(include) if include is not None else contextlib.nullcontext():
            yield
    finally:
        evaluator.get_git_commit_hash = saved


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _unknown(manager, names: list[str]) -> list[str]:
    """Names that are neither a task, group or tag of `manager` (nor match one as a pattern) nor a YAML file."""
    return [n for n in names if not manager.match_tasks([n]) and not (n.endswith((".yaml", ".yml"))
                                                                       and Path(n).is_file())]


def resolve_tasks(names: list[str], include: Path | None, verbose: bool = True) -> tuple[Any, list]:
    """(TaskManager, the tasks and groups named, loaded with their datasets): from --include-path alone when it
    holds every name, else with lm-eval's own tasks. Unknown names, or a dataset that cannot be loaded, are one
    line. Call inside `_lm_eval_context(include)`."""
    from lm_eval.api.group import Group
    from lm_eval.tasks import TaskManager

    def index(defaults: bool):
        try:
            return TaskManager(include_path=str(include) if include is not None else None, include_defaults=defaults)
        except Exception as err:  # a YAML lm-eval cannot parse
            raise UserError(f"--include-path {include}: lm-eval cannot index its task files "
                            f"({type(err).__name__}: {_first_line(err)})") from None

    manager = None
    if include is not None:
        manager = index(defaults=False)
        if _unknown(manager, names):
            manager = None
    if manager is None:
        if verbose:
            print("harness: indexing lm-eval's tasks (~15 s) ...", flush=True)
        manager = index(defaults=True)
    unknown = _unknown(manager, names)
    if unknown:
        where = f"--include-path {include} nor " if include is not None else ""
        raise UserError(f"--tasks: unknown task {', '.join(unknown)}: not in {where}lm-eval's "
                        f"{len(manager.all_tasks)} tasks, groups and tags (lm-eval ls tasks lists them)")
    loaded = []
    for name in names:
        try:
            found = manager.load(manager.match_tasks([name]) or [name])
        except Exception as err:  # a dataset that cannot be read or downloaded, a broken YAML: lm-eval's own types
            raise UserError(f"--tasks {name}: cannot load the task ({type(err).__name__}: {_first_line(err)})") \
                from None
        groups, tasks = found["groups"], found["tasks"]
        children = {c for g in groups.values() for c in g.child_names}
        # top-level items only: a group brings its own tasks
        loaded += [g for g in groups.values() if g.name not in children]
        grouped = {t.task_name for g in groups.values() if isinstance(g, Group) for t in g.get_all_tasks()}
        loaded += [t for n, t in tasks.items() if n not in grouped]
    return manager, loaded


# --- results ------------------------------------------------------------------------------------------------------

def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's results: "acc,none" -> acc, "acc_stderr,none" -> acc_stderr,
    another filter kept as "metric,filter"; text, "N/A" and the sample count (`sample_len`) left out."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else key] = float(value)
        out[task] = metrics
    return out


def main_metric(metrics: dict[str, float]) -> str | None:
    """The metric a task's plot shows: the first of MAIN_METRICS it reports, else its first (not a stderr)."""
    plain = [m for m in metrics if "_stderr" not in m]
    for name in MAIN_METRICS:
        if name in plain:
            return name
    return sorted(plain)[0] if plain else None


def merge_record(old: dict | None, new: dict) -> dict:
    """`new`, with the loop counts and tasks of `old` that it does not recompute, when both used the same --limit
    and lm-eval version (else `new` alone)."""
    if not old or old.get("limit") != new["limit"] or old.get("lm_eval_version") != new["lm_eval_version"]:
        return new
    loops: dict[str, dict] = {k: dict(v) for k, v in old.get("loops", {}).items()}
    for count, tasks in new["loops"].items():
        loops.setdefault(count, {}).update(tasks)
    merged = dict(new)
    merged["loops"] = dict(sorted(loops.items(), key=lambda kv: int(kv[0])))
    merged["tasks"] = list(dict.fromkeys(old.get("tasks", []) + new["tasks"]))
    merged["samples"] = {**old.get("samples", {}), **new.get("samples", {})}
    merged["seconds"] = {**old.get("seconds", {}), **new.get("seconds", {})}
    merged["commands"] = old.get("commands", [old.get("command")] if old.get("command") else []) + [new["command"]]
    return merged


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def format_table(record: dict) -> str:
    """One line per (task, metric): `task  metric  value @L  value @L ...` (stderrs left out)."""
    counts = sorted(record["loops"], key=int)
    rows = []
    tasks = list(dict.fromkeys(t for c in counts for t in record["loops"][c]))
    for task in tasks:
        metrics = list(dict.fromkeys(m for c in counts for m in record["loops"][c].get(task, {})
                                     if "_stderr" not in m))
        for metric in metrics:
            cells = []
            for c in counts:
                value = record["loops"][c].get(task, {}).get(metric)
                cells.append(f"{_number(value):>8} @{c}")
            rows.append((task, metric, "  ".join(cells)))
    if not rows:
        return "(no metrics)"
    wt, wm = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{t:<{wt}}  {m:<{wm}}  {cells}" for t, m, cells in rows)


def plot_record(record: dict, path: Path) -> Path:
    """Each task's main metric vs loop count (one panel per task), the trained loop count dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(record["loops"], key=int)
    tasks = list(dict.fromkeys(t for c in counts for t in record["loops"][c]))
    panels = []
    for task in tasks:
        merged: dict[str, float] = {}
        for c in counts:
            merged.update(record["loops"][c].get(task, {}))
        metric = main_metric(merged)
        if metric is not None:
            points = [(int(c), record["loops"][c][task][metric]) for c in counts
                      if metric in record["loops"][c].get(task, {})]
            panels.append((task, metric, points))
    cols = max(1, min(3, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    trained = record.get("trained_loops")
    for ax, (task, metric, points) in zip(axes.flat, panels, strict=False):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if trained:
            ax.axvline(trained, ls="--", c="grey", lw=1, label=f"trained loops ({trained})")
            ax.legend(fontsize=8)
        ax.set(xlabel="loops at test time", ylabel=metric, title=task, xticks=[p[0] for p in points])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{Path(record.get('run', '')).name or 'run'} step {record['step']}: lm-eval vs loops")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _command(args: argparse.Namespace, loops: list[int]) -> str:
    parts = ["loopstack", "harness", str(args.run), "--tasks", args.tasks]
    for flag, value in (("--step", args.step), ("--include-path", args.include_path), ("--limit", args.limit),
                        ("--out", args.out), ("--dtype", args.dtype)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--loops", ",".join(map(str, loops)), "--batch-size", str(args.batch_size)]
    return shlex.join(parts)


# --- the command --------------------------------------------------------------------------------------------------

def run_harness(args: argparse.Namespace) -> int:
    """`loopstack harness`: evaluate the tasks at each loop count; print a table, write the JSON and the plot."""
    lm_eval = _require_lm_eval()
    from lm_eval import simple_evaluate

    from loopstack.fileio import atomic_write_json
    from pretrain.inference import load_run

    names = _task_names(args.tasks)
    include = _include_dir(args.include_path)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected at least 1 document per task")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected at least 1")
    out_arg = Path(args.out).resolve() if args.out else None  # before lm-eval changes the working directory

    with _lm_eval_context(include):
        manager, tasks = resolve_tasks(names, include)
    loaded = load_run(args.run, step=args.step, dtype=args.dtype)
    cfg, model = loaded.cfg, loaded.model
    loops = list(dict.fromkeys(args.loops or [cfg.model.loops]))
    out = out_arg or (loaded.run_dir.resolve() / "harness")
    print(f"harness: {loaded.info.path} (step {loaded.step}, trained loops {cfg.model.loops}, window "
          f"{cfg.data.seq_len} tokens); tasks {', '.join(names)}; loops {', '.join(map(str, loops))}"
          + (f"; limit {args.limit}" if args.limit is not None else ""), flush=True)

    per_loops: dict[str, dict] = {}
    samples: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    lm_class = __getattr__("LoopstackLM")
    for i, count in enumerate(loops, 1):
        print(f"harness: loops {count} ({i}/{len(loops)}) ...", flush=True)
        t0 = time.time()
        lm = lm_class(model, loaded.tokenizer, loops=count, max_length=cfg.data.seq_len, batch_size=args.batch_size)
        with _lm_eval_context(include):
            results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                      bootstrap_iters=1000, log_samples=False)
        per_loops[str(count)] = task_metrics(results)
        samples.update({t: n.get("effective", n) if isinstance(n, dict) else n
                        for t, n in results.get("n-samples", {}).items()})
        seconds[str(count)] = round(time.time() - t0, 2)
        summary = ", ".join(f"{t} {m} {v[m]:.4f}" for t, v in per_loops[str(count)].items()
                            if (m := main_metric(v)) is not None)
        print(f"harness: loops {count} done in {seconds[str(count)]:.1f}s: {summary}", flush=True)

    record = {
        "step": loaded.step,
        "run": str(loaded.run_dir.resolve()),
        "checkpoint": str(loaded.info.path.resolve()),
        "trained_loops": cfg.model.loops,
        "window": cfg.data.seq_len,
        "loops": per_loops,
        "tasks": names,
        "samples": samples,
        "limit": args.limit,
        "include_path": str(include) if include is not None else None,
        "dtype": args.dtype or cfg.train.dtype,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "seconds": seconds,
        "command": _command(args, loops),
    }
    json_path = out / f"step_{loaded.step}.json"
    old = None
    if json_path.is_file():
        try:
            old = json.loads(json_path.read_text())
        except (OSError, ValueError):
            old = None  # an unreadable earlier result is replaced
    record = merge_record(old if isinstance(old, dict) else None, record)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, record)
    atomic_write_json(out / "latest.json", record)
    png = plot_record(record, out / f"step_{loaded.step}.png")
    print(format_table(record))
    print(f"harness: wrote {json_path} (and {out / 'latest.json'}), plot {png}", flush=True)
    return 0

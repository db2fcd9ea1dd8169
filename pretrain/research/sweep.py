"""The sweep machinery of `loopstack research`: a list of run specs -> one process tree per run, at most `jobs` at
a time, one result JSON per run, resumable.

Design:
- A spec (`RunSpec`) is everything that makes a run: the base config file, the `--set` overrides (the sweep's
  shared ones plus the run's own: variant, loops, seed), the test-time settings and the `kind` of evaluation
  (`stability` or `extrapolate`). Its `name` (e.g. `flt-L6-s0`) names the run directory `OUT/runs/<name>/`, the
  log `OUT/logs/<name>.log` and the result `OUT/results/<name>.json`.
- Each run is one worker process (`python -m pretrain.research.worker SPEC`, `OMP_NUM_THREADS` set to the sweep's
  threads per run), which runs the real `loopstack train CONFIG --run-dir ... --set ...` as its child and then
  evaluates the final checkpoint in-process (`pretrain.research.stability.evaluate` / `extrapolate.evaluate`).
  Training resumes from the run directory's newest checkpoint (`--resume auto`), so a killed sweep continues
  where each run stopped, and a finished run is only re-evaluated.
- A run whose result JSON exists with status ok or diverged is finished and never redone; the JSON is written
  atomically, last, so its presence means the run is complete. A failed run (any other exit) gets a JSON too
  (status `failed` and the one-line reason) and is tried again by the next invocation. A result made from a
  different spec (other overrides, say) is refused in one line instead of being mixed into the report.
- Ctrl-C or SIGTERM stops the sweep: nothing more starts, each running worker passes SIGTERM to its trainer, which
  checkpoints and exits 75 (no result is written), so the next invocation resumes it. A sweep killed with SIGKILL
  cannot pass anything on: its workers notice within a second that their parent is gone (`worker.watch_parent`)
  and stop their trainers the same way.
- Data is prepared once by the sweep (`prepare_data`) before any run starts, never per run.
- Progress: one line per finished run with its wall time, the sweep's elapsed time and an ETA (the mean wall time of
  the runs done in this invocation x runs left / jobs).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loopstack.errors import UserError
from loopstack.fileio import atomic_write_json
from pretrain.metrics import format_duration

ROOT = Path(__file__).resolve().parents[2]
FINISHED = ("ok", "diverged")  # statuses that are never redone
EXIT_DIVERGED, EXIT_REQUEUE = 3, 75


@dataclass
class RunSpec:
    """One run of a sweep: what to train (config + overrides) and how to evaluate it."""

    kind: str  # "stability" | "extrapolate": the module whose `evaluate` measures the final model
    name: str  # file-system name of the run: <variant>-L<loops>-s<seed>[...]
    config: str  # base config file
    overrides: list[str]  # every --set of this run (the sweep's shared ones first, then the run's own)
    variant: str
    loops: int
    seed: int
    test_loops: list[int] = field(default_factory=list)  # test-time loop counts evaluated
    extra: dict = field(default_factory=dict)  # kind-specific settings (extrapolate: task, depths, outer_norm)

    def identity(self) -> dict:
        """What must match between a stored result and this spec for the result to count as this run's."""
        return {k: v for k, v in asdict(self).items()}


@dataclass
class SweepPaths:
    out: Path

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def results(self) -> Path:
        return self.out / "results"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def specs(self) -> Path:
        return self.out / "specs"

    def run_dir(self, spec: RunSpec) -> Path:
        return self.runs / spec.name

    def result(self, spec: RunSpec) -> Path:
        return self.results / f"{spec.name}.json"

    def log(self, spec: RunSpec) -> Path:
        return self.logs / f"{spec.name}.log"


def parse_list(text: str, flag: str, valid: Sequence[str]) -> list[str]:
    """`--variants a,b`: names from `valid`, in the order given, each once; a one-line UserError (with a
    did-you-mean) for an unknown one."""
    import difflib

    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise UserError(f"{flag} {text!r}: expected a comma-separated list of {', '.join(valid)}")
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{flag}: unknown {name!r}{hint}; expected some of {', '.join(valid)}")
    return list(dict.fromkeys(names))


def default_jobs(threads: int) -> int:
    """Runs at a time: the cores this process may use, divided by the threads each run gets."""
    from data_pipeline.prepare import cpu_count

    return max(1, cpu_count() // max(threads, 1))


def machine() -> dict:
    """What the numbers were measured on (for the report)."""
    from data_pipeline.prepare import cpu_count

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": cpu_count(),
            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - the report is still useful without it
        pass
    return info


def read_result(path: Path) -> dict | None:
    """A stored result, or None when there is none (or it is unreadable: then the run is redone)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_existing(paths: SweepPaths, specs: Sequence[RunSpec]) -> None:
    """Refuse (one line) a result made from another spec: a sweep re-run into the same --out with other settings
    would otherwise mix both into one report."""
    for spec in specs:
        old = read_result(paths.result(spec))
        if old is not None and old.get("spec") != spec.identity():
            theirs, ours = old.get("spec") or {}, spec.identity()
            diff = [k for k in ours if theirs.get(k) != ours[k]]
            raise UserError(f"{paths.result(spec)}: made with other settings ({', '.join(diff) or 'unknown'} "
                            f"differ): use another --out, or delete {paths.out} to start over")


def run_sweep(specs: Sequence[RunSpec], out: str | os.PathLike, *, jobs: int, threads: int,
              say: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every spec not finished yet (at most `jobs` at a time, `threads` torch/OMP threads each) and return
    {name: result} for all specs. Data must be prepared before (see the module docstring)."""
    paths = SweepPaths(Path(out))
    for d in (paths.runs, paths.results, paths.logs, paths.specs):
        d.mkdir(parents=True, exist_ok=True)
    check_existing(paths, specs)
    todo = []
    for spec in specs:
        old = read_result(paths.result(spec))
        if old is not None and old.get("status") in FINISHED:
            say(f"skip {spec.name}: done ({old['status']}, {paths.result(spec)})")
        else:
            todo.append(spec)
    total, started = len(todo), time.perf_counter()
    if todo:
        say(f"sweep: {total} run(s) to do of {len(specs)}, {jobs} at a time, {threads} thread(s) each; logs in "
            f"{paths.logs}/")
    done_walls: list[float] = []
    lock = threading.Lock()
    procs: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()

    def one(spec: RunSpec) -> None:
        if stopping.is_set():
            return
        result = run_one(spec, paths, threads, procs)
        with lock:
            done_walls.append(result.get("wall_s", 0.0))
            left = total - len(done_walls)
            elapsed = time.perf_counter() - started
            eta = sum(done_walls) / len(done_walls) * left / max(jobs, 1)
            say(f"[{len(done_walls)}/{total}] {spec.name}: {describe(result)} ({result.get('wall_s', 0):.0f} s) | "
                f"elapsed {format_duration(elapsed)}, eta {format_duration(eta)}")

    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the sweep as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        for future in [pool.submit(one, spec) for spec in todo]:
            future.result()
    except BaseException:  # Ctrl-C, SIGTERM: start nothing more, stop what runs (its checkpoints let the next
        stopping.set()      # invocation resume)
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(procs.values()):
            if proc.poll() is None:
                proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True)
    return {spec.name: read_result(paths.result(spec)) or {} for spec in specs}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def describe(result: dict) -> str:
    status = result.get("status", "?")
    if status == "ok" and result.get("summary"):
        return f"ok, {result['summary']}"
    return f"{status}: {result.get('reason', '')}" if status != "ok" else "ok"


def run_one(spec: RunSpec, paths: SweepPaths, threads: int, procs: dict) -> dict:
    """Run one spec's worker (train + evaluate) and return its result (also written by the worker)."""
    spec_path = paths.specs / f"{spec.name}.json"
    atomic_write_json(spec_path, spec.identity())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               LOOPSTACK_RESEARCH_THREADS=str(threads), LOOPSTACK_RESEARCH_PARENT=str(os.getpid()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pretrain.research.worker", str(spec_path), str(paths.out)]
    with open(paths.log(spec), "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        procs[spec.name] = proc
        code = proc.wait()
        procs.pop(spec.name, None)
    result = read_result(paths.result(spec))
    if code == EXIT_REQUEUE and (result is None or result.get("status") not in FINISHED):
        return {"status": "interrupted", "reason": "stopped after a checkpoint; the next invocation resumes it"}
    if result is None or result.get("spec") != spec.identity():
        return {"status": "failed", "reason": f"worker exit {code} without a result; see {paths.log(spec)}"}
    return result


def last_line(path: Path, needle: str = "error") -> str:
    """The last line of a log that mentions `needle` (else its last non-empty line): a failed run's reason."""
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    hits = [x for x in lines if needle in x.lower()]
    return (hits or lines or [""])[-1][:400]

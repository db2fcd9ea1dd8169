"""The reliability table: every fault the stack is meant to survive, tried for real, with the outcome.

    python scripts/reliability.py                  # all faults, writes docs/reliability.md (~15 min, 2 CPU cores)
    python scripts/reliability.py --kills 2 --only kill,disk --out /tmp/r.md

Each fault runs real `loopstack` processes on the smoke config (a tiny FLT on 2 CPU processes, gloo) in a
scratch directory: kill -9 at chosen moments per ZeRO stage, damaged and removed files, a full disk (a real
tmpfs; needs root), two trainers on one run directory, a diverging run, and bad inputs of every kind the tests
try. A trial passes when the documented outcome happens: a resume bit-identical to the uninterrupted run, or a
one-line error with the documented exit code that names the file, field or holder and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke-cpu.yaml"
QUICK = ["logging.every=1", "eval.batches=1", "eval.loops=[1]", "logging.console=false"]
RUN = ["train.steps=12", "checkpoint.every=3", "checkpoint.keep_last=4"]
sys.path.insert(0, str(ROOT))


@dataclass
class Row:
    fault: str
    expected: str
    trials: int = 0
    passed: int = 0
    notes: list[str] = field(default_factory=list)

    def record(self, ok: bool, note: str = "") -> None:
        self.trials += 1
        self.passed += ok
        if note and (not ok or note not in self.notes):
            self.notes.append(("" if ok else "FAILED: ") + note)


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.data = [f"tokenizer.dir={work}/data/tokenizer", f"data.out={work}/data/shards"]
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
        self._refs: dict[int, dict[int, float]] = {}
        self.count = 0

    # --- running loopstack ------------------------------------------------------------------------------
    def cmd(self, nproc: int, run: Path, flags: list[str], *extra: str, config: Path = SMOKE) -> list[str]:
        """`loopstack train`; with several processes under torchrun, through `launch.exitcode` as the SLURM job
        runs it (torchrun reports any failed worker as its own exit 1; rank 0's real code goes to a file)."""
        sets = [a for f in self.data + QUICK + flags for a in ("--set", f)]
        if nproc == 1:
            return [sys.executable, "-m", "loopstack.cli", "train", str(config), "--run-dir", str(run), *sets, *extra]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "launch.exitcode", str(self.exit_file), "train", str(config), "--run-dir", str(run), *sets,
                *extra]

    @property
    def exit_file(self) -> Path:
        return self.work / "rank0-exit"

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        self.count += 1
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=self.env, timeout=timeout)

    def train(self, nproc: int, run: Path, flags: list[str], *extra: str) -> subprocess.CompletedProcess:
        self.exit_file.unlink(missing_ok=True)
        out = self.run(self.cmd(nproc, run, flags, *extra))
        if nproc > 1 and self.exit_file.exists():
            out.returncode = int(self.exit_file.read_text())
        return out

    def loopstack(self, *args: str) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "loopstack.cli", *args])

    def prepare(self) -> None:
        out = self.train(1, self.work / "warmup", ["train.steps=1"])
        if out.returncode:
            raise SystemExit(f"preparing the smoke data failed:\n{out.stderr[-3000:]}")

    def reference(self, zero: int) -> dict[int, float]:
        if zero not in self._refs:
            run = self.work / f"ref-z{zero}"
            out = self.train(2, run, RUN + [f"parallel.zero_stage={zero}"])
            if out.returncode:
                raise SystemExit(f"reference run (ZeRO-{zero}) failed:\n{out.stderr[-3000:]}")
            self._refs[zero] = losses(run)
        return self._refs[zero]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def one_line_error(out: subprocess.CompletedProcess, code: int, *needles: str) -> tuple[bool, str]:
    """The process exited `code` with exactly one `loopstack: error:` line per rank, no traceback, and the line
    names every needle."""
    lines = sorted({ln for ln in out.stderr.splitlines() if ln.startswith("loopstack: error:")})
    first = lines[0] if lines else (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    # torchrun adds its own report of the failed workers (a traceback ending in ChildFailedError): not ours
    ours = out.stderr.count("Traceback") - out.stderr.count("ChildFailedError:")
    ok = out.returncode == code and len(lines) == 1 and ours <= 0 and all(n in lines[0] for n in needles)
    return ok, f"exit {out.returncode}: {first[:300]}"


def complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name) for p in (run / "checkpoints").glob("*/COMPLETE") if p.parent.name.isdigit())


# --- faults ---------------------------------------------------------------------------------------------------


def kill9(b: Bench, kills: int, rng: random.Random) -> list[Row]:
    """SIGKILL of the whole 2-process job (torchrun agent and workers) at a moment drawn from three kinds:
    during a step, while a checkpoint is being written (.tmp-<step> exists), and right after one completed."""
    rows = []
    for zero in (0, 1, 2, 3):
        row = Row(f"kill -9 of a 2-process run, ZeRO-{zero}",
                  "resume --resume auto continues with losses bit-identical to the uninterrupted run")
        ref = b.reference(zero)
        for i in range(kills):
            moment = ("mid-step", "during a checkpoint save", "right after a checkpoint")[i % 3]
            run = b.work / f"kill-z{zero}-{i}"
            flags = RUN + [f"parallel.zero_stage={zero}"]
            proc = subprocess.Popen(b.cmd(2, run, flags), cwd=ROOT, env=b.env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = rng.randint(2, 10)
            hit = _wait_for_moment(run, proc, moment, target)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out = b.train(2, run, flags)
            got = losses(run) if (run / "metrics.jsonl").exists() else {}
            ok = out.returncode == 0 and got == ref
            row.record(ok, f"{moment}" if ok else f"{moment} ({hit}): exit {out.returncode}, "
                                                   f"{len(got)} steps, equal={got == ref}")
            if ok and hit:
                row.notes[-1] = f"{moment} ({hit})" if row.notes and row.notes[-1] == moment else row.notes[-1]
        rows.append(row)
    return rows


def _wait_for_moment(run: Path, proc: subprocess.Popen, moment: str, target: int, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    seen = set(complete_steps(run)) if (run / "checkpoints").exists() else set()
    while time.time() < deadline and proc.poll() is None:
        ckpts = run / "checkpoints"
        if moment == "mid-step":
            steps = losses(run) if (run / "metrics.jsonl").exists() else {}
            if steps and max(steps) >= target:
                return f"after step {max(steps)}"
        elif moment == "during a checkpoint save":
            tmp = list(ckpts.glob(".tmp-*")) if ckpts.exists() else []
            if tmp:
                return f"{tmp[0].name} being written"
        else:
            done = set(complete_steps(run)) if ckpts.exists() else set()
            if done - seen:
                return f"checkpoint {max(done - seen)} just completed"
        time.sleep(0.02)
    return "run ended first"


def damaged_checkpoints(b: Bench) -> list[Row]:
    rows = []
    ref = b.reference(1)
    cases = [
        ("a checkpoint file truncated", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
        ("a checkpoint file with one byte flipped (size unchanged)", _flip),
        ("a checkpoint file removed", lambda f: f.unlink()),
    ]
    for what, damage in cases:
        row = Row(f"{what} in the newest checkpoint",
                  "--resume auto reports it and resumes from the older one, bit-identically; --resume PATH: "
                  "exit 2, one line naming the file")
        for pick in ("mp_rank_00_model_states.pt", "trainer_state_rank1.pt"):
            run = b.work / f"damage-{len(rows)}-{pick[:5]}"
            shutil.copytree(b.work / "ref-z1", run)
            newest = run / "checkpoints" / str(complete_steps(run)[-1])
            victim = newest / pick
            damage(victim)
            explicit = b.train(2, run, RUN + ["parallel.zero_stage=1"], "--resume", str(newest))
            ok1, note1 = one_line_error(explicit, 2, str(victim))
            _drop_after(run, complete_steps(run)[-2])
            auto = b.train(2, run, RUN + ["parallel.zero_stage=1"])
            ok2 = auto.returncode == 0 and "skipping damaged checkpoint" in auto.stdout and losses(run) == ref
            row.record(ok1 and ok2, f"{pick}: {note1}" if not ok1 else
                       (f"{pick}: auto exit {auto.returncode}" if not ok2 else ""))
        rows.append(row)
    return rows


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_after(run: Path, step: int) -> None:
    """Truncate metrics to `step` as a run killed then would have left them (resume rewrites the rest)."""
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_in_checkpoint(b: Bench) -> list[Row]:
    import torch

    row = Row("a checkpoint file replaced by a pickle that runs a command (COMPLETE edited to match)",
              "`--resume PATH` and `loopstack eval`: exit 2, one line naming the file; the command never runs")
    for pick in ("trainer_state_rank0.pt", "mp_rank_00_model_states.pt"):
        run = b.work / f"evil-{pick[:5]}"
        shutil.copytree(b.work / "ref-z1", run)
        newest = run / "checkpoints" / str(complete_steps(run)[-1])
        marker = b.work / f"pwned-{pick[:5]}"
        torch.save({"state": _Payload(str(marker))}, newest / pick)
        _refresh_complete(newest)
        # the same layout (2 processes), so DeepSpeed's own loader reads its files
        resume = b.train(2, run, RUN + ["parallel.zero_stage=1"], "--resume", str(newest))
        ok1, note1 = one_line_error(resume, 2, pick)
        # one process: the trainer state file is read; DeepSpeed's are not (re-partitioned from the whole-tensor
        # state), and a file that is never read cannot run anything
        ev = b.loopstack("eval", str(run))
        ok2, note2 = one_line_error(ev, 2, pick)
        ok2 = ok2 or (pick.startswith("mp_rank") and ev.returncode == 0)
        row.record(ok1 and ok2 and not marker.exists(),
                   f"{pick}: resume {note1}; eval {note2}; command ran: {marker.exists()}")
    return [row]


def _refresh_complete(ckpt: Path) -> None:
    """What an attacker does: make the COMPLETE record match the planted file (sizes and checksums)."""
    import hashlib

    meta = json.loads((ckpt / "COMPLETE").read_text())
    for key in ("files", "sha256"):
        if isinstance(meta.get(key), dict):
            for name in meta[key]:
                f = ckpt / name
                meta[key][name] = f.stat().st_size if key == "files" else hashlib.sha256(f.read_bytes()).hexdigest()
    (ckpt / "COMPLETE").write_text(json.dumps(meta))


def damaged_shards(b: Bench) -> list[Row]:
    rows = []
    for what, damage in (("a shard with one byte flipped, its mtime restored", _flip_keep_mtime),
                         ("a shard removed", lambda f: f.unlink())):
        row = Row(what, "training refuses to start: exit 2, one line naming the shard")
        data = b.work / f"shards-{len(rows)}"
        shutil.copytree(b.work / "data" / "shards", data)
        shard = sorted(data.glob("shard-*.arrow"))[0]
        damage(shard)
        out = b.train(1, b.work / f"shardrun-{len(rows)}", ["train.steps=2", f"data.out={data}"])
        ok, note = one_line_error(out, 2, str(shard))
        row.record(ok, note)
        rows.append(row)
    return rows


def _flip_keep_mtime(path: Path) -> None:
    st = path.stat()
    _flip(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def disk_full(b: Bench) -> list[Row]:
    """Two ways to fill a real tmpfs: the free-space check before a save sees it coming (the third checkpoint
    does not fit), or the check passes and a write fails half-way (checkpoints without the whole-tensor state
    first, then a resume with it: the new checkpoint is larger than the one the check measures)."""
    rows = []
    one = sum(p.stat().st_size for p in (b.work / "ref-z1" / "checkpoints" / "3").rglob("*") if p.is_file())
    cases = [("before the save (free-space check)", (one * 2 + one // 2) // 1024, [[]]),
             ("during the save (the write fails)", (one * 3 // 2) // 1024,
              [["checkpoint.elastic=false", "train.steps=3"], []])]
    for i, (when, size_kib, attempts) in enumerate(cases):
        row = Row(f"disk full {when}, on a real tmpfs",
                  "exit 74, one line with the path and the space; earlier checkpoints intact and resumable; "
                  "no .tmp-* left")
        mnt = b.work / f"tmpfs-{i}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)]).returncode:
            row.notes.append("not run: mounting a tmpfs needs root")
            rows.append(row)
            continue
        try:
            run = mnt / "run"
            for extra in attempts:
                out = b.train(2, run, RUN + ["parallel.zero_stage=1", "checkpoint.keep_last=10", *extra])
            ok, note = one_line_error(out, 74, "space")
            kept = complete_steps(run)
            ok = ok and bool(kept) and not list((run / "checkpoints").glob(".tmp-*"))
            again = b.loopstack("eval", str(run), "--batches", "1") if kept else None  # the kept one loads
            ok = ok and again is not None and again.returncode == 0
            row.record(ok, f"{note}; complete checkpoints kept: {kept}")
        finally:
            subprocess.run(["umount", str(mnt)])
        rows.append(row)
    return rows


def concurrent(b: Bench) -> list[Row]:
    row = Row("a second trainer on a run directory a live job holds; then the holder killed -9",
              "the second exits 2 in one line naming the holder; after the kill a resume takes the lock over")
    run = b.work / "held"
    flags = RUN + ["train.steps=400", "parallel.zero_stage=1"]
    first = subprocess.Popen(b.cmd(2, run, flags), cwd=ROOT, env=b.env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_moment(run, first, "right after a checkpoint", 0)
        holder = json.loads((run / "LOCK").read_text())
        second = b.train(1, run, flags)
        ok, note = one_line_error(second, 2, f"pid {holder['pid']}")
        ok = ok and first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    third = b.train(2, run, RUN + ["parallel.zero_stage=1", f"train.steps={complete_steps(run)[-1] + 1}"])
    ok = ok and third.returncode == 0 and "taking over" in third.stdout
    row.record(ok, f"second: {note}; takeover exit {third.returncode}")
    return [row]


def bad_inputs(b: Bench) -> list[Row]:
    rows = []
    empty = b.work / "empty.yaml"
    empty.write_text("# nothing\n")
    shared = b.work / "shared.yaml"  # a config from someone else, with a newline inside a quoted value
    shared.write_text(f"base: {SMOKE}\nlaunch:\n  account: \"proj\\ntouch /tmp/pwned\"\n")
    checks: list[tuple[str, Callable[[], subprocess.CompletedProcess], int, tuple[str, ...]]] = [
        ("empty config file", lambda: b.loopstack("train", str(empty)), 2, ("empty.yaml",)),
        ("misspelt config key", lambda: b.train(1, b.work / "bad", ["model.d_modle=64"]), 2, ("d_modle",)),
        ("wrong-typed override", lambda: b.train(1, b.work / "bad", ["train.steps=many"]), 2, ("train.steps",)),
        ("--resume PATH that is not a checkpoint", lambda: b.train(1, b.work / "bad", [], "--resume",
                                                                   str(b.work)), 2, ("--resume",)),
        ("resume with another model.d_model", lambda: b.train(2, b.work / "ref-z1", RUN + [
            "parallel.zero_stage=1", "model.d_model=128", "train.steps=20"]), 2, ("model.d_model: 64 -> 128",)),
        ("eval with a loop list that is not integers", lambda: b.loopstack("eval", str(b.work / "ref-z1"),
                                                                           "--loops", "1,x"), 2, ("--loops",)),
        ("newline in --partition (shell injection)", lambda: b.loopstack(
            "launch", "slurm", str(SMOKE), "--partition", "gpu\ntouch /tmp/x", "--dry-run"), 2, ("partition",)),
        ("newline in launch.account from a shared config file", lambda: b.loopstack(
            "launch", "slurm", str(shared), "--dry-run"), 2, ("launch.account", "control character")),
        ("train.lr=10 (the run diverges)", lambda: b.train(1, b.work / "diverge", ["train.lr=10",
                                                                                  "train.steps=60"]), 3,
         ("diverged",)),
    ]
    config = (b.work / "ref-z1" / "config.yaml").read_bytes()
    for what, call, code, needles in checks:
        row = Row(f"bad input: {what}", f"exit {code}, one line naming it; nothing already written changes")
        out = call()
        ok, note = one_line_error(out, code, *needles)
        unchanged = (b.work / "ref-z1" / "config.yaml").read_bytes() == config
        row.record(ok and unchanged, note if ok and unchanged else f"{note}; run record unchanged: {unchanged}")
        rows.append(row)
    return rows


FAULTS = {"kill": kill9, "damage": damaged_checkpoints, "code": code_in_checkpoint, "shards": damaged_shards,
          "disk": disk_full, "concurrent": concurrent, "inputs": bad_inputs}


def render(rows: list[Row], started: float, runs: int, argv: list[str]) -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import git_commit, machine_info

    m = machine_info()
    total, ok = sum(r.trials for r in rows), sum(r.passed for r in rows)
    out = ["# Reliability: faults tried and what happened", "",
           "Produced by `python scripts/reliability.py` (rerun it to check your own machine); each trial runs real "
           "`loopstack` processes on `configs/smoke-cpu.yaml` (2 processes, gloo, fp32).", "",
           f"- commit `{git_commit()}`, {time.strftime('%Y-%m-%d', time.gmtime(started))}; "
           f"{m['cpus']} CPUs ({m['cpu_model']}), {platform.python_version()}, torch {m.get('torch')}",
           f"- {ok} of {total} trials passed, {runs} loopstack processes, {(time.time() - started) / 60:.1f} min; "
           f"arguments: `{' '.join(argv) or '(defaults)'}`", "",
           "| fault | expected outcome | trials | passed | notes |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        notes = "; ".join(n.replace("|", "\\|") for n in r.notes[:4]) or ""
        out.append(f"| {r.fault} | {r.expected} | {r.trials} | {r.passed} | {notes} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="kill -9 trials per ZeRO stage (default 3)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = parser.parse_args(argv)
    chosen = [f for f in (args.only.split(",") if args.only else FAULTS) if f]
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    started, rng = time.time(), random.Random(args.seed)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="loopstack-reliability-") as tmp:
        b = Bench(Path(tmp))
        b.prepare()
        b.reference(1)
        for name in chosen:
            print(f"== {name}", flush=True)
            fault = FAULTS[name]
            new = fault(b, args.kills, rng) if name == "kill" else fault(b)
            for r in new:
                print(f"   {r.passed}/{r.trials} {r.fault}" + (f"  [{'; '.join(r.notes[:2])}]" if r.notes else ""),
                      flush=True)
            rows += new
    text = render(rows, started, b.count, argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0 if all(r.passed == r.trials for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

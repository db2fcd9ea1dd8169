"""`loopstack launch slurm-data`: `data prepare` as a SLURM job array, then one dependent `data merge`.

Task I of the array runs `loopstack data prepare --source ... --tokenizer DIR --out DIR --slice I/N`
(resumable, writes a partial manifest); the merge job (`--dependency=afterok:<array>`) runs
`loopstack data merge DIR` when every task succeeded. Rerunning submits a new array (all slices, or
`--only I,J`) and a new merge, after cancelling the old merge job that can no longer start.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from launch import journal, sbatch
from launch.slurm import (
    NAME_USE,
    PATH_USE,
    check_launch,
    check_word,
    parse_time,
    partition_account_lines,
    python_bin_dir,
)
from launch.templating import Lines, check_line, load_template, render
from loopstack.errors import UserError
from loopstack.fileio import atomic_write

PREPARE, MERGE = "prepare.sbatch", "merge.sbatch"


def parse_only(text: str | None, tasks: int) -> list[int]:
    if not text:
        return list(range(tasks))
    try:
        indices = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--only {text}: expected comma-separated slice indices, e.g. 0,3") from None
    bad = [i for i in indices if not 0 <= i < tasks]
    if bad or not indices:
        raise UserError(f"--only {text}: slice indices must be in 0..{tasks - 1}")
    return indices


@dataclass
class DataJob:
    cfg: object  # pretrain.config.RunConfig
    run_dir: Path
    tasks: int
    indices: list[int]
    time: str = "04:00:00"
    cpus_per_task: int = 0
    workdir: Path = field(default_factory=Path.cwd)
    run_dir_origin: str = "run directory"  # what errors call the run directory ("--run-dir" when given)

    @classmethod
    def from_args(cls, config: str, overrides: list[str], run_dir: str | None, *, tasks: int, only: str | None = None,
                  cpus_per_task: int | None = None, time: str = "04:00:00", partition: str | None = None,
                  account: str | None = None) -> DataJob:
        from pretrain.config import load_config

        flags = {"partition": partition, "account": account}
        flag_overrides = [f"launch.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
        cfg = load_config(config, list(overrides) + flag_overrides)
        check_launch(cfg.launch, flags)
        if not cfg.data.sources:
            raise UserError(f"{config}: data.sources is empty: nothing to prepare")
        parse_time(time)
        path = Path(run_dir) if run_dir else Path("runs") / f"{check_word('name', cfg.name, NAME_USE)}-data"
        cpus = cpus_per_task if cpus_per_task is not None else cfg.data.workers
        return cls(cfg=cfg, run_dir=path.absolute(), tasks=tasks, indices=parse_only(only, tasks), time=time,
                   cpus_per_task=cpus, run_dir_origin="--run-dir" if run_dir else "run directory")

    @property
    def array_spec(self) -> str:
        if self.indices == list(range(self.tasks)):
            return f"0-{self.tasks - 1}"
        return ",".join(map(str, self.indices))

    @property
    def out(self) -> str:
        return check_line("data.out", self.cfg.data.out)

    def prepare_command(self) -> Lines:
        """`data prepare` for slice $SLICE: sources, tokenizer and output spelled out (shell-quoted, one line
        each, no control characters); every other data setting (text field, shard size, bad-document policy)
        from the frozen config."""
        data = self.cfg.data
        lines = ['loopstack data prepare --config "$RUN_DIR/launch/config.yaml"']
        lines += [f"--source {shlex.quote(check_line(f'data.sources[{i}]', source))}"
                  for i, source in enumerate(data.sources)]
        tokenizer = check_line("tokenizer.dir", self.cfg.tokenizer.dir)
        lines += [f"--tokenizer {shlex.quote(tokenizer)} --out {shlex.quote(self.out)}",
                  '--workers "$WORKERS" --slice "$SLICE/$TASKS"']
        return Lines(tuple(lines), sep=" \\\n    ")

    def _common(self, template: str) -> dict[str, object]:
        la = self.cfg.launch
        check_launch(la)
        name = check_word("name", self.cfg.name, NAME_USE)
        resources = []
        if template == PREPARE and self.cpus_per_task:
            resources.append(f"#SBATCH --cpus-per-task={self.cpus_per_task}")
        resources += partition_account_lines(la)
        run_dir = check_word(self.run_dir_origin, str(self.run_dir), PATH_USE)
        bin_dir = check_line("the Python environment's bin directory", python_bin_dir())
        return {
            "name": name, "tasks": self.tasks, "out": self.out, "out_q": shlex.quote(self.out),
            "run_dir": run_dir, "run_dir_q": shlex.quote(run_dir),
            "workdir": check_word("working directory", str(self.workdir.absolute()), PATH_USE),
            "bin_dir_q": shlex.quote(bin_dir),
            "sbatch_resources": Lines(tuple(resources)) if resources else "# (no CPU / partition / account flags)",
        }

    def render_prepare(self) -> str:
        text, origin = load_template(PREPARE)
        common = self._common(PREPARE)
        parse_time(self.time)  # the text checked is the text on the #SBATCH --time line
        return render(text, {**common, "job_name": f"{common['name']}-prepare", "array": self.array_spec,
                             "time": self.time, "prepare_command": self.prepare_command()}, origin)

    def render_merge(self) -> str:
        text, origin = load_template(MERGE)
        common = self._common(MERGE)
        return render(text, {**common, "job_name": f"{common['name']}-merge",
                             "merge_command": shlex.join(["loopstack", "data", "merge", self.out])}, origin)

    def scripts(self) -> tuple[Path, Path]:
        ldir = journal.launch_dir(self.run_dir)
        return ldir / PREPARE, ldir / MERGE

    def sbatch_commands(self) -> list[str]:
        prepare, merge = (shlex.quote(str(p)) for p in self.scripts())
        return [f"sbatch {prepare}", f"sbatch --dependency=afterok:<array job> --kill-on-invalid-dep=yes {merge}"]

    def submit(self) -> tuple[str, str]:
        from data_pipeline.tokenizer import tokenizer_exists
        from pretrain.config import save_config

        prepare_text, merge_text = self.render_prepare(), self.render_merge()
        tok = self.cfg.tokenizer.dir
        if not tokenizer_exists(self.workdir / tok, self.cfg.tokenizer.kind):
            raise UserError(f"tokenizer.dir {tok}: no trained tokenizer there; train it once before the array: "
                            f"loopstack data train-tokenizer --config CONFIG")
        self._cancel_stale_merge()
        prepare, merge = self.scripts()
        (prepare.parent / "logs").mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, prepare.parent / "config.yaml")
        atomic_write(prepare, prepare_text, mode=0o755)
        atomic_write(merge, merge_text, mode=0o755)
        job_ids: list[str] = []
        try:  # the array is held until the journal is written (its tasks' events come after the submission)
            job_ids.append(sbatch.submit(prepare, ["--hold"]))
            job_ids.append(sbatch.submit(merge, [f"--dependency=afterok:{job_ids[0]}", "--kill-on-invalid-dep=yes"]))
            journal.append_event(self.run_dir, "submit", job_ids=job_ids, mode="data", tasks=self.tasks,
                                 slices=self.indices, out=self.out)
        except BaseException:
            sbatch.cancel(job_ids)
            raise
        sbatch.release(job_ids[0])
        return job_ids[0], job_ids[1]

    def _cancel_stale_merge(self) -> None:
        """A merge job of an earlier submission waits for an array that failed: it can never run. Active array
        tasks of an earlier submission are left alone (two writers of one slice would be the prepare's problem),
        so refuse instead."""
        from launch.status import submitted_jobs

        previous = submitted_jobs(self.run_dir)
        states = sbatch.job_states(previous)
        running = sorted(j for j, s in states.items() if "_" in j and s in sbatch.ACTIVE_STATES)
        if running:
            raise UserError(f"{self.run_dir}: array task(s) {', '.join(running)} still active: wait for them or "
                            f"scancel them before rerunning")
        merges = [previous[i + 1] for i in range(0, len(previous) - 1, 2)]
        stale = [j for j in merges if states.get(j) in sbatch.ACTIVE_STATES]
        sbatch.cancel(stale)

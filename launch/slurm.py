"""`loopstack launch slurm`: render the training job script into the run directory and submit it.

    spec = TrainJob.from_args(config, overrides, nodes=2, gpus_per_node=8, time="24:00:00")
    script = spec.render()            # the text of <run>/launch/train.sbatch
    job_ids = spec.submit(chain=0)    # writes the run's launch/ files, then sbatch

The script (launch/templates/train.sbatch) carries the requeue protocol; this module only fills in
values, writes files atomically and records what it submitted in the run's journal.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch import journal, sbatch
from launch.templating import load_template, render
from loopstack.errors import UserError
from loopstack.fileio import atomic_write

TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")
SCRIPT = "train.sbatch"
# `loopstack train`, run in-process by launch.exitcode so rank 0's exit code reaches the batch shell
TRAIN_COMMAND = 'python -m launch.exitcode "$EXIT_FILE" train "$CONFIG" --run-dir "$RUN_DIR" --resume auto'


def parse_time(text: str, origin: str = "--time") -> int:
    """SLURM time limit `[D-]HH:MM:SS` -> seconds."""
    m = TIME_RE.match(text.strip())
    if not m:
        raise UserError(f"{origin} {text!r}: expected HH:MM:SS (or D-HH:MM:SS), e.g. 24:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UserError(f"{origin} {text!r}: the time limit must be positive")
    return total


def partition_account_lines(la) -> list[str]:
    """`#SBATCH` lines for the launch section's partition and account (none for what is unset)."""
    return [f"#SBATCH --{flag}={value}" for flag, value in (("partition", la.partition), ("account", la.account))
            if value]


def _no_space(path: Path, what: str) -> str:
    text = str(path)
    if any(c.isspace() for c in text):
        raise UserError(f"{what} {text!r} contains whitespace, which #SBATCH lines cannot quote; pick another path")
    return text


def python_bin_dir() -> str:
    """The bin/ directory of the environment running loopstack now (venv not resolved through symlinks)."""
    return str(Path(sys.executable).parent)


@dataclass
class TrainJob:
    cfg: object  # pretrain.config.RunConfig
    run_dir: Path
    workdir: Path = field(default_factory=Path.cwd)
    template: str | None = None
    train_command: str = ""  # default: TRAIN_COMMAND

    @classmethod
    def from_args(cls, config: str, overrides: list[str], run_dir: str | None = None, *, nodes: int | None = None,
                  gpus_per_node: int | None = None, time: str | None = None, partition: str | None = None,
                  account: str | None = None, template: str | None = None) -> TrainJob:
        """Load CONFIG with --set overrides, then the launch flags on top (flags are the most specific)."""
        from pretrain.config import load_config

        if time is not None:
            parse_time(time)  # name the flag, not the config key
        flags = {"nodes": nodes, "gpus_per_node": gpus_per_node, "time": time, "partition": partition,
                 "account": account}
        overrides = list(overrides) + [f"launch.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
        cfg = load_config(config, overrides)
        path = Path(run_dir) if run_dir else Path("runs") / cfg.name
        return cls(cfg=cfg, run_dir=path.absolute(), template=template)

    # --- values -----------------------------------------------------------------------------------------
    @property
    def launch(self):
        return self.cfg.launch

    @property
    def procs_per_node(self) -> int:
        return self.launch.gpus_per_node or self.launch.procs_per_node

    @property
    def script_path(self) -> Path:
        return journal.launch_dir(self.run_dir) / SCRIPT

    def values(self, chain: int = 0) -> dict[str, object]:
        la = self.launch
        limit = parse_time(la.time, "launch.time")
        if la.signal_grace_s >= limit:
            raise UserError(f"launch.signal_grace_s = {la.signal_grace_s} is not shorter than the time limit "
                            f"{la.time}: the job would be signalled before it starts working")
        run_dir = _no_space(self.run_dir, "run directory")
        resources = []
        if la.gpus_per_node:
            resources.append(f"#SBATCH --gpus-per-node={la.gpus_per_node}")
        if la.cpus_per_node:
            resources.append(f"#SBATCH --cpus-per-task={la.cpus_per_node}  # CPUs for the node's torchrun agent")
        resources += partition_account_lines(la)
        requeue = ("#SBATCH --requeue" if not chain else
                   f"#SBATCH --no-requeue  # --chain {chain}: each job of the chain resumes; no requeue")
        train = self.train_command or TRAIN_COMMAND
        return {
            "name": self.cfg.name, "job_name": self.cfg.name, "script": self.script_path,
            "nodes": la.nodes, "time": la.time, "signal_grace_s": la.signal_grace_s,
            "gpus_per_node": la.gpus_per_node, "procs_per_node": self.procs_per_node, "port": la.port,
            "max_restarts": la.max_restarts, "requeue": 0 if chain else 1,
            # torchrun's wait for its workers must end before the time limit, leaving time to requeue
            "stop_timeout": max(5, la.signal_grace_s - 15),
            "sbatch_resources": "\n".join(resources) if resources else "# (no GPU / CPU / partition / account flags)",
            "sbatch_requeue": requeue,
            "run_dir": run_dir, "run_dir_q": shlex.quote(run_dir),
            "workdir": _no_space(self.workdir.absolute(), "working directory"),
            "bin_dir_q": shlex.quote(python_bin_dir()),
            "train_command": train,
        }

    def render(self, chain: int = 0) -> str:
        text, origin = load_template(SCRIPT, self.template)
        return render(text, self.values(chain), origin)

    def sbatch_commands(self, chain: int = 0) -> list[str]:
        """The submissions, as a user would type them (for --dry-run and the README)."""
        script = shlex.quote(str(self.script_path))
        if chain <= 1:
            return [f"sbatch {script}"]
        return [f"sbatch {script}"] + [f"sbatch --dependency=afterany:<job {i}> {script}" for i in range(1, chain)]

    # --- submit -----------------------------------------------------------------------------------------
    def submit(self, chain: int = 0) -> list[str]:
        """Write <run>/launch/{config.yaml,train.sbatch}, submit (1 job, or `chain` dependent ones)."""
        from pretrain.config import save_config

        script = self.render(chain)  # every check happens before anything is written
        self._refuse_if_active()
        ldir = journal.launch_dir(self.run_dir)
        (ldir / "logs").mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, ldir / "config.yaml")
        atomic_write(self.script_path, script, mode=0o755)
        # The first job is held until the journal (and a chain's job list) is written, so the job's own
        # events always come after its submission and a chain job always finds the list of the others.
        job_ids: list[str] = []
        try:
            for i in range(max(chain, 1)):
                extra = [f"--dependency=afterany:{job_ids[-1]}"] if i else ["--hold"]
                job_ids.append(sbatch.submit(self.script_path, extra))
            if chain:
                atomic_write(ldir / "chain", "".join(f"{j}\n" for j in job_ids))
            la = self.launch
            journal.append_event(self.run_dir, "submit", job_ids=job_ids, mode="chain" if chain else "requeue",
                                 nodes=la.nodes, gpus_per_node=la.gpus_per_node, procs_per_node=self.procs_per_node,
                                 time_limit=la.time, script=str(self.script_path))
        except BaseException:
            sbatch.cancel(job_ids)  # never leave held or half-chained jobs behind
            raise
        sbatch.release(job_ids[0])
        return job_ids

    def _refuse_if_active(self) -> None:
        """Two jobs training into one run directory would corrupt it."""
        from launch.status import submitted_jobs

        live = {j: s for j, s in sbatch.job_states(submitted_jobs(self.run_dir)).items() if s in sbatch.ACTIVE_STATES}
        if live:
            jobs = ", ".join(f"{j} ({s})" for j, s in sorted(live.items()))
            raise UserError(f"{self.run_dir} already has active job(s) {jobs}: scancel them first, or pick "
                            f"another --run-dir")

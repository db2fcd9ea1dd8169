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
from dataclasses import dataclass, field, fields
from pathlib import Path

from launch import journal, sbatch
from launch.templating import Lines, check_line, load_template, render
from loopstack.errors import UserError
from loopstack.fileio import atomic_write

TIME_RE = re.compile(r"(?:([0-9]+)-)?([0-9]+):([0-5][0-9]):([0-5][0-9])")
SCRIPT = "train.sbatch"
NO_RESOURCES = "# (no GPU / CPU / partition / account flags)"
# `loopstack train`, run in-process by launch.exitcode so rank 0's exit code reaches the batch shell
TRAIN_COMMAND = 'python -m launch.exitcode "$EXIT_FILE" train "$CONFIG" --run-dir "$RUN_DIR" --resume auto'

# --- what may reach a job script (launch/README.md, "What reaches the job script") ------------------------
# Values written unquoted (run name, run and working directories): characters that need no quoting, neither
# for bash (shlex's safe set) nor for sbatch's #SBATCH parser (whitespace ends an option, quotes and backslash
# are eaten, '#' starts a comment), minus '%' (a filename pattern in --output). Letters may be non-ASCII.
WORD_RE = re.compile(r"[\w@+=:,./-]+")
WORD_CHARS = "letters, digits and _ . - / + = @ : ,"
# --partition and --account: a SLURM name, or a comma-separated list of them
SLURM_NAMES_RE = re.compile(r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*")
NAME_USE = f"the run name (#SBATCH --job-name, directory runs/<name>) may only hold {WORD_CHARS}"
PATH_USE = f"pick another path: the #SBATCH --output and --chdir lines take paths of {WORD_CHARS} only"


def parse_time(text: str, origin: str = "--time") -> int:
    """SLURM time limit `[D-]HH:MM:SS` -> seconds. Nothing else (no surrounding blanks): the text checked
    here is the text written on the `#SBATCH --time` line."""
    m = TIME_RE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise UserError(f"{origin} {text!r}: expected HH:MM:SS (or D-HH:MM:SS), e.g. 24:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UserError(f"{origin} {text!r}: the time limit must be positive")
    return total


def check_word(what: str, value: str, use: str) -> str:
    """`value` if it can stand unquoted anywhere in a job script (WORD_RE); else a one-line UserError."""
    check_line(what, value)
    if WORD_RE.fullmatch(value):
        return value
    if not value:
        raise UserError(f"{what} is empty: {use}")
    found = "whitespace" if any(c.isspace() for c in value) else \
        " ".join(sorted({repr(c) for c in value if not WORD_RE.fullmatch(c)}))
    raise UserError(f"{what} {value!r}: contains {found}; {use}")


def check_slurm_names(what: str, value: str) -> str:
    """A partition or account: '' (unset), a SLURM name, or a comma-separated list of names."""
    check_line(what, value)
    if value and not SLURM_NAMES_RE.fullmatch(value):
        raise UserError(f"{what} {value!r}: expected a SLURM name of letters, digits, '_', '-' and '.', or several "
                        f"separated by commas (e.g. gpu or gpu,gpu-long)")
    return value


def check_launch(la, flags: dict[str, str | None] | None = None) -> None:
    """Every string of the launch section fits on one line of a script; partition and account are SLURM names.
    `flags`: values given as command-line flags (checked first, so the error names the flag)."""
    for key, value in (flags or {}).items():
        if value is not None:
            check_slurm_names(f"--{key}", value)
    for f in fields(la):
        value = getattr(la, f.name)
        if isinstance(value, str):
            check_line(f"launch.{f.name}", value)
    check_slurm_names("launch.partition", la.partition)
    check_slurm_names("launch.account", la.account)


def partition_account_lines(la) -> list[str]:
    """`#SBATCH` lines for the launch section's partition and account (none for what is unset)."""
    return [f"#SBATCH --{flag}={check_slurm_names(f'launch.{flag}', value)}"
            for flag, value in (("partition", la.partition), ("account", la.account)) if value]


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
    run_dir_origin: str = "run directory"  # what errors call the run directory ("--run-dir" when given)

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
        check_launch(cfg.launch, {"partition": partition, "account": account})
        path = Path(run_dir) if run_dir else Path("runs") / check_word("name", cfg.name, NAME_USE)
        return cls(cfg=cfg, run_dir=path.absolute(), template=template,
                   run_dir_origin="--run-dir" if run_dir else "run directory")

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
        """Every value the template gets, each checked against the rule for where it goes (the errors name
        the config key or flag); `render` then refuses a control character in any of them."""
        la = self.launch
        check_launch(la)
        name = check_word("name", self.cfg.name, NAME_USE)
        limit = parse_time(la.time, "launch.time")
        if la.signal_grace_s >= limit:
            raise UserError(f"launch.signal_grace_s = {la.signal_grace_s} is not shorter than the time limit "
                            f"{la.time}: the job would be signalled before it starts working")
        run_dir = check_word(self.run_dir_origin, str(self.run_dir), PATH_USE)
        workdir = check_word("working directory", str(self.workdir.absolute()), PATH_USE)
        bin_dir = check_line("the Python environment's bin directory", python_bin_dir())
        resources = []
        if la.gpus_per_node:
            resources.append(f"#SBATCH --gpus-per-node={la.gpus_per_node}")
        if la.cpus_per_node:
            resources.append(f"#SBATCH --cpus-per-task={la.cpus_per_node}  # CPUs for the node's torchrun agent")
        resources += partition_account_lines(la)
        requeue = ("#SBATCH --requeue" if not chain else
                   f"#SBATCH --no-requeue  # --chain {chain}: each job of the chain resumes; no requeue")
        train = check_line("the train command", self.train_command or TRAIN_COMMAND)
        return {
            "name": name, "job_name": name, "script": self.script_path,
            "nodes": la.nodes, "time": la.time, "signal_grace_s": la.signal_grace_s,
            "gpus_per_node": la.gpus_per_node, "procs_per_node": self.procs_per_node, "port": la.port,
            "max_restarts": la.max_restarts, "requeue": 0 if chain else 1,
            # torchrun's wait for its workers must end before the time limit, leaving time to requeue
            "stop_timeout": max(5, la.signal_grace_s - 15),
            "sbatch_resources": Lines(tuple(resources)) if resources else NO_RESOURCES,
            "sbatch_requeue": requeue,
            "run_dir": run_dir, "run_dir_q": shlex.quote(run_dir),
            "workdir": workdir, "bin_dir_q": shlex.quote(bin_dir),
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

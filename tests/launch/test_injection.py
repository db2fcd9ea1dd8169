"""Config values and flags cannot inject shell commands (or #SBATCH lines) into the rendered job scripts.

A value that would end its line (a newline in `launch.partition`, `name`, `data.out`, ...) or break an
unquoted `#SBATCH` line is refused with one line naming the key or flag, before anything is written or
submitted; a value that is legitimately odd (a data source with spaces, quotes, `$HOME`) is shell-quoted and
arrives intact, which the tests show by running the rendered lines in bash with `loopstack` stubbed out.
No SLURM needed: the sbatch/squeue/scontrol/scancel on PATH are stubs that record any call.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from launch.templating import Lines, render
from loopstack.errors import UserError
from tests.launch.helpers import ROOT, SMOKE, cli_env, loopstack

CONFIG = str(ROOT / SMOKE)


def yaml_value(value) -> str:
    """A `--set` value that YAML reads back as exactly `value` (JSON is YAML; escapes like \\n survive)."""
    return json.dumps(value)


@pytest.fixture
def sandbox(tmp_path):
    """(work dir to run the CLI from, env with stub SLURM clients, file the stubs log to, marker path).

    The marker is what the injected commands would create: it must never exist."""
    work, stubs = tmp_path / "work", tmp_path / "stubs"
    work.mkdir()
    stubs.mkdir()
    calls = tmp_path / "slurm-calls"
    for tool in ("sbatch", "squeue", "scontrol", "scancel"):
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >>{calls}\nexit 1\n')
        stub.chmod(0o755)
    env = {**cli_env(), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return work, env, calls, tmp_path / "pwned"


def refused(sandbox, *args: str) -> str:
    """Run the CLI as submitted for real and as --dry-run; both must refuse in one line, exit 2, touch nothing.
    Returns the error line."""
    work, env, calls, marker = sandbox
    lines = []
    for dry in ([], ["--dry-run"]):
        proc = loopstack("launch", *args, *dry, check=False, cwd=work, env=env)
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("loopstack: error: "), proc.stderr
        assert proc.stdout == "", proc.stdout  # not even a --dry-run script
        lines.append(err[0])
    assert list(work.iterdir()) == [], "something was written"  # no runs/<name>/, no launch/ files
    assert not calls.exists(), f"a SLURM client was called: {calls.read_text()}"
    assert not marker.exists()
    assert lines[0] == lines[1]
    return lines[0]


def payload(marker) -> str:
    return f"\ntouch {marker}"


# (extra arguments, the key or flag the error must name, the bad value it must show)
TRAIN_CASES = {
    "partition flag": lambda m: (["--partition", "gpu" + payload(m)], "--partition", "gpu" + payload(m)),
    "partition key": lambda m: (["--set", f"launch.partition={yaml_value('gpu' + payload(m))}"],
                                "launch.partition", "gpu" + payload(m)),
    "partition shell chars": lambda m: (["--set", f"launch.partition=gpu;touch {m}"], "launch.partition",
                                        f"gpu;touch {m}"),
    "account flag": lambda m: (["--account", "proj" + payload(m)], "--account", "proj" + payload(m)),
    "account key": lambda m: (["--set", f"launch.account={yaml_value('proj' + payload(m))}"],
                              "launch.account", "proj" + payload(m)),
    "account carriage return": lambda m: (["--set", f"launch.account={yaml_value('p' + chr(13) + 'x')}"],
                                          "launch.account", "p\rx"),
    "name newline": lambda m: (["--set", f"name={yaml_value('run' + payload(m))}"], "name", "run" + payload(m)),
    "name substitution": lambda m: (["--set", f"name=run$(touch {m})"], "name", f"run$(touch {m})"),
    "name line separator": lambda m: (["--set", f"name={yaml_value('run' + chr(0x2028) + 'x')}"], "name",
                                      "run\u2028x"),
    "time flag": lambda m: (["--time", "01:00:00" + payload(m)], "--time", "01:00:00" + payload(m)),
    "time key": lambda m: (["--set", f"launch.time={yaml_value('01:00:00' + payload(m))}"], "launch.time",
                           "01:00:00" + payload(m)),
    "time trailing newline": lambda m: (["--set", f"launch.time={yaml_value('01:00:00' + chr(10))}"],
                                        "launch.time", "01:00:00\n"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_slurm_refuses_injection(sandbox, case):
    args, key, value = TRAIN_CASES[case](sandbox[3])
    line = refused(sandbox, "slurm", CONFIG, *args)
    assert f"error: {key} {value!r}: " in line, line


def test_slurm_refuses_run_dir_with_newline(sandbox, tmp_path):
    run_dir = f"{tmp_path}/run{payload(sandbox[3])}"
    line = refused(sandbox, "slurm", CONFIG, "--run-dir", run_dir)
    assert f"error: --run-dir {run_dir!r}: " in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stubs", "work"]


@pytest.mark.parametrize("bad", ["#x", "%j", "a'b", 'a"b', "a\\b", "a$HOME", "a b"])
def test_slurm_refuses_run_dir_sbatch_cannot_carry(sandbox, tmp_path, bad):
    """#SBATCH --output/--chdir are not shell-quoted: sbatch eats quotes and backslashes, '#' starts a comment,
    whitespace ends the option, '%' is a filename pattern."""
    run_dir = f"{tmp_path}/{bad}"
    line = refused(sandbox, "slurm", CONFIG, "--run-dir", run_dir)
    assert f"error: --run-dir {run_dir!r}: contains " in line, line


def test_slurm_refuses_working_directory_with_newline(sandbox, tmp_path):
    work, env, calls, marker = sandbox
    odd = tmp_path / "wd\nx"
    odd.mkdir()
    proc = loopstack("launch", "slurm", CONFIG, "--run-dir", str(tmp_path / "run"), "--dry-run", check=False,
                     cwd=odd, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"loopstack: error: working directory {str(odd)!r}: contains the "
                                                f"control character '\\n', which would end its line in the job "
                                                f"script (and could start a command there)"]


DATA_CASES = {
    "source": lambda m: (["--set", f"data.sources={yaml_value(['stdlib:json/*.py', 'x' + payload(m)])}"],
                         "data.sources[1]", "x" + payload(m)),
    "tokenizer dir": lambda m: (["--set", f"tokenizer.dir={yaml_value('tok' + payload(m))}"], "tokenizer.dir",
                                "tok" + payload(m)),
    "out": lambda m: (["--set", f"data.out={yaml_value('shards' + payload(m))}"], "data.out",
                      "shards" + payload(m)),
    "out tab": lambda m: (["--set", f"data.out={yaml_value('a' + chr(9) + 'b')}"], "data.out", "a\tb"),
    "partition flag": lambda m: (["--partition", "cpu" + payload(m)], "--partition", "cpu" + payload(m)),
    "partition key": lambda m: (["--set", f"launch.partition={yaml_value('cpu' + payload(m))}"],
                                "launch.partition", "cpu" + payload(m)),
    "account flag": lambda m: (["--account", "p" + payload(m)], "--account", "p" + payload(m)),
    "name": lambda m: (["--set", f"name={yaml_value('d' + payload(m))}"], "name", "d" + payload(m)),
    "time flag": lambda m: (["--time", "04:00:00" + payload(m)], "--time", "04:00:00" + payload(m)),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_slurm_data_refuses_injection(sandbox, case):
    args, key, value = DATA_CASES[case](sandbox[3])
    line = refused(sandbox, "slurm-data", CONFIG, "--tasks", "2", *args)
    assert f"error: {key} {value!r}: " in line, line


def test_slurm_data_refuses_run_dir_with_newline(sandbox, tmp_path):
    run_dir = f"{tmp_path}/data{payload(sandbox[3])}"
    line = refused(sandbox, "slurm-data", CONFIG, "--tasks", "2", "--run-dir", run_dir)
    assert f"error: --run-dir {run_dir!r}: " in line, line


def test_legitimate_values_are_accepted(sandbox, tmp_path):
    work, env, calls, _ = sandbox
    out = loopstack("launch", "slurm", CONFIG, "--partition", "gpu,gpu-long.v2", "--account", "proj_42",
                    "--set", "name=lr=3e-4,bs@1k:v1.2+x", "--run-dir", str(tmp_path / "runs" / "é-1"),
                    "--dry-run", cwd=work, env=env).stdout
    assert "#SBATCH --partition=gpu,gpu-long.v2\n#SBATCH --account=proj_42\n" in out
    assert "#SBATCH --job-name=lr=3e-4,bs@1k:v1.2+x\n" in out
    assert f"#SBATCH --output={tmp_path}/runs/é-1/launch/logs/slurm-%j.out\n" in out
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


# --- odd but legitimate values arrive intact -------------------------------------------------------------
STUB = r'''
loopstack() {  # the real one is never run: record the arguments, one per NUL-terminated field
    printf '%s\0' "$@" >>"$ARGS_FILE"
}
export -f loopstack
'''


def run_script(script: str, tmp_path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a rendered job script in bash with `loopstack` stubbed; (process, the argument lists it got)."""
    path = tmp_path / "job.sh"
    path.write_text(script)
    args_file = tmp_path / "args"
    proc = subprocess.run(["bash", "-c", STUB + f'bash {path} "$@"', "job"], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "ARGS_FILE": str(args_file)}, timeout=60)
    raw = args_file.read_bytes().decode() if args_file.exists() else ""
    fields = raw.split("\0")[:-1]
    calls, current = [], []
    for f in fields:  # every call starts with "data"
        if f == "data" and current:
            calls.append(current)
            current = []
        current.append(f)
    return proc, calls + ([current] if current else [])


def test_odd_data_values_are_quoted_and_arrive_intact(sandbox, tmp_path):
    work, env, calls, marker = sandbox
    sources = ["stdlib:json/*.py", "my corpus/it's a file.txt", "$HOME/data/*.jsonl", f"'; touch {marker}; '",
               f"`touch {marker}`", f'"$(touch {marker})"', "name=path with spaces#text", "\\back\\slash"]
    tokenizer = f"tok dir/$(touch {marker})"
    out = f"out 'q' \"dq\" $(touch {marker}) ${{HOME}} *"
    run_dir = tmp_path / "data-run"
    text = loopstack("launch", "slurm-data", CONFIG, "--tasks", "2", "--run-dir", str(run_dir),
                     "--set", f"data.sources={yaml_value(sources)}", "--set", f"tokenizer.dir={yaml_value(tokenizer)}",
                     "--set", f"data.out={yaml_value(out)}", "--dry-run", cwd=work, env=env).stdout
    prepare, merge = ("#!/bin/bash" + s.split("# submit:")[0] for s in text.split("#!/bin/bash")[1:])
    for script in (prepare, merge):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    (run_dir / "launch").mkdir(parents=True)
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_ID": "8", "SLURM_CPUS_PER_TASK": "3"}

    proc, got = run_script(prepare, tmp_path, {**env, **slurm})
    assert proc.returncode == 0, proc.stderr
    expected = ["data", "prepare", "--config", f"{run_dir}/launch/config.yaml"]
    for s in sources:
        expected += ["--source", s]
    expected += ["--tokenizer", tokenizer, "--out", out, "--workers", "3", "--slice", "1/2"]
    assert got == [expected]

    proc, got = run_script(merge, tmp_path, {**env, **slurm})
    assert proc.returncode == 0, proc.stderr
    assert got[-1] == ["data", "merge", out]
    assert f"merging the partial manifests of {out}\n" in proc.stdout  # the echo line: $OUT, not re-evaluated
    assert not marker.exists(), "an injected command ran"
    events = [json.loads(line)["event"] for line in (run_dir / "launch" / "events.jsonl").read_text().splitlines()]
    assert events == ["task_start", "task_done", "merge_start", "merged"]


# --- render() itself: no template, shipped or --template copy, can get a multi-line value -----------------
def test_render_refuses_any_control_character():
    with pytest.raises(UserError, match=r"the value of \{\{v\}\} 'a\\nb': contains the control character"):
        render("x={{v}}\n", {"v": "a\nb"}, "t.sbatch")
    for bad in ("a\rb", "a\x1bb", "a\x00b", "a\u2029b", "a\u202eb", "a\x85b"):
        with pytest.raises(UserError):
            render("# {{v}}\n", {"v": bad})
    with pytest.raises(UserError, match=r"\{\{res\}\} '#SBATCH --qos=x\\nrm': "):
        render("{{res}}\n", {"res": Lines(("#SBATCH -N1", "#SBATCH --qos=x\nrm"))})
    assert render("{{res}}\n{{n}}\n", {"res": Lines(("a", "b")), "n": 3}) == "a\nb\n3\n"
    assert render("{{c}}", {"c": Lines(("x", "y"), sep=" \\\n  ")}) == "x \\\n  y"


def test_user_template_gets_only_checked_values(sandbox, tmp_path):
    """A --template copy that puts values on shell lines (unquoted) still cannot be injected into."""
    work, env, calls, marker = sandbox
    mine = tmp_path / "mine.sbatch"
    mine.write_text("#!/bin/bash\n#SBATCH --job-name={{job_name}}\n{{sbatch_resources}}\necho {{name}} {{time}}\n")
    proc = loopstack("launch", "slurm", CONFIG, "--template", str(mine), "--run-dir", str(tmp_path / "r"),
                     "--set", f"launch.partition={yaml_value('gpu' + payload(marker))}", "--dry-run",
                     check=False, cwd=work, env=env)
    assert proc.returncode == 2 and "launch.partition" in proc.stderr and proc.stdout == ""

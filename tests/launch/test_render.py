"""Rendering without submitting: the scripts say what the flags asked, errors are one line (no SLURM needed)."""

import json
import os
import re
import subprocess
import sys

import pytest

from launch.journal import append_event, launch_dir, read_events
from launch.status import format_status, status
from tests.launch.helpers import ROOT, SMOKE, loopstack


def sbatch_options(script: str) -> dict[str, str]:
    """`#SBATCH --key=value  # comment` lines -> {key: value} ('' for flags)."""
    out = {}
    for line in script.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def shell_vars(script: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)=(\S*)", script, flags=re.M))


def torchrun_args(script: str) -> dict[str, str]:
    block = script[script.index("torchrun \\"):script.index("--no-python")]
    return dict(re.findall(r"--([\w-]+) (\S+)", block))


def bash_syntax_ok(script: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_multinode_gpu_matches_flags(tmp_path):
    run_dir = tmp_path / "mn"
    out = loopstack("launch", "slurm", "configs/multinode-1b.yaml", "--nodes", "4", "--gpus-per-node", "8",
                    "--time", "12:30:00", "--partition", "gpu", "--account", "proj42", "--run-dir", str(run_dir),
                    "--set", "launch.signal_grace_s=300", "--set", "launch.port=29777",
                    "--set", "launch.cpus_per_node=64", "--dry-run").stdout
    opts = sbatch_options(out)
    assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "1"
    assert opts["gpus-per-node"] == "8" and opts["cpus-per-task"] == "64"
    assert opts["time"] == "12:30:00" and opts["partition"] == "gpu" and opts["account"] == "proj42"
    assert opts["signal"] == "B:USR1@300" and "requeue" in opts and opts["open-mode"] == "append"
    assert opts["output"] == f"{run_dir}/launch/logs/slurm-%j.out" and opts["chdir"] == str(ROOT)
    var = shell_vars(out)
    assert var["GPUS_PER_NODE"] == "8" and var["PROCS_PER_NODE"] == "8" and var["RDZV_PORT"] == "29777"
    assert var["REQUEUE"] == "1" and var["MAX_RESTARTS"] == "20" and var["RUN_DIR"] == str(run_dir)
    assert 0 < int(var["STOP_TIMEOUT"]) < 300  # workers get most of the grace to checkpoint, the shell the rest
    tr = torchrun_args(out)
    assert tr["nnodes"] == '"$SLURM_NNODES"' and tr["nproc-per-node"] == '"$PROCS_PER_NODE"'
    assert tr["rdzv-backend"] == "c10d" and tr["rdzv-endpoint"] == '"$HEAD_NODE:$RDZV_PORT"'
    assert tr["rdzv-id"] == '"$SLURM_JOB_ID"' and tr["max-restarts"] == "0"
    assert "SIGUSR1" in tr["signals-to-handle"]
    assert 'python -m launch.exitcode "$EXIT_FILE" train "$CONFIG" --run-dir "$RUN_DIR" --resume auto' in out
    assert "srun " in out and "--ntasks-per-node=1" in out and "scontrol requeue" in out
    assert "NCCL_DEBUG" in out and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in out and "OMP_NUM_THREADS" in out
    assert out.rstrip().splitlines()[-1] == f"# submit: sbatch {run_dir}/launch/train.sbatch"
    bash_syntax_ok(out)
    assert not run_dir.exists()  # --dry-run writes nothing


def test_dry_run_cpu_only_uses_procs_per_node_and_config_defaults(tmp_path):
    out = loopstack("launch", "slurm", SMOKE, "--run-dir", str(tmp_path / "r"), "--set", "launch.procs_per_node=3",
                    "--dry-run").stdout
    opts = sbatch_options(out)
    assert "gpus-per-node" not in opts and "partition" not in opts and "account" not in opts
    assert opts["nodes"] == "1" and opts["time"] == "01:00:00"  # the config's launch section
    var = shell_vars(out)
    assert var["GPUS_PER_NODE"] == "0" and var["PROCS_PER_NODE"] == "3"
    assert 'export CUDA_VISIBLE_DEVICES=""' in out
    bash_syntax_ok(out)


def test_dry_run_chain_has_no_requeue(tmp_path):
    out = loopstack("launch", "slurm", SMOKE, "--run-dir", str(tmp_path / "r"), "--chain", "3", "--dry-run").stdout
    opts = sbatch_options(out)
    assert "no-requeue" in opts and "requeue" not in opts
    assert shell_vars(out)["REQUEUE"] == "0"
    submits = [line for line in out.splitlines() if line.startswith("# submit:")]
    assert len(submits) == 3 and all("--dependency=afterany:" in s for s in submits[1:])


def test_user_template_copy_is_rendered(tmp_path):
    template = (ROOT / "launch" / "templates" / "train.sbatch").read_text()
    mine = tmp_path / "mine.sbatch"
    mine.write_text(template.replace("#SBATCH --open-mode=append", "#SBATCH --open-mode=append\n#SBATCH --qos=high"))
    out = loopstack("launch", "slurm", SMOKE, "--run-dir", str(tmp_path / "r"), "--template", str(mine),
                    "--dry-run").stdout
    assert sbatch_options(out)["qos"] == "high"


@pytest.mark.parametrize("args, message", [
    (["--time", "90 minutes"], "--time '90 minutes': expected HH:MM:SS"),
    (["--time", "00:01:00"], "launch.signal_grace_s = 120 is not shorter than the time limit"),
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--set", "launch.nodez=2"], "unknown key 'launch.nodez'"),
    (["--run-dir", "/tmp/has space"], "--run-dir '/tmp/has space': contains whitespace"),
    (["--set", "launch.partition=gpu;reboot"], "launch.partition 'gpu;reboot': expected a SLURM name"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    proc = loopstack("launch", "slurm", SMOKE, "--dry-run", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopstack: error:") and message in lines[0], proc.stderr


def test_template_with_unknown_placeholder_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/bin/bash\n#SBATCH --nodes={{nodez}}\n")
    proc = loopstack("launch", "slurm", SMOKE, "--template", str(bad), "--dry-run", check=False)
    assert proc.returncode == 2 and "unknown placeholder(s) {{nodez}}" in proc.stderr


def test_slurm_data_dry_run(tmp_path):
    out = loopstack("launch", "slurm-data", SMOKE, "--tasks", "4", "--cpus-per-task", "2", "--partition", "cpu",
                    "--run-dir", str(tmp_path / "d"), "--dry-run").stdout
    prepare, merge = out.split("#!/bin/bash")[1:]
    p = sbatch_options(prepare)
    assert p["array"] == "0-3" and p["cpus-per-task"] == "2" and p["partition"] == "cpu" and "requeue" in p
    assert p["output"].endswith("/launch/logs/prepare-%A_%a.out")
    command = " ".join(prepare[prepare.index("\nloopstack data prepare"):prepare.index("RC=$?")].split("\\\n"))
    assert " ".join(command.split()) == (
        "loopstack data prepare --config \"$RUN_DIR/launch/config.yaml\" --source 'stdlib:json/*.py' "
        "--source 'stdlib:email/*.py' --tokenizer data/smoke/tokenizer --out data/smoke/shards "
        "--workers \"$WORKERS\" --slice \"$SLICE/$TASKS\"")
    assert "loopstack data merge data/smoke/shards" in merge and sbatch_options(merge)["partition"] == "cpu"
    assert "--dependency=afterok:<array job>" in out
    for script in (prepare, merge):
        bash_syntax_ok("#!/bin/bash" + script.split("# submit:")[0])
    only = loopstack("launch", "slurm-data", SMOKE, "--tasks", "4", "--only", "1,3", "--dry-run").stdout
    assert sbatch_options(only)["array"] == "1,3"
    bad = loopstack("launch", "slurm-data", SMOKE, "--tasks", "4", "--only", "4", "--dry-run", check=False)
    assert bad.returncode == 2 and "slice indices must be in 0..3" in bad.stderr


def test_local_dry_run_two_agents_share_one_c10d_endpoint():
    out = loopstack("launch", "local", SMOKE, "--nnodes", "2", "--nproc-per-node", "2", "--port", "29123",
                    "--dry-run").stdout
    agents = [line for line in out.splitlines() if "torchrun" in line]
    assert len(agents) == 2
    for line in agents:
        assert "--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29123" in line
        assert "train configs/smoke-cpu.yaml --resume auto" in line and "CUDA_VISIBLE_DEVICES=''" in line


def test_status_reads_the_journal(tmp_path):
    run = tmp_path / "run"
    append_event(run, "submit", job_ids=["11"], mode="requeue")
    with open(launch_dir(run) / "events.jsonl", "a") as f:
        for e in ({"job_id": "11", "restart": 0, "event": "start", "log": "a.log"},
                  {"job_id": "11", "restart": 0, "event": "signal", "signal": "USR1"},
                  {"job_id": "11", "restart": 0, "event": "requeue"},
                  {"job_id": "11", "restart": 1, "event": "start", "log": "b.log"}):
            f.write(json.dumps(e) + "\n")
        f.write('{"job_id": "11", "ev')  # a torn last line (crash mid-write) is skipped
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 2.5}\n{"step": 8, "loss": 2.25}\n{"st')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("5\n")
    info = status(run, live=False)
    assert info["state"] == "RUNNING" and info["restarts"] == 1 and info["job_ids"] == ["11"]
    assert info["last_step"] == 8 and info["last_loss"] == 2.25 and info["last_checkpoint"] == "5"
    text = format_status(info)
    assert "last checkpoint  checkpoints/5" in text and "b.log" in text
    with open(launch_dir(run) / "events.jsonl", "a") as f:
        f.write("\n" + json.dumps({"job_id": "11", "restart": 1, "event": "finished"}) + "\n")
    assert status(run, live=False)["state"] == "COMPLETED"
    proc = loopstack("launch", "status", str(run), "--json", "--no-slurm")
    assert json.loads(proc.stdout)["state"] == "COMPLETED"
    missing = loopstack("launch", "status", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and "no such run directory" in missing.stderr


def test_launch_cli_import_is_light():
    code = ("import sys, argparse; import launch.cli as c; p = argparse.ArgumentParser(); "
            "c.register(p.add_subparsers()); "
            "heavy = [m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- the decide section of train.sbatch, run in bash with srun/scontrol/scancel stubbed (no SLURM) ----------
SLURM_STUBS = r'''
srun() {  # stands for srun + torchrun + the trainer: rank 0 writes $STUB_RC to the exit file
    local exit_file=""
    while [ $# -gt 0 ]; do [ "$1" = launch.exitcode ] && exit_file=$2; shift; done
    if [ -n "$STUB_SIGNAL" ]; then  # like SLURM before the time limit: USR1 to the batch shell, mid-training
        trap 'echo "$STUB_RC" >"$exit_file"; exit 1' USR1
        sleep 0.5; kill -USR1 $$
        while :; do sleep 0.1; done
    fi
    echo "$STUB_RC" >"$exit_file"
    [ "$STUB_RC" = 0 ]  # torchrun: 0, or 1 for any failing worker
}
scontrol() {
    case "$1 $2" in
        "show hostnames") echo node1 ;;
        "show job") echo "JobId=$SLURM_JOB_ID JobState=RUNNING Restarts=0" ;;
        *) echo "scontrol $*" >>"$CALLS" ;;
    esac
}
scancel() { echo "scancel $*" >>"$CALLS"; }
export -f srun scontrol scancel
'''


@pytest.mark.parametrize("trainer_rc, signal, event, job_rc", [
    ("3", "", "diverged", 3),
    ("3", "1", "diverged", 3),  # diverged while stopping: still never requeued
    ("74", "", "no_space", 74),
    ("74", "1", "no_space", 74),
    ("75", "1", "requeue", 0),
    ("2", "", "failed", 1),
    ("0", "", "finished", 0),
])
def test_train_script_decides_on_rank0_exit_code(tmp_path, trainer_rc, signal, event, job_rc):
    run = tmp_path / "run"
    script = loopstack("launch", "slurm", SMOKE, "--run-dir", str(run), "--dry-run").stdout.split("# submit:")[0]
    (tmp_path / "train.sbatch").write_text(script)
    calls = tmp_path / "calls"
    env = {**os.environ, "STUB_RC": trainer_rc, "STUB_SIGNAL": signal, "CALLS": str(calls), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}
    proc = subprocess.run(["bash", "-c", SLURM_STUBS + f"bash {tmp_path / 'train.sbatch'}"], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == job_rc, proc.stdout + proc.stderr
    names = [e["event"] for e in read_events(run)]
    assert names == ["start"] + (["signal"] if signal else []) + ["exit", event], proc.stdout
    requeued = calls.exists() and "scontrol requeue 42" in calls.read_text()
    assert requeued == (event == "requeue")
    if event in ("diverged", "no_space"):
        assert f"(rank 0 exit {trainer_rc}): not requeueing" in proc.stdout
        assert status(run, live=False)["state"] == {"diverged": "DIVERGED", "no_space": "NO_SPACE"}[event]

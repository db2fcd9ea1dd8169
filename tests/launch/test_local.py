"""`launch local`: two torchrun agents on this machine rendezvous (c10d, 127.0.0.1) like two nodes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

from launch.local import run_agents
from tests.launch.helpers import ROOT, SMOKE, cli_env, last_step, port, wait_for

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    record = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    record["sum"] = total.item()
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
""")


def test_two_agents_form_one_world(tmp_path):
    """--nnodes 2 --nproc-per-node 2: node ranks 0 and 1, global ranks 0..3, one gloo group across both."""
    (tmp_path / "probe.py").write_text(PROBE)
    code = run_agents(2, 2, port(), [sys.executable, str(tmp_path / "probe.py"), str(tmp_path)])
    assert code == 0
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(int(r["GROUP_RANK"]), int(r["LOCAL_RANK"])) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["WORLD_SIZE"] for r in records} == {"4"} and all(r["sum"] == 6.0 for r in records)
    assert len({r["TORCHELASTIC_RUN_ID"] for r in records}) == 1  # one rendezvous, not two worlds of 2


def test_two_agent_training_stops_on_usr1_and_resumes(smoke_data, tmp_path):
    """The real trainer on 2 "nodes" x 1 process: SIGUSR1 to `launch local` -> torchrun forwards it -> every rank
    checkpoints -> exit 75; the rerun resumes from that checkpoint and finishes."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "loopstack.cli", "launch", "local", SMOKE, "--nnodes", "2", "--nproc-per-node", "1",
            "--port", str(port()), "--run-dir", str(run), "--set", "train.steps=120", "--set", "checkpoint.every=50"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    try:
        wait_for(lambda: last_step(run) >= 5 or proc.poll() is not None, 180, "two-agent training to start",
                 interval=0.1, on_timeout=lambda: (tmp_path / "first.log").read_text()[-3000:])
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (tmp_path / "first.log").read_text()
    stopped = int((run / "checkpoints" / "latest").read_text())
    assert 5 <= stopped < 120, first[-3000:]
    meta = json.loads((run / "checkpoints" / str(stopped) / "COMPLETE").read_text())
    assert meta["world_size"] == 2 and meta["dp"] == 2  # both agents' workers trained one model
    assert "[node0]" in first and "[node1]" in first

    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = f"resumed from {run / 'checkpoints' / str(stopped)} at step {stopped}"
    assert resumed in second.stdout, second.stdout[-3000:]
    assert last_step(run) == 120

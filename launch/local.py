"""`loopstack launch local`: N torchrun agents on this machine that rendezvous like N nodes.

Each agent is a separate `torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`
process, exactly what one node of a multi-node job runs, so the multi-node paths (c10d rendezvous,
node ranks, cross-node process groups) are exercised without a cluster. CPU (gloo) by default; with
`--gpus` each agent gets its own slice of the GPUs (CUDA_VISIBLE_DEVICES), like separate nodes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loopstack.errors import EXIT_REQUEUE, UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
FAIL_GRACE_S = 30  # after one agent fails, the others get this long before they are terminated


def torchrun_command(nnodes: int, nproc_per_node: int, port: int, rdzv_id: str, command: list[str],
                     host: str = "127.0.0.1", stop_timeout: int = 60) -> list[str]:
    """One node's agent: the same flags the SLURM script gives torchrun, with the rendezvous on `host`."""
    return [
        _torchrun(), "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", rdzv_id,
        "--local-addr", host, "--max-restarts", "0",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", str(stop_timeout),
        "--no-python", *command,
    ]


def _torchrun() -> str:
    beside = Path(sys.executable).parent / "torchrun"  # the torchrun of the environment running loopstack
    found = str(beside) if beside.exists() else shutil.which("torchrun")
    if not found:
        raise UserError("torchrun not found: install torch in this environment")
    return found


def _loopstack() -> str:
    beside = Path(sys.executable).parent / "loopstack"
    return str(beside) if beside.exists() else "loopstack"


def train_command(config: str, overrides: list[str], run_dir: str | None, resume: str) -> list[str]:
    cmd = [_loopstack(), "train", config]
    for o in overrides:
        cmd += ["--set", o]
    if run_dir:
        cmd += ["--run-dir", run_dir]
    return cmd + ["--resume", resume]


def agent_envs(nnodes: int, nproc_per_node: int, gpus: bool) -> list[dict[str, str]]:
    """Per-agent environment: threads split across all workers; GPUs (if asked) split across agents."""
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // (nnodes * nproc_per_node))
    envs = []
    for node in range(nnodes):
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)), "PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * nproc_per_node + i) for i in range(nproc_per_node))
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        envs.append(env)
    return envs


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.buffer.flush()


def run_agents(nnodes: int, nproc_per_node: int, port: int, command: list[str], *, gpus: bool = False,
               rdzv_id: str | None = None, stop_timeout: int = 60) -> int:
    """Start the agents, relay their output prefixed with `[node i]`, forward stop signals, return one code.

    0 when every agent exits 0; 75 (requeue) when we forwarded a stop signal and they exited after it;
    otherwise the first failing agent's code.
    """
    rdzv_id = rdzv_id or f"local-{os.getpid()}"
    cmd = torchrun_command(nnodes, nproc_per_node, port, rdzv_id, command, stop_timeout=stop_timeout)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        for node, env in enumerate(agent_envs(nnodes, nproc_per_node, gpus)):
            p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[node{node}] "), daemon=True)
            t.start()
            pumps.append(t)
        first_failure: int | None = None
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            codes = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if codes and failed_at is None:
                first_failure, failed_at = codes[0], time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAIL_GRACE_S:
                for p in procs:  # a peer of a failed agent would wait in the rendezvous for minutes
                    if p.poll() is None:
                        p.terminate()
                failed_at = float("inf")
            time.sleep(0.2)
        for t in pumps:
            t.join(timeout=5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    if received:
        return EXIT_REQUEUE
    return first_failure if first_failure is not None else next(c for c in codes if c != 0)


def describe(nnodes: int, nproc_per_node: int, port: int, command: list[str], gpus: bool = False) -> str:
    """What --dry-run prints: each agent's environment and command line."""
    cmd = torchrun_command(nnodes, nproc_per_node, port, "local-<pid>", command)
    lines = []
    for node, env in enumerate(agent_envs(nnodes, nproc_per_node, gpus)):
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        lines.append(f"# node {node}\n{prefix} {shlex.join(cmd)} &")
    return "\n".join(lines) + "\nwait\n"

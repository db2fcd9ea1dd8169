"""Run a function in N real processes (gloo on CPU): the harness for every distributed test.

    def _body(env_args):               # module-level, so spawned processes can import it
        ...
        return something_picklable

    results = run_distributed(_body, world_size=2, args=(...,))   # one result per rank, in rank order

Each process gets torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on
a free port). A rank that raises makes the call fail with every failing rank's traceback; a hang is
killed after `timeout` seconds and reported with the ranks that had not finished.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, env: dict, results: mp.Queue) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **env})
    try:
        import torch

        torch.set_num_threads(1)
        out = fn(*args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            from pretrain.distributed import shutdown

            if dist.is_initialized():
                shutdown()
        except Exception:
            pass


def run_distributed(fn: Callable, world_size: int, args: tuple = (), timeout: float = 240.0,
                    env: dict[str, str] | None = None) -> list[Any]:
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, env or {}, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
                outcome[rank] = (status, value)
                if status == "error":  # peers of a failed rank would only hang: give them a moment
                    deadline = min(deadline, time.monotonic() + 15)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        for r in dead:
                            outcome[r] = ("error", f"rank {r} died with exit code {procs[r].exitcode}")
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcome]
    if missing:
        errors.append(f"ranks {missing} did not finish within {timeout:.0f} s (hang or deadlock)")
    if errors:
        raise AssertionError(f"distributed run of {fn.__name__} on {world_size} processes failed:\n"
                             + "\n".join(errors))
    return [outcome[r][1] for r in range(world_size)]

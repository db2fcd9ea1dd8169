"""What `loopstack env` prints: versions, accelerators, and the launcher variables this process sees."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ["torch", "deepspeed", "megatron-core", "datasets", "sentencepiece", "pyarrow", "wandb", "numpy"]
LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NNODES", "SLURM_NODEID",
               "SLURM_PROCID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST", "CUDA_VISIBLE_DEVICES"]


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def environment_report() -> list[tuple[str, str]]:
    from loopstack import __version__

    rows = [("loopstack", __version__), ("python", f"{sys.version.split()[0]} ({sys.executable})"),
            ("platform", platform.platform()), ("cpus", str(os.cpu_count()))]
    rows += [(pkg, _version(pkg)) for pkg in PACKAGES]
    try:
        import torch
    except ImportError:
        rows.append(("accelerator", "torch missing"))
    else:
        if torch.cuda.is_available():
            rows.append(("cuda", f"{torch.version.cuda} ({torch.cuda.device_count()} devices)"))
            try:
                rows.append(("nccl", ".".join(map(str, torch.cuda.nccl.version()))))
            except Exception as err:  # NCCL missing from a build is worth showing, not crashing on
                rows.append(("nccl", f"unavailable ({err})"))
            for i in range(torch.cuda.device_count()):
                rows.append((f"gpu{i}", torch.cuda.get_device_name(i)))
        else:
            rows.append(("cuda", "not available (CPU only: gloo backend)"))
    seen = [(k, os.environ[k]) for k in LAUNCH_VARS if k in os.environ]
    rows += seen or [("launcher", "none seen (single process)")]
    return rows

"""Shared fixtures for trainer tests: the smoke corpus prepared once, and helpers to run `loopstack train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke-cpu.yaml")


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> list[str]:
    """`--set` flags pointing the smoke config at a tokenizer + shards prepared once per session."""
    from data_pipeline.prepare import ensure_dataset
    from pretrain.config import load_config

    base = tmp_path_factory.mktemp("smoke-data")
    flags = [f"tokenizer.dir={base}/tokenizer", f"data.out={base}/shards"]
    cfg = load_config(SMOKE, flags)
    ensure_dataset(cfg.data, cfg.tokenizer)
    return flags


def train_cmd(nproc: int, run_dir: Path, flags: list[str], *extra: str) -> list[str]:
    sets = [a for f in flags for a in ("--set", f)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "loopstack.cli", "train", SMOKE, "--run-dir", str(run_dir), *sets, *extra]


def run_train(nproc: int, run_dir: Path, flags: list[str], *extra: str, expect: int = 0,
              timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(train_cmd(nproc, run_dir, flags, *extra), capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=timeout)
    assert out.returncode == expect, f"exit {out.returncode}, want {expect}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def losses(run_dir: Path) -> dict[int, float]:
    d = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            d[r["step"]] = r["loss"]
    return d


def records(run_dir: Path) -> list[dict]:
    """The step records (those with a loss) of a run's metrics.jsonl, in file order."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

"""Shared fixtures: a small real corpus (two stdlib packages), its tokenizer and shards, made once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["stdlib:json/*.py", "stdlib:email/*.py"]  # ~25 files, 0.4 MB


def cli(*args, expect: int = 0, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `loopstack data ...` in a fresh interpreter and check its exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, "-m", "loopstack.cli", "data", *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, timeout=timeout, env=env)
    assert out.returncode == expect, f"exit {out.returncode}, want {expect}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The single `loopstack: error: ...` line of a failed command (no traceback)."""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopstack: error: "), out.stderr
    return lines[0]


def files_of(d: Path) -> dict[str, bytes]:
    """Every file of a prepared directory except the hash cache (mtimes differ by design)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".verified.json"}


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    from data_pipeline.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(SMALL, d, vocab_size=512, verbose=False)
    return d


@pytest.fixture(scope="session")
def prepared(tok_dir, tmp_path_factory) -> Path:
    """SMALL in shards of at most 50 kB (about 10 shards)."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(SMALL, tok_dir, out, workers=1, shard_mb=0.05, verbose=False)
    return out

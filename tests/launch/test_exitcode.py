"""launch.exitcode: rank 0's exit code reaches the batch shell; a peer's code stands in when rank 0 never wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, rank: str, file: Path, *args: str) -> int:
    env = dict(os.environ, RANK=rank, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "launch.exitcode", str(file), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True).returncode


def test_rank0_writes_peers_only_fill_in(tmp_path):
    file = tmp_path / "exit"
    assert _run(tmp_path, "1", file, "config", "validate", "/nonexistent.yaml") == 2
    assert file.read_text() == "2\n"  # rank 0 was killed before writing: the peer's code stands
    assert _run(tmp_path, "0", file, "--version") == 0
    assert file.read_text() == "0\n"  # rank 0's own code replaces it
    assert _run(tmp_path, "1", file, "config", "validate", "/nonexistent.yaml") == 2
    assert file.read_text() == "0\n"  # a peer never overwrites

"""Atomic file writes: every file another step reads (manifests, configs, checkpoints marks, pointers, job
scripts) is written to a temporary name in the same directory, flushed, fsynced and renamed over the target,
so a reader sees the old file or the new one, never a torn one, whatever moment a crash or kill comes."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file already written and closed, or a directory's entries (a rename in it is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

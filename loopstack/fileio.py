"""Atomic file writes: every file another step reads (manifests, configs, checkpoints marks, pointers, job
scripts) is written to a temporary name in the same directory, flushed, fsynced and renamed over the target,
so a reader sees the old file or the new one, never a torn one, whatever moment a crash or kill comes."""

from __future__ import annotations

import json
import os
from pathlib import Path

TMP_INFIX = ".tmp"  # atomic_write's temporary file: .<name>.tmp<pid>


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
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


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files atomic_write leaves in `directory` when it is killed mid-write. Only call this
    while no writer can be active there (e.g. with the run lock held). Returns what was removed."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for child in d.iterdir():
        name = child.name
        if name.startswith(".") and TMP_INFIX in name and name.rsplit(TMP_INFIX, 1)[1].isdigit() and child.is_file():
            child.unlink(missing_ok=True)
            removed.append(child)
    return removed

"""Checkpoints that a crash can never leave half-written, and the resume that trusts only complete ones.

Layout under `<run>/checkpoints/`:

    <step>/                      one complete checkpoint (DeepSpeed's files + ours)
        mp_rank_*, zero_*        DeepSpeed model / optimizer shards (its own format)
        trainer_state_rank<r>.pt our per-rank state: loader, RNGs, counters (every rank)
        COMPLETE                 JSON written last: step, world layout, config, tokenizer sha256
    latest                       text file with the newest complete step (a hint; COMPLETE decides)
    .tmp-<step>/                 a checkpoint being written (ignored, removed on the next save)

Protocol: every rank writes into `.tmp-<step>/` and fsyncs what it wrote, barrier, rank 0 writes COMPLETE
(with every file's size; fsync), renames the directory to `<step>/` (atomic on one filesystem), then
rewrites `latest` (temp + rename). A kill at any moment leaves either no `<step>/` or a complete one;
resume ignores directories without COMPLETE. A complete checkpoint whose files were damaged later (a
truncated copy, a full disk during an rsync) fails its size check: `--resume auto` then says so and takes
the next older one, an explicit `--resume PATH` stops with one line naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from loopstack.errors import UserError
from loopstack.fileio import atomic_write, fsync_path

COMPLETE = "COMPLETE"
LATEST = "latest"


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict[str, Any]


def read_complete(path: Path) -> dict | None:
    """The COMPLETE record of a checkpoint directory, or None when it is missing or unreadable."""
    try:
        return json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None


def list_complete(ckpt_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for child in ckpt_dir.iterdir():
        if child.is_dir() and child.name.isdigit():
            meta = read_complete(child)
            if meta is not None and meta.get("step") == int(child.name):
                out.append(CheckpointInfo(child, int(child.name), meta))
    return sorted(out, key=lambda c: c.step)


def damage(info: CheckpointInfo) -> str | None:
    """What is wrong with a complete checkpoint's files (missing, or not the size COMPLETE recorded), or
    None. Checkpoints written before sizes were recorded pass."""
    for name, size in sorted(info.meta.get("files", {}).items()):
        path = info.path / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path}: missing"
        if actual != size:
            return f"{path}: {actual} bytes, {COMPLETE} recorded {size}"
    return None


def find_resume(run_dir: Path, resume: str, warn: Callable[[str], None] = print) -> CheckpointInfo | None:
    """`none` -> None; `auto` -> newest intact complete checkpoint of the run (None if there is none; a
    damaged one is reported through `warn` and passed over); a path -> that checkpoint, which must be
    complete and intact."""
    if resume == "none":
        return None
    if resume == "auto":
        for info in reversed(list_complete(run_dir / "checkpoints")):
            problem = damage(info)
            if problem is None:
                return info
            warn(f"resume: skipping damaged checkpoint {info.path} ({problem})")
        return None
    path = Path(resume)
    meta = read_complete(path)
    if meta is None:
        raise UserError(f"--resume {resume}: not a complete checkpoint (no readable {COMPLETE} file)")
    info = CheckpointInfo(path, int(meta["step"]), meta)
    problem = damage(info)
    if problem is not None:
        raise UserError(f"--resume {resume}: damaged checkpoint: {problem}")
    return info


def _fsync_files(directory: Path) -> None:
    """Flush every file under `directory` from this process's host. Each rank calls it: on a shared
    filesystem a client can only flush what it wrote, and which DeepSpeed file a rank wrote is its business."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fsync_path(path)


def save_checkpoint(engine, run_dir: Path, step: int, rank_state: dict, meta: dict, *, keep_last: int,
                    keep_every: int, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it (and `write_extra(tmp_dir)`, before the COMPLETE mark).
    Returns the final checkpoint directory."""
    ckpt_dir = run_dir / "checkpoints"
    tmp_tag = f".tmp-{step}"
    tmp = ckpt_dir / tmp_tag
    rank = dist.get_rank()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crash during an earlier save of this step
            shutil.rmtree(tmp)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
    torch.save(rank_state, tmp / f"trainer_state_rank{rank}.pt")
    if write_extra is not None:
        write_extra(tmp)
    dist.barrier()  # every file exists
    _fsync_files(tmp)
    dist.barrier()  # every file is on disk
    final = ckpt_dir / str(step)
    if rank == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = dict(meta, step=step, world_size=dist.get_world_size(), time=time.time(), files=files)
        fsync_path(tmp)
        atomic_write(tmp / COMPLETE, json.dumps(record, indent=1))
        if final.exists():  # an older, complete save of the same step (a rollback re-saved it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_dir)
        atomic_write(ckpt_dir / LATEST, f"{step}\n")
        prune(ckpt_dir, keep_last=keep_last, keep_every=keep_every)
    dist.barrier()
    return final


def prune(ckpt_dir: Path, *, keep_last: int, keep_every: int) -> None:
    """Keep the newest `keep_last` complete checkpoints plus every step divisible by `keep_every`;
    remove stale temporary directories."""
    complete = list_complete(ckpt_dir)
    keep = {c.step for c in complete[-keep_last:]}
    if keep_every:
        keep |= {c.step for c in complete if c.step % keep_every == 0}
    for c in complete:
        if c.step not in keep:
            shutil.rmtree(c.path, ignore_errors=True)
    for child in ckpt_dir.iterdir():
        if child.is_dir() and child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)


def load_rank_state(info: CheckpointInfo, rank: int) -> dict:
    path = info.path / f"trainer_state_rank{rank}.pt"
    if not path.exists():
        raise UserError(f"{info.path}: no trainer state for rank {rank} (saved with world size "
                        f"{info.meta.get('world_size')})")
    return load_file(path)


# what a damaged or foreign file raises from torch.load or DeepSpeed's loader
LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)


def load_file(path: Path, mmap: bool = False) -> Any:
    """torch.load of one of our checkpoint files; a damaged file is a one-line UserError naming it."""
    try:
        return torch.load(path, weights_only=False, mmap=mmap)
    except LOAD_ERRORS as err:
        raise UserError(f"{path}: unreadable checkpoint file ({describe_error(err)})") from err


def describe_error(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__

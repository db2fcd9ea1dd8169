"""Checkpoints that a crash can never leave half-written, that a full disk never damages, that are verified
before they are trusted, and whose loading can never run code.

Layout under `<run>/checkpoints/`:

    <step>/                      one complete checkpoint (DeepSpeed's files + ours)
        mp_rank_*, zero_*        DeepSpeed model / optimizer shards (its own format)
        trainer_state_rank<r>.pt our per-rank state: loader, RNGs, counters (every rank)
        COMPLETE                 JSON written last: step, world layout, config, tokenizer sha256, and every
                                 file's size (`files`) and sha256 (`sha256`)
    latest                       text file with the newest complete step (a hint; COMPLETE decides)
    .tmp-<step>/                 a checkpoint being written (ignored, removed on the next save)

Protocol: every rank writes into `.tmp-<step>/` and fsyncs every file there; the ranks agree that every write
succeeded; the files are hashed (split across ranks, balanced by size); rank 0 writes COMPLETE (fsync),
renames the directory to `<step>/` (atomic on one filesystem), then rewrites `latest` (temp + rename). A kill
at any moment leaves either no `<step>/` or a complete one; resume ignores directories without COMPLETE.

Verification. A complete checkpoint damaged later (a truncated copy, a full disk during an rsync, a byte
flipped in place) fails its size or content check: `--resume auto` then says so and takes the next older one,
an explicit `--resume PATH` stops with one line naming the file. `find_resume` hashes collectively (every rank
a share of the files) when the process group exists, and checks sizes only before (the CLI's early check).
Checkpoints written before sha256 were recorded get the size check only. sha256 runs at about 0.7 s per GiB
and core from the page cache (one AMD EPYC core; about 1.5 GiB/s): each rank hashes its share.

Full disk. Before writing, rank 0 compares the free space of `checkpoints/` with the size of the newest
complete checkpoint (its COMPLETE records it; for the first save, an estimate from the parameter count) and
every rank stops with `NoSpaceError` (exit 74) when it does not fit. A write that fails anyway (ENOSPC,
a quota, an I/O error; torch's zip writer hides the errno) is caught where it happens, DeepSpeed's own writes
included, so no rank leaves a collective: the ranks agree on the failure, rank 0 removes `.tmp-<step>/`, and
every rank raises the same one-line `NoSpaceError`. Earlier checkpoints and `latest` are untouched.

Safe loading. Every checkpoint file, DeepSpeed's included (`pretrain.engine` gives DeepSpeed a checkpoint
engine whose `load` is `safe_load`), is read with `torch.load(weights_only=True)`: tensors, containers and
plain values, plus exactly the DeepSpeed classes its files hold (`safe_globals()`). A file that needs anything
else (a pickle that would run code) is refused in one line naming the file and the global.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from loopstack.errors import NoSpaceError, UserError
from loopstack.fileio import atomic_write, fsync_path
from pretrain.distributed import first_across_ranks, from_rank0

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


# --- verification --------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_problem(path: Path, size: int, digest: str | None) -> str | None:
    """What is wrong with one file of a complete checkpoint (missing, not its recorded size, not its recorded
    sha256), or None. `digest` None: size check only."""
    try:
        actual = path.stat().st_size
    except OSError:
        return f"{path}: missing"
    if actual != size:
        return f"{path}: {actual} bytes, {COMPLETE} recorded {size}"
    if digest is None:
        return None
    try:
        if sha256_file(path) != digest:
            return f"{path}: content differs from the sha256 {COMPLETE} recorded (damaged in place)"
    except OSError as err:
        return f"{path}: unreadable ({describe_error(err)})"
    return None


def damage(info: CheckpointInfo) -> str | None:
    """Size check of a complete checkpoint's files (missing, or not the size COMPLETE recorded), or None.
    Checkpoints written before sizes were recorded pass."""
    for name, size in sorted(info.meta.get("files", {}).items()):
        problem = _file_problem(info.path / name, size, None)
        if problem is not None:
            return problem
    return None


def _shares(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """The files split into `parts` shares of about equal bytes (largest first, to the lightest share);
    every rank computes the same split."""
    load, shares = [0] * parts, [[] for _ in range(parts)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        k = min(range(parts), key=lambda i: (load[i], i))
        load[k] += sizes[name]
        shares[k].append(name)
    return shares


def verify(info: CheckpointInfo) -> str | None:
    """Collective (every rank calls it): sizes and, where COMPLETE recorded them, sha256 of every file, each
    rank checking a share; the first problem (by file name), the same on every rank, or None."""
    files, digests = info.meta.get("files", {}), info.meta.get("sha256", {})
    mine = _shares(files, dist.get_world_size())[dist.get_rank()]
    problems = {}
    for name in mine:
        problem = _file_problem(info.path / name, files[name], digests.get(name))
        if problem is not None:
            problems[name] = problem
    everyone: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    merged = {name: p for part in everyone for name, p in part.items()}
    return merged[min(merged)] if merged else None


def find_resume(run_dir: Path, resume: str, warn: Callable[[str], None] = print) -> CheckpointInfo | None:
    """`none` -> None; `auto` -> newest intact complete checkpoint of the run (None if there is none; a
    damaged one is reported through `warn` and passed over); a path -> that checkpoint, which must be
    complete and intact. Collective when torch.distributed is initialized (every rank calls it at the same
    point): then content is checked too (`verify`); before, sizes only."""
    if resume == "none":
        return None
    check = verify if dist.is_available() and dist.is_initialized() else damage
    if resume == "auto":
        for info in reversed(list_complete(run_dir / "checkpoints")):
            problem = check(info)
            if problem is None:
                return info
            warn(f"resume: skipping damaged checkpoint {info.path} ({problem})")
        return None
    path = Path(resume)
    meta = read_complete(path)
    if meta is None:
        raise UserError(f"--resume {resume}: not a complete checkpoint (no readable {COMPLETE} file)")
    info = CheckpointInfo(path, int(meta["step"]), meta)
    problem = check(info)
    if problem is not None:
        raise UserError(f"--resume {resume}: damaged checkpoint: {problem}")
    return info


# --- saving --------------------------------------------------------------------------------------------

# torch's zip writer reports a failed write (a full disk among others) as a RuntimeError without the errno
_TORCH_WRITE_FAILED = ("PytorchStreamWriter", "inline_container", "file write failed", "iostream error")
NO_SPACE = "no space left on device"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def guarded_write(path: Path, write: Callable[[], Any]) -> str | None:
    """Run `write` (which writes `path`): None when it succeeded, else one line saying why it failed (no
    space, quota, I/O error). Any other exception is a bug and propagates."""
    try:
        write()
        return None
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in _TORCH_WRITE_FAILED):
            raise
        code = getattr(err, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT) or _free(path.parent) < 2**20:
            return f"{path}: {NO_SPACE}"
        return f"{path}: write failed ({describe_error(err)})"


class WriteFailed(Exception):
    """A checkpoint file could not be written; the message is `guarded_write`'s one line."""


def save_file(obj: Any, path: Path) -> None:
    """`torch.save` of a checkpoint file written inside a collective (`write_extra`): a failed write raises
    `WriteFailed`, which `save_checkpoint` turns into the ranks' agreed `NoSpaceError`."""
    failed = guarded_write(path, lambda: torch.save(obj, path))
    if failed:
        raise WriteFailed(failed)


def _estimate_bytes(engine, extra: bool) -> int:
    """About what a first checkpoint takes: per parameter its weight, the fp32 master (ZeRO 1-3 or bf16) and
    two optimizer moments, plus the same again for the whole-tensor state (`extra`), on every TP rank."""
    ds = getattr(engine, "ds", engine)
    params = list(ds.module.parameters())
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)  # ZeRO-3 keeps the whole size aside
    weight = params[0].element_size() if params else 4
    master = 4 if ds.zero_optimization_stage() or ds.bfloat16_enabled() else 0
    return numel * (weight + master + 8 + (12 if extra else 0)) * ds.mp_world_size


def _space_needed(engine, ckpt_dir: Path, extra: bool) -> tuple[int, str]:
    """Rank 0, before a save: about how many bytes the checkpoint takes, and why we think so: the size of the
    newest complete checkpoint (its COMPLETE records it), or an estimate for the first one."""
    previous = [c for c in list_complete(ckpt_dir) if c.meta.get("files")]
    if previous:
        return sum(previous[-1].meta["files"].values()), f"the size of checkpoint {previous[-1].step}"
    return _estimate_bytes(engine, extra), "estimated from the parameter count"


def _abandon(tmp: Path, step: int, failure: str, need: int) -> NoSpaceError:
    """Collective, after the ranks agreed that `failure` happened: rank 0 removes the partial checkpoint; every
    rank gets the same one-line error."""
    message = None
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        free = _free(tmp.parent)
        space = f" ({_gib(free)} free, it needs {f'about {_gib(need)}' if need > free else 'more'})" \
            if NO_SPACE in failure else ""
        message = (f"{failure} while writing checkpoint step {step}: removed the partial checkpoint{space}; "
                   f"earlier checkpoints and `{LATEST}` kept")
    return NoSpaceError(from_rank0(message))


def _fsync_files(directory: Path) -> str | None:
    """Flush every file under `directory` from this process's host. Each rank calls it: on a shared
    filesystem a client can only flush what it wrote, and which DeepSpeed file a rank wrote is its business.
    A failure (ENOSPC can surface here on network filesystems) is returned, not raised."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            failed = guarded_write(path, lambda p=path: fsync_path(p))
            if failed:
                return failed
    return None


def save_checkpoint(engine, run_dir: Path, step: int, rank_state: dict, meta: dict, *, keep_last: int,
                    keep_every: int, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it (and `write_extra(tmp_dir)`, before the COMPLETE mark).
    Returns the final checkpoint directory; raises `NoSpaceError` on every rank when the disk is full."""
    ckpt_dir = run_dir / "checkpoints"
    tmp_tag = f".tmp-{step}"
    tmp = ckpt_dir / tmp_tag
    rank = dist.get_rank()
    space = None
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crash during an earlier save of this step
            shutil.rmtree(tmp)
        space = (*_space_needed(engine, ckpt_dir, extra=write_extra is not None), _free(ckpt_dir))
    need, basis, free = from_rank0(space)
    if need > free:
        raise NoSpaceError(f"{ckpt_dir}: not enough space for checkpoint step {step}: it needs about {_gib(need)} "
                           f"({basis}), {_gib(free)} free; nothing written, earlier checkpoints and `{LATEST}` kept")

    # every write records its failure instead of raising, so each rank gets through DeepSpeed's collectives
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
    failed = checkpoint_engine.take_write_failure() if hasattr(checkpoint_engine, "take_write_failure") else None
    state_path = tmp / f"trainer_state_rank{rank}.pt"
    failed = failed or guarded_write(state_path, lambda: torch.save(rank_state, state_path))
    if write_extra is not None:
        try:
            write_extra(tmp)  # collective inside; its writes go through `save_file`
        except WriteFailed as err:
            failed = failed or str(err)
    failed = first_across_ranks(failed)  # every file exists, or someone failed
    if failed:
        raise _abandon(tmp, step, failed, need)

    sizes = from_rank0({str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                        if rank == 0 else None)
    failed = _fsync_files(tmp)
    digests = {name: sha256_file(tmp / name) for name in _shares(sizes, dist.get_world_size())[rank]} \
        if not failed else {}
    everyone: list[tuple] = [()] * dist.get_world_size()
    dist.all_gather_object(everyone, (failed, digests))  # every file is on disk, and hashed
    failed = next((f for f, _ in everyone if f), None)
    if failed:
        raise _abandon(tmp, step, failed, need)

    final = ckpt_dir / str(step)
    failed, complete = None, False
    if rank == 0:
        digests = {name: d for _, part in everyone for name, d in part.items()}
        record = dict(meta, step=step, world_size=dist.get_world_size(), time=time.time(), files=sizes,
                      sha256=dict(sorted(digests.items())))
        failed = guarded_write(tmp / COMPLETE, lambda: (fsync_path(tmp),
                                                        atomic_write(tmp / COMPLETE, json.dumps(record, indent=1))))
        if not failed:
            if final.exists():  # an older, complete save of the same step (a rollback re-saved it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(ckpt_dir)
            complete = True  # `latest` is only a hint, and pruning frees space
            failed = guarded_write(ckpt_dir / LATEST, lambda: atomic_write(ckpt_dir / LATEST, f"{step}\n"))
            prune(ckpt_dir, keep_last=keep_last, keep_every=keep_every)
    failed, complete = from_rank0((failed, complete))
    if failed and complete:
        raise NoSpaceError(f"{failed} after checkpoint step {step} was complete ({final}: resume finds it)")
    if failed:
        raise _abandon(tmp, step, failed, need)
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


# --- loading -------------------------------------------------------------------------------------------

def safe_globals() -> list[type]:
    """The only classes a checkpoint file may hold besides tensors, containers and plain values: what
    DeepSpeed pickles into its ZeRO optimizer files (ZeRO 1-3, fp32 and bf16, AdamW and Muon; found with
    `torch.serialization.get_unsafe_globals_in_checkpoint`). Each is inert data: built with its plain
    constructor or __dict__, no code of the file's choosing runs."""
    if not torch.cuda.is_available():  # importing deepspeed on a CPU box prints a warning on stdout otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # the static loss scaler (scale 1.0)
    from deepspeed.runtime.zero.config import ZeroStageEnum  # the stage, an int Enum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2: (numel, start) of a param slice

    return [LossScaler, ZeroStageEnum, fragment_address]


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def numpy_array_globals() -> list:
    """What torch's weights-only unpickler needs for a plain uint32 numpy array (numpy's RNG key), which trainer
    state files held before they stored it as a tensor: the array constructor and the dtype, data only (an
    array's contents go through the same restricted unpickler). Allowed in trainer state files alone, so runs
    started by earlier versions still resume."""
    import numpy as np

    return [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: str | os.PathLike, map_location: Any = None, mmap: bool = False, extra: list = ()) -> Any:
    """`torch.load(weights_only=True)` allowing `safe_globals()` (and `extra`); a file that needs any other
    global (a pickle that would run code) is a one-line UserError naming it. Other errors (a damaged file)
    propagate."""
    try:
        with torch.serialization.safe_globals([*safe_globals(), *extra]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found is None:
            raise
        name = found.group(1)
        why = "which a checkpoint never contains (unsafe pickle)"
        raise UserError(f"{path}: refusing to load: it needs {name}, {why}") from None


def load_rank_state(info: CheckpointInfo, rank: int) -> dict:
    path = info.path / f"trainer_state_rank{rank}.pt"
    if not path.exists():
        raise UserError(f"{info.path}: no trainer state for rank {rank} (saved with world size "
                        f"{info.meta.get('world_size')})")
    return load_file(path, extra=numpy_array_globals())


# what a damaged or foreign file raises from torch.load or DeepSpeed's loader
LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)


def load_file(path: Path, mmap: bool = False, extra: list = ()) -> Any:
    """`safe_load` of one of our checkpoint files; a damaged or unsafe file is a one-line UserError naming it."""
    try:
        return safe_load(path, mmap=mmap, extra=extra)
    except LOAD_ERRORS as err:
        raise UserError(f"{path}: unreadable checkpoint file ({describe_error(err)})") from err


def describe_error(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__

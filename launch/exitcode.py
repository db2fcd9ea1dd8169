"""Run one `loopstack` command in this process and record its exit code, for the batch shell to read.

    python -m launch.exitcode FILE train CONFIG --run-dir DIR --resume auto

torchrun reports any worker failure as its own exit 1, so the trainer's 75 ("checkpoint written, requeue
me") would be lost between the trainer and the job script. This runs the CLI in the same process (signals
reach the trainer's own handlers directly, nothing to forward) and, on global rank 0, writes the exit code
to FILE (atomically) before exiting with it. A process killed outright (SIGKILL) writes nothing.

Every other rank writes its code too, but only when FILE does not exist yet: when all ranks fail alike (a bad
config or checkpoint refused on every rank), the first to exit makes torchrun stop the rest, and rank 0 may be
killed before it writes; its peers' code (the same, in that case) then still reaches the batch shell. Rank 0's
own code, when it gets to write it, always replaces a peer's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loopstack.fileio import atomic_write


def _code(value: object) -> int:
    if value is None:
        return 0
    return value if isinstance(value, int) else 1


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m launch.exitcode FILE LOOPSTACK-ARGS...", file=sys.stderr)
        return 2
    path, args = Path(argv[0]), argv[1:]
    code = 1  # an exception escaping the CLI (a bug) is a failure; its traceback still prints
    try:
        from loopstack.cli import main as loopstack_main

        code = _code(loopstack_main(args))
    except SystemExit as exit_:
        code = _code(exit_.code)
    finally:
        if os.environ.get("RANK", "0") == "0":
            atomic_write(path, f"{code}\n")
        else:
            _write_if_absent(path, code)
    return code


def _write_if_absent(path: Path, code: int) -> None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:  # rank 0 (or another peer) wrote first, or the directory is gone: nothing to add
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{code}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

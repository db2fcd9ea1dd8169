"""A launched run's bookkeeping under `<run>/launch/`: atomic files and the event journal.

    <run>/launch/
        config.yaml     the resolved config (file + --set + flags) the jobs train from
        train.sbatch    the rendered job script (or prepare.sbatch / merge.sbatch for data jobs)
        chain           --chain: the chain's job ids, one per line, in order
        events.jsonl    journal: one JSON object per line, appended by the launcher and the job scripts
        logs/           slurm-<job>.out (batch shell), train-<job>.<restart>.log (trainer)

The journal is append-only: each event is one short line written with a single O_APPEND write, so a
crash can at worst leave a torn last line, which `read_events` skips. Every other file is written to a
temporary name, flushed and renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

LAUNCH_DIR = "launch"
EVENTS = "events.jsonl"


def launch_dir(run_dir: Path) -> Path:
    return Path(run_dir) / LAUNCH_DIR


def append_event(run_dir: Path, event: str, **fields) -> dict:
    record = {"time": int(time.time()), "event": event, **fields}
    path = launch_dir(run_dir) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return record


def read_events(run_dir: Path) -> list[dict]:
    path = launch_dir(run_dir) / EVENTS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a torn line from a crash mid-write
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events

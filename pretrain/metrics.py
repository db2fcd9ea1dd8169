"""Where training numbers go: the console, `metrics.jsonl`, and wandb (offline unless configured).

Only rank 0 writes. `metrics.jsonl` holds one JSON object per logged step (`step`, `loss`, `lr`,
`grad_norm`, `tokens`, `tokens_per_s`, `loops`, ...) and one per eval (`step`, `eval/loss@<loops>`: no `loss`
key, so readers of the training curve keep the records that have one); on resume the records after the
checkpoint's step are dropped so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from loopstack.fileio import atomic_write

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity): MFU denominators.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12, "B200": 2250e12, "MI300X": 1307e12,
}


def device_peak_flops() -> tuple[str, float | None]:
    """(device name, peak FLOP/s) of this process's accelerator; (cpu, None) when there is none."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key.lower() in name.lower():
            return name, peak
    return name, None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file ([] if there is none), skipping a line torn by a kill mid-write."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl ([] if there is none), skipping a line torn by a kill mid-write."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


class MetricsLogger:
    """Console + JSONL + wandb for rank 0; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, cfg_dict: dict, *, enabled: bool, total_steps: int, console: bool,
                 wandb_mode: str, wandb_project: str, run_name: str):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = run_dir / "metrics.jsonl"
        self.console = console and enabled
        self._file = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            self._wandb = _start_wandb(run_dir, cfg_dict, wandb_mode, wandb_project, run_name)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they are about to be replayed from a checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a line cut by a kill mid-write
                continue
        atomic_write(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(wandb_scalars(record), step=record["step"])

    def progress(self, step: int, record: dict[str, Any], elapsed: float, steps_done: int) -> None:
        """One console line: step, loss, lr, tokens/s, ETA."""
        if not self.console:
            return
        eta = elapsed / max(steps_done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"gnorm {record['grad_norm']:.3f}", f"loops {record['loops']}",
                 f"tok/s {record['tokens_per_s']:,.0f}", f"eta {format_duration(eta)}"]
        if record.get("mfu") is not None:
            parts.insert(-1, f"mfu {100 * record['mfu']:.1f}%")
        print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record as wandb scalars: per-loop lists (`diag/state_norm` = [loop 1, loop 2, ...])
    become one series per loop, `diag/state_norm@1`, `diag/state_norm@2`, ...; dicts of numbers `key/name`."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out.update({f"{k}@{i}": x for i, x in enumerate(v, 1) if isinstance(x, (int, float))})
        elif isinstance(v, dict):
            out.update({f"{k}/{name}": x for name, x in v.items() if isinstance(x, (int, float))})
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep the line parseable
    return v


def _start_wandb(run_dir: Path, cfg_dict: dict, mode: str, project: str, name: str):
    """A wandb run in `<run>/wandb`, resumed under the same id after a restart; offline never needs a network
    (`wandb sync <run>/wandb/offline-run-*` uploads it later)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import secrets

    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    if not id_file.exists():
        atomic_write(id_file, run_id)
    try:
        return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
                          config=cfg_dict, settings=wandb.Settings(console="off", silent=True))
    except Exception as err:  # metrics still go to metrics.jsonl; a broken wandb must not stop training
        print(f"wandb disabled: {err}", file=sys.stderr)
        return None


class Throughput:
    """Tokens per second over the steps since the last log line (excludes checkpoint and eval time)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.tokens += tokens

    def take(self) -> float:
        """Tokens/s since the last call; resets."""
        rate = self.tokens / self.seconds if self.seconds else 0.0
        self.tokens, self.seconds = 0, 0.0
        return rate

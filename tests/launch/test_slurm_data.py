"""Data preparation as a real SLURM job array: one task killed mid-slice, the array rerun, one merged manifest."""

import json
import re
import subprocess

from tests.launch.helpers import SMOKE, events, job_report, loopstack, wait_for


def _states(job_id: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T"], capture_output=True,
                         text=True).stdout
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)


def _done_tasks(run) -> set[int]:
    return {e["task"] for e in events(run) if e["event"] == "task_done"}


def test_data_array_killed_task_rerun_resumes_and_merges(slurm, tmp_path):
    tok, out, run = tmp_path / "tok", tmp_path / "shards", tmp_path / "run"
    # The whole standard library in 2 slices (a few seconds each), tokenized with the smoke tokenizer.
    sets = ["--set", "data.sources=[stdlib]", "--set", f"tokenizer.dir={tok}", "--set", f"data.out={out}"]
    loopstack("data", "train-tokenizer", "--config", SMOKE, "--out", str(tok))
    loopstack("launch", "slurm-data", SMOKE, "--tasks", "2", "--run-dir", str(run), *sets)
    array_id, merge_id = events(run)[0]["job_ids"]
    logs = run / "launch" / "logs"

    # Kill task 1 once it has finished at least one unit of its slice (units lo.. belong to slice 1, where
    # lo = the number of units task 0 reported), so the rerun has something to resume from.
    def first_unit_of_slice_1():
        log0 = logs / f"prepare-{array_id}_0.out"
        m = re.search(r"slice 0/2: (\d+) units", log0.read_text()) if log0.exists() else None
        return int(m.group(1)) if m else None

    lo = wait_for(first_unit_of_slice_1, 90, "task 0 to start", on_timeout=lambda: job_report(run))
    wait_for(lambda: any(int(p.stem.split("-")[1]) >= lo for p in (out / ".work").glob("unit-*.json")), 90,
             "task 1 to finish its first unit", interval=0.05, on_timeout=lambda: job_report(run))
    subprocess.run(["scancel", f"{array_id}_1"], check=True)
    wait_for(lambda: 0 in _done_tasks(run), 90, "task 0 to finish", on_timeout=lambda: job_report(run))
    assert not (out / "manifest.slice-0001-of-0002.json").exists(), "task 1 finished before it could be killed"
    assert 1 not in _done_tasks(run)
    # afterok can never be satisfied now: SLURM cancels the merge instead of leaving it pending forever
    wait_for(lambda: _states(merge_id).get(merge_id) == "CANCELLED", 30, "the merge job to be cancelled",
             on_timeout=lambda: job_report(run))
    assert not (out / "manifest.json").exists()
    status = json.loads(loopstack("launch", "status", str(run), "--json").stdout)
    assert status["mode"] == "data" and status["slices_done"] == [0] and status["slices"] == 2

    # Rerun the same command: slice 0 is kept, slice 1 continues, the new merge writes manifest.json.
    loopstack("launch", "slurm-data", SMOKE, "--tasks", "2", "--run-dir", str(run), *sets)
    array2, merge2 = [e for e in events(run) if e["event"] == "submit"][-1]["job_ids"]
    assert array2 != array_id
    wait_for(lambda: events(run)[-1]["event"] in ("merged", "merge_failed", "task_failed"), 120,
             "the rerun to merge", on_timeout=lambda: job_report(run))
    assert events(run)[-1]["event"] == "merged", job_report(run)
    assert (out / "manifest.json").exists() and not list(out.glob("manifest.slice-*"))
    rerun1 = (logs / f"prepare-{array2}_1.out").read_text()
    assert "kept from an earlier run" in rerun1, rerun1  # the killed slice resumed
    loopstack("data", "verify", str(out))  # every shard's checksum matches the merged manifest
    status = json.loads(loopstack("launch", "status", str(run), "--json").stdout)
    assert status["state"] == "COMPLETED" and status["slices_done"] == [0, 1]
    assert {array_id, merge_id, array2, merge2} <= set(status["job_ids"])

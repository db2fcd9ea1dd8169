"""Tests that need SLURM take the `slurm` fixture. It never starts daemons itself (that needs root and apt):
`.ci/run` starts the single-node cluster with scripts/slurm-up.sh before `make test`; a developer runs that
script once. When SLURM cannot be reached the test FAILS, saying why and how to fix it (never a silent skip).
"""

import subprocess

import pytest

from tests.launch.helpers import ROOT, SMOKE, loopstack, slurm_problem


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    problem = slurm_problem()
    if problem:
        pytest.fail(f"SLURM is not reachable: {problem}. Start the single-node test cluster with "
                    f"`sudo scripts/slurm-up.sh` (.ci/run does this before `make test`).", pytrace=False)
    yield
    # A failed test can leave its jobs queued or running: cancel every job whose log is under this session's
    # temporary directory (and nothing else on the cluster).
    base = str(tmp_path_factory.getbasetemp())
    out = subprocess.run(["squeue", "-h", "-O", "JobID:40,StdOut:1000"], capture_output=True, text=True).stdout
    mine = [line.split()[0] for line in out.splitlines() if len(line.split()) == 2 and line.split()[1].startswith(base)]
    if mine:
        subprocess.run(["scancel", *{j.split("_")[0] for j in mine}], capture_output=True)


@pytest.fixture(scope="session")
def smoke_data():
    """Tokenizer and shards of the smoke config, made once with the data CLI (a process without torch)
    before any trainer starts, so concurrent trainers never race to prepare them."""
    from data_pipeline.tokenizer import tokenizer_exists
    from pretrain.config import load_config

    cfg = load_config(ROOT / SMOKE)
    if not tokenizer_exists(ROOT / cfg.tokenizer.dir):
        loopstack("data", "train-tokenizer", "--config", SMOKE, timeout=300)
    loopstack("data", "prepare", "--config", SMOKE, timeout=300)

"""Distributed runtime: process group, megatron-core parallel groups, DeepSpeed's mpu, seeding.

    with distributed(tp=2, seed=1234) as env:     # torchrun variables, or one process without them
        ...                                         # env.dp_rank, env.tp_rank, env.device, ...

Layout: megatron-core orders ranks tensor-parallel first, so with world 4 and tp 2 the TP groups are
[0,1], [2,3] and the DP groups [0,2], [1,3]. Backend nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from loopstack.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# megatron-core warns at import that Transformer Engine / Apex are absent; we use neither on purpose.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=".*imports from `dynamic_context.py` will be removed")
# DeepSpeed 0.19 still calls the deprecated all_gather_into_tensor (ZeRO-1/2); nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when none are set."""
    present = [v for v in TORCHRUN_VARS if v in os.environ]
    if not present:
        return 0, 1, 0
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UserError(f"torchrun variables half set: {', '.join(present)} present but "
                        f"{', '.join(missing)} missing (launch with torchrun, or unset them all)")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise UserError(f"torchrun variables must be integers: {err}") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def die_with_launcher() -> None:
    """Under torchrun, make this worker die when its agent dies.

    torchrun starts workers in their own sessions, so a SIGKILL of the agent (or of its process group, as a
    scheduler or a user's `kill -9` does) would orphan them: still training, still writing checkpoints into
    the run directory the restarted job resumes from. PR_SET_PDEATHSIG ties the worker's life to the agent's.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the agent died before the call took effect
        os.kill(os.getpid(), signal.SIGKILL)


def check_tp(world_size: int, tp: int) -> None:
    if tp < 1 or world_size % tp:
        raise UserError(f"world size {world_size} is not divisible by parallel.tp = {tp}")


def init_distributed(tp: int = 1, seed: int = 0, timeout_s: float = 600.0) -> DistEnv:
    """Start the process group and megatron-core's tensor/data-parallel groups, then seed every RNG."""
    from megatron.core import parallel_state as ps

    rank, world, local = read_launch_env()
    check_tp(world, tp)
    die_with_launcher()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        from datetime import timedelta

        if world == 1 and "MASTER_ADDR" not in os.environ:
            # a single process needs no rendezvous: an in-memory store avoids picking a port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
    env = DistEnv(rank=rank, world_size=world, local_rank=local, tp=tp, dp=world // tp,
                  tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                  backend=backend, device=device)
    seed_all(seed, env)
    return env


def shutdown() -> None:
    """Tear down megatron groups and the process group; safe to call twice or after a failure."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def distributed(tp: int = 1, seed: int = 0) -> Iterator[DistEnv]:
    """`init_distributed` with a guaranteed `shutdown`, even when the body raises."""
    try:
        yield init_distributed(tp=tp, seed=seed)
    finally:
        shutdown()


# --- seeding ---------------------------------------------------------------------------------------

class TensorParallelRNG:
    """CPU stand-in for megatron's CUDA RNG tracker: `fork()` switches to a generator state that differs
    across tensor-parallel ranks (for dropout inside TP regions) while the default state, used for
    everything replicated, stays identical across the TP group."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self._state = gen.get_state()

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        saved = torch.get_rng_state()
        torch.set_rng_state(self._state)
        try:
            yield
        finally:
            self._state = torch.get_rng_state()
            torch.set_rng_state(saved)

    def get_state(self) -> torch.Tensor:
        return self._state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        self._state = state.clone()


_TP_RNG: TensorParallelRNG | None = None

# megatron's own offset between the default and the model-parallel seeds
_TP_SEED_OFFSET = 2718


def seed_all(seed: int, env: DistEnv) -> None:
    """Default RNGs get the same seed on every rank of a TP group (replicated work agrees) and differ
    across DP ranks only through the data they read; the TP-region RNG differs per TP rank."""
    global _TP_RNG
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tp_seed = seed + _TP_SEED_OFFSET + 100 * env.tp_rank
    if env.device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    _TP_RNG = TensorParallelRNG(tp_seed)


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from on this rank, for exact resume. Only tensors and plain values
    (numpy's state as a dict with its key as an int64 tensor), so checkpoints load with weights_only=True."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(),
             "tp": tp_rng().get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = {**numpy, "state": {**numpy["state"], "key": numpy["state"]["key"].numpy().astype(np.uint32)}}
    np.random.set_state(numpy)  # a tuple: written by an earlier version
    torch.set_rng_state(state["torch"])
    tp_rng().set_state(state["tp"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def tp_rng() -> TensorParallelRNG:
    if _TP_RNG is None:
        raise RuntimeError("init_distributed() first")
    return _TP_RNG


# --- DeepSpeed ---------------------------------------------------------------------------------------

class MegatronMPU:
    """What DeepSpeed calls on `mpu=`, answered from megatron-core's groups (tensor = model parallel;
    no pipeline). Deliberately no `get_sequence_*`: their presence switches ZeRO to sequence parallel."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def prepare_deepspeed() -> None:
    """Make `import deepspeed` / `deepspeed.initialize` work on a CPU box with no compiler step.

    DeepSpeed JIT-builds a shared-memory all-reduce op (`deepspeed_shm_comm`) whenever it starts its
    comm backend. That op serves only inference all-reduce, which training never calls, and the build
    takes ~80 s and a C++ toolchain; on CPU we skip it (DeepSpeed then uses plain torch.distributed).
    """
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    # not `import deepspeed.comm.torch as m`: that name resolves to the torch package re-exported by deepspeed.comm
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


# --- agreeing across ranks ---------------------------------------------------------------------------------


def first_across_ranks(mine):
    """Collective: the first non-None value any rank passes (in rank order), on every rank; None if none did."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next((value for value in everyone if value), None)


def from_rank0(value):
    """Collective: rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def user_errors_agreed() -> Iterator[None]:
    """Run the block on every rank; a UserError on any rank (a file only that rank reads, a lock only rank 0
    takes) is raised on every rank, the first in rank order, so no rank is left waiting in a collective."""
    refusal = None
    try:
        yield
    except UserError as err:
        refusal = str(err)
    first = first_across_ranks(refusal)
    if first is not None:
        raise UserError(first)

"""Training on several processes: PyTorch's torch.distributed, launched by torchrun.

maskrt writes no launcher: `torchrun --nproc-per-node N -m maskrt train ...` starts N copies
of the trainer and sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR /
MASTER_PORT in each; multi-node runs use torchrun's own rendezvous (`--nnodes`,
`--rdzv-backend c10d`, `--rdzv-endpoint`). This module reads those variables, opens the
process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU) with a timeout, and
offers the few collectives the trainer needs besides DistributedDataParallel's own.

Bounded failure: when one worker exits non-zero, torchrun terminates the others. A rank that
is still alive but blocked in a collective whose peer vanished gives up after the process
group's timeout (`timeout_s`), so no job hangs for ever.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from maskrt.errors import MaskrtError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (all 0 / 1 for a plain `maskrt train`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress and writes checkpoints."""
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """The ranks torchrun set in the environment (none set: a single process)."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return default if value in (None, "") else int(value)
        except ValueError:
            raise MaskrtError(f"environment variable {name}={value!r} is not an integer") from None

    world_size = read("WORLD_SIZE", 1)
    return Ranks(rank=read("RANK", 0), world_size=world_size, local_rank=read("LOCAL_RANK", 0),
                 local_world_size=read("LOCAL_WORLD_SIZE", world_size))


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device this rank trains on: with several CUDA ranks per node, GPU `local_rank`."""
    if device.type != "cuda" or not ranks.distributed:
        return device
    if device.index is not None and ranks.local_world_size > 1:
        raise MaskrtError(f"--device {device} names one GPU, but torchrun started {ranks.local_world_size} "
                          f"processes on this node: use --device cuda (rank i takes GPU i)")
    index = device.index if device.index is not None else ranks.local_rank
    if index >= torch.cuda.device_count():
        raise MaskrtError(f"local rank {ranks.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          f"start at most that many processes per node (--nproc-per-node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_process_group(ranks: Ranks, device: torch.device, timeout_s: float) -> None:
    """Join the job's process group (nothing to do for a single process)."""
    if not ranks.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_floats(values: list[float], device: torch.device, ranks: Ranks) -> list[float]:
    """Rank 0's `values` on every rank (float64; e.g. its clock, which decides --minutes)."""
    if not ranks.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return [float(v) for v in tensor.cpu()]


def gather_objects(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def exit_here_for_tests(ranks: Ranks, step: int) -> None:
    """Test-only fault hook: with MASKRT_TEST_EXIT_RANK=r and MASKRT_TEST_EXIT_STEP=s set, rank r
    exits with status 17 just before step s (how tests/test_distributed.py shows that a dead
    rank ends the whole job in bounded time). Unset in normal use: does nothing."""
    rank, at = os.environ.get("MASKRT_TEST_EXIT_RANK"), os.environ.get("MASKRT_TEST_EXIT_STEP")
    if rank is not None and at is not None and int(rank) == ranks.rank and int(at) == step:
        os._exit(17)

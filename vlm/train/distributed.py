"""Process-group set-up shared by every strategy: who am I, which device, how to agree with the others.

Launchers (`torchrun`, `accelerate launch`, SLURM's `srun` via torchrun) all export RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; reading them here keeps the training code launcher-agnostic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool
    """True when `init_distributed` created the process group (and so must destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the process group the launcher describes (NCCL on GPUs, gloo on CPU); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return DistEnv(rank, world, local_rank, device, owns)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks; returns a new tensor on `tensor`'s device (the identity for one process).

    The collective runs on the process's device: NCCL takes only CUDA tensors, gloo CPU ones."""
    if not env.distributed:
        return tensor
    reduced = tensor.to(env.device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` for one process."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def teardown(env: DistEnv) -> None:
    """A barrier first: FSDP over gloo can abort at exit when one rank tears down early."""
    if env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

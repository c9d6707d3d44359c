"""torch.distributed helpers: set up from torchrun's or Slurm's environment, rank-aware utilities."""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import slurm


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a multi-process run, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str                     # "torchrun", "srun" or "none"
    master_addr: str | None = None    # srun: the first host of the step; torchrun sets its own
    master_port: int | None = None


def describe_launch(env: Mapping[str, str] = os.environ) -> Launch:
    """The launch ``env`` describes: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (which win,
    e.g. torchrun inside a Slurm allocation); else a task of an ``srun`` step (one process per
    GPU, ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``, rendezvous at the step's
    first host on ``MASTER_PORT`` or a port derived from the job id); else one process. A
    batch script itself (no ``srun`` step) is one process, whatever ``--ntasks`` says."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm.port_for_job(env.get("SLURM_JOB_ID", "0"))
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      "srun", env.get("MASTER_ADDR") or slurm.first_host(nodes), port)
    return Launch(0, 1, 0, "none")


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group torchrun or ``srun`` describes in the environment, if any
    (:func:`describe_launch`; under srun, torchrun's variables are set from Slurm's so that
    ``env://`` rendezvous and every later reader see one description).

    Returns (rank, world_size, local_rank); (0, 1, 0) for a plain single-process run.
    """
    launch = describe_launch()
    if launch.world_size == 1 and launch.launcher != "torchrun":
        return 0, 1, 0
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    if launch.launcher == "srun":
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return rank, world_size, local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sums of Python floats over all ranks, in one collective (the values when not distributed)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_state(state: Any) -> list[Any]:
    """``state`` (tensors, numbers, containers) of every rank, in rank order.

    Sent as ``torch.save`` bytes: pickling tensors through ``all_gather_object`` fails on
    some torch builds, and bytes load back with ``weights_only=True``.
    """
    if not is_distributed():
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in gathered]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()

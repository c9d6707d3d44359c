"""torch.distributed helpers: set up from torchrun's environment, rank-aware utilities."""
from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group torchrun describes in the environment, if any.

    Returns (rank, world_size, local_rank); (0, 1, 0) for a plain single-process run.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python float over all ranks (the value itself when not distributed)."""
    if not is_distributed():
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size()


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

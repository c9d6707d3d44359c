"""One checkpoint format for every command: atomic writes, model checks, exact resume.

A checkpoint is a dict with the official FCMAE fields ``model``, ``optimizer``, ``epoch``,
``scaler``, ``args`` plus ``step``, ``model_name``, ``rng`` (one RNG state per rank) and
``format``. It loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "fcmae-checkpoint-v1"
LAST = "checkpoint-last.pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing, corrupt, or of another model)."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``:
    a crash mid-write never leaves a truncated file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'corrupt file'}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def state_dict_of(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint (``model`` / ``state_dict`` / a bare state dict)."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint
    raise CheckpointError("checkpoint holds no model weights (no 'model' or 'state_dict' entry)")


def check_compatible(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     model_name: str, saved_name: str | None, path: str | os.PathLike) -> None:
    """Refuse weights (``state``) that do not fit ``model_state`` in keys and shapes, naming both models."""
    expected = {key: tuple(value.shape) for key, value in model_state.items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    if expected == found:
        return
    saved = f"model {saved_name!r}" if saved_name else "another model"
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    detail = (f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else
              f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else
              f"shape of {mismatched[0]} is {found[mismatched[0]]}, expected {expected[mismatched[0]]}")
    raise CheckpointError(f"checkpoint {str(path)!r} holds {saved}, but this run builds "
                          f"{model_name!r} with these settings: {detail}")


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), Python and NumPy, as weights-only-loadable values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume`` value → path: ``auto`` picks ``OUTPUT/checkpoint-last.pth`` if present."""
    if not resume:
        return None
    if resume == "auto":
        candidate = Path(output_dir) / LAST
        return candidate if candidate.is_file() else None
    return Path(resume)


def resume_training(path: str | os.PathLike, model: nn.Module, optimizer, scaler, model_name: str,
                    rank: int, world_size: int,
                    extra_modules: dict[str, Any] | None = None) -> tuple[int, int]:
    """Restore model, optimizer, scaler, RNG (and e.g. ``{'model_ema': ema}``) to continue
    exactly; returns (next epoch, global step)."""
    checkpoint = load_checkpoint(path)
    state = state_dict_of(checkpoint)
    check_compatible(model.state_dict(), state, model_name, checkpoint.get("model_name"), path)
    model.load_state_dict(state)
    if checkpoint.get("optimizer"):
        optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    for key, module in (extra_modules or {}).items():
        if key in checkpoint:
            module.load_state_dict(checkpoint[key])
    rng = checkpoint.get("rng")
    if rng and len(rng) == world_size:
        restore_rng_state(rng[rank])
    elif rng:
        print(f"warning: checkpoint has RNG states for {len(rng)} processes, this run has "
              f"{world_size}; continuing with fresh random streams", file=sys.stderr)
    return int(checkpoint.get("epoch", -1)) + 1, int(checkpoint.get("step", 0))

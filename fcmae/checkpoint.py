"""One checkpoint format for every command: output folders, model checks, exact resume.

A checkpoint is a dict with the official FCMAE fields ``model``, ``optimizer``, ``epoch``,
``scaler``, ``args`` plus ``step``, ``model_name``, ``rng`` (one RNG state per rank) and
``format``. It loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write

FORMAT = "fcmae-checkpoint-v1"
LAST = "checkpoint-last.pth"

log = logging.getLogger(__name__)


ENCODER_PREFIX = "encoder."   # an FCMAE state dict: encoder.*, proj.*, mask_token, decoder.*, pred.*


def is_fcmae_state(state: dict[str, Any]) -> bool:
    """True for the weights of a whole FCMAE (an ``encoder.*`` part), as pretraining saves them."""
    return any(key.startswith(ENCODER_PREFIX) for key in state)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing, corrupt, or of another model)."""


def check_output_dir(folder: str | os.PathLike) -> None:
    """Before training: ``folder`` can be created and written, and ``checkpoint-last.pth`` in it
    is not a folder. Raises :class:`CheckpointError` naming the path."""
    folder = Path(folder)
    existing = next(parent for parent in (folder, *folder.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise CheckpointError(f"output dir {folder}: {existing} is a file; choose another --output-dir")
    try:   # a file made and removed where the first write will go: nothing is left behind
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise CheckpointError(f"cannot write to output dir {folder}: {error.strerror or error}") from None
    if (folder / LAST).exists() and not (folder / LAST).is_file():
        raise CheckpointError(f"{folder / LAST} is not a file; remove it or choose another --output-dir")


LOCK = ".fcmae-run.lock"


@contextmanager
def output_lock(folder: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold ``FOLDER/.fcmae-run.lock`` (pid and host, created exclusively, never through a link)
    for a run's life, so a second run into the same folder is refused instead of interleaving
    checkpoints and logs. A lock whose process is gone from this host (a crash, a killed job) is
    taken over with a warning; one held on another host is reported with its host and pid."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and (holder.get("host") != me["host"] or _process_alive(holder.get("pid"))):
                raise CheckpointError(f"{folder} is in use by another run (process {holder.get('pid')} on "
                                      f"{holder.get('host')}); wait for it or choose another --output-dir (if that "
                                      f"process is gone, remove {path})") from None
            log.warning(f"taking over {path}, left by a run that is gone ({holder or 'unreadable'})")
            path.unlink(missing_ok=True)
    with os.fdopen(descriptor, "w") as file:
        json.dump(me, file)
    try:
        yield
    finally:
        if _lock_holder(path) == me:
            path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> dict | None:
    """The {pid, host} in a lock file; None when it is unreadable (then stale: it is written
    in one small write right after being created)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Weights (and string ``metadata``) as one ``.safetensors`` file, written atomically."""
    from safetensors.torch import save
    payload = save({key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()},
                   metadata=metadata)
    atomic_write(path, lambda file: file.write(payload))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely; a clear error if it is not one.

    ``.safetensors`` files come back as ``{"model": tensors, **metadata}``; anything else goes
    through ``torch.load(weights_only=True)``, with ``argparse.Namespace`` allowed because
    official ConvNeXt-V2 checkpoints store their ``args`` as one.
    """
    path = Path(path)
    if path.is_dir() and (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is a Hugging Face transformers export, which fcmae does not read "
                              f"back; give the FCMAE checkpoint it came from, or a --format official/timm export")
    if path.is_dir() and (path / "model.safetensors").is_file():   # an fcmae-convert --format timm folder
        path = path / "model.safetensors"
    elif path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a folder, not a checkpoint file (a .pth or .safetensors file, "
                              f"or a folder written by fcmae-convert --format timm)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            checkpoint = _load_safetensors(path)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {_why_unreadable(error)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _why_unreadable(error: Exception) -> str:
    """One true line for a file torch.load refused (never torch's advice to drop weights_only)."""
    if "Weights only load failed" in str(error) and "global" in str(error).lower():
        return ("it holds Python objects other than tensors and plain values (code could run on "
                "loading); refused for safety: re-save just the weights, e.g. {'model': state_dict}")
    if "zip archive" in str(error) or "central directory" in str(error):
        return "the file is truncated or corrupt (an interrupted copy or save?)"
    return "not a PyTorch checkpoint or safetensors file"


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt", device="cpu") as file:
        metadata = file.metadata() or {}
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return {**metadata, "model": tensors}


def state_dict_of(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint (``model`` / ``state_dict`` / a bare state dict),
    every one finite: weights holding NaN or inf are refused, naming the first such tensor
    (every command reads weights through here)."""
    entries = [checkpoint[key] for key in ("model", "state_dict", "model_ema") if isinstance(checkpoint.get(key), dict)]
    state = entries[0] if entries else None
    if state is None and checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        state = checkpoint
    if state is None:
        raise CheckpointError("checkpoint holds no model weights (no 'model' or 'state_dict' entry)")
    broken = first_non_finite(state)
    if broken is not None:
        raise CheckpointError(f"the weights are not finite: {broken} holds NaN or inf (a diverged run?); "
                              f"use an earlier checkpoint")
    return state


def saved_args(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint was trained with, as a dict (ours store a dict, official ones
    an ``argparse.Namespace``); empty where it has none."""
    args = checkpoint.get("args") or {}
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}


def check_compatible(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     model_name: str, saved_name: str | None, path: str | os.PathLike) -> None:
    """Refuse weights (``state``) that do not fit ``model_state`` in keys and shapes, naming both models."""
    expected = {key: tuple(value.shape) for key, value in model_state.items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    if expected == found:
        return
    is_fcmae = {"expected": is_fcmae_state(expected), "found": is_fcmae_state(found)}
    if is_fcmae["found"] and not is_fcmae["expected"]:
        raise CheckpointError(f"{str(path)!r} holds FCMAE pretraining weights, but this run trains a dense "
                              f"model: pass it as --finetune (converted on the fly), not --resume")
    if is_fcmae["expected"] and not is_fcmae["found"]:
        raise CheckpointError(f"{str(path)!r} holds a dense (fine-tuning) model, not FCMAE pretraining "
                              f"weights with an encoder")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    detail = (f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else
              f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else
              f"shape of {mismatched[0]} is {found[mismatched[0]]}, expected {expected[mismatched[0]]}")
    if saved_name == model_name:
        raise CheckpointError(f"checkpoint {str(path)!r} holds {model_name!r} built with other settings "
                              f"than this run: {detail}")
    holder = f"model {saved_name!r}" if saved_name else "another model"
    raise CheckpointError(f"checkpoint {str(path)!r} holds {holder}, but this run builds "
                          f"{model_name!r} with these settings: {detail}")


def load_body(model: nn.Module, state: dict[str, torch.Tensor], model_name: str,
              path: str | os.PathLike) -> None:
    """Load dense weights into ``model``: everything but its head (``head_prefixes``: final
    norm, classifier) must fit exactly; head tensors load where their shapes fit (another class
    count starts fresh)."""
    own, head = model.state_dict(), model.head_prefixes
    state = {key: value for key, value in state.items()
             if not (key.startswith(head) and key in own and own[key].shape != value.shape)}

    def body(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value for key, value in weights.items() if not key.startswith(head)}
    check_compatible(body(own), body(state), model_name, None, path)
    model.load_state_dict(state, strict=False)


def first_non_finite(state: dict[str, Any], prefix: str = "") -> str | None:
    """The name of the first floating-point tensor holding NaN or inf anywhere in ``state``
    (nested dicts, e.g. model and EMA weights), or None when every one is finite."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found = first_non_finite(value, f"{name}.")
            if found is not None:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


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


def training_checkpoint(weights: dict[str, Any], optimizer: torch.optim.Optimizer, scaler, epoch: int,
                        step: int, settings: dict[str, Any], model_name: str, rng: list[dict[str, Any]],
                        batch: int = 0, epoch_losses: list[float] | None = None) -> dict:
    """The checkpoint of a training run (format :data:`FORMAT`): ``weights`` (``model`` and e.g.
    ``model_ema``), optimizer, scaler, ``epoch`` (the last one completed), step, the run's
    ``settings`` (as ``args``: plain values), model name and one RNG state per rank — what
    :func:`resume_training` reads back.
    A mid-epoch checkpoint (a preempted run) also holds ``batch``, the batches of the next
    epoch already trained, and their ``epoch_losses``."""
    checkpoint = {**weights, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                  "step": step, "args": dict(settings),
                  "model_name": model_name, "rng": rng, "format": FORMAT}
    if batch:
        checkpoint |= {"batch": batch, "epoch_losses": list(epoch_losses or [])}
    return checkpoint


def load_training_weights(path: str | os.PathLike, model: nn.Module, model_name: str) -> dict[str, Any]:
    """Load the model weights of a training checkpoint (ours, or official with no format
    entry) into ``model``, checked to fit; returns the whole checkpoint (optimizer and the rest
    untouched: evaluation needs only the weights)."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format", FORMAT) != FORMAT:   # official checkpoints carry no format entry
        raise CheckpointError(f"{str(path)!r} is in checkpoint format {checkpoint['format']!r}; this version of "
                              f"fcmae resumes {FORMAT!r} only")
    state = state_dict_of(checkpoint)
    check_compatible(model.state_dict(), state, model_name, checkpoint.get("model_name"), path)
    model.load_state_dict(state)
    return checkpoint


def resume_training(path: str | os.PathLike, model: nn.Module, optimizer, scaler, model_name: str,
                    rank: int, world_size: int,
                    extra_modules: dict[str, Any] | None = None,
                    check_settings: Callable[[dict[str, Any]], None] | None = None) -> ResumePoint:
    """Restore model, optimizer, scaler, RNG (and e.g. ``{'model_ema': ema}``) to continue
    exactly; returns where to continue. ``check_settings(saved_args)`` runs once the
    weights are known to fit, on the settings the checkpoint was trained with (a dict, empty if
    it has none), before the optimizer and RNG states are restored."""
    checkpoint = load_training_weights(path, model, model_name)
    if check_settings is not None:
        check_settings(saved_args(checkpoint))
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
        log.warning(f"checkpoint has RNG states for {len(rng)} processes, this run has "
                    f"{world_size}; continuing with fresh random streams")
    return ResumePoint(int(checkpoint.get("epoch", -1)) + 1, int(checkpoint.get("step", 0)),
                       int(checkpoint.get("batch", 0)), [float(loss) for loss in checkpoint.get("epoch_losses", [])])


@dataclass
class ResumePoint:
    """Where a resumed run continues: at batch ``batch`` of ``epoch`` (0: its start), after
    ``step`` optimizer steps; ``epoch_losses`` are the losses of the batches before it."""

    epoch: int
    step: int
    batch: int = 0
    epoch_losses: list[float] = field(default_factory=list)

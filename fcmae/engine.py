"""One training loop for every command: AMP, gradient accumulation, DDP, NaN guard, logging."""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .loader import BatchStream
from .logger import LOG_FILE, RunLogger
from .optim import cosine_lr, set_lr

log = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# loss_fn(model, batch) -> (loss, outputs); outputs are handed to the step hook.
LossFn = Callable[[nn.Module, Any], tuple[Tensor, Any]]
StepHook = Callable[[int, Any, Any], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the weights are touched."""


@dataclass
class TrainingConfig:
    """How the engine trains, shared by pretraining and fine-tuning: the learning-rate schedule
    (lr, min_lr, warmup, epochs) and each step (accumulation, clipping, autocast dtype)."""

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    accum_iter: int = 1
    clip_grad: float | None = None
    amp: str = "none"


def setup_run(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (if any), pick this process' device and CPU threads
    (``--threads``), seed every RNG (seed + rank). Returns (rank, world_size, device)."""
    device = check_device(args.device)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    rank, world_size, local_rank = distributed.init_distributed(args.dist_backend)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    seed = args.seed + rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return rank, world_size, device


def check_device(name: str) -> torch.device:
    """``--device`` as a torch.device that exists on this machine, or a one-line ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but PyTorch sees no CUDA GPU (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def prepare_output(output_dir: Path, log_dir: Path, resume: str | None = None, overwrite: bool = False) -> None:
    """Before any data is read: the output and log folders are writable, ``checkpoint-last.pth``
    is a file if present, a folder holding a run is continued (``resume``) or explicitly
    replaced (``overwrite``), and temporary files of interrupted earlier runs are removed."""
    for folder in {output_dir, log_dir}:
        ckpt.check_output_dir(folder)
    run_files = (output_dir / ckpt.LAST, output_dir / LOG_FILE, log_dir / LOG_FILE)
    for path in run_files:
        if path.is_symlink():
            raise ckpt.CheckpointError(f"{path} is a symbolic link; a run never writes through one: remove it "
                                       f"or choose another --output-dir / --log-dir")
    held = [path for path in run_files if path.is_file()]
    if held and not resume and not overwrite:
        raise ckpt.CheckpointError(f"{output_dir} already holds a run ({', '.join(sorted({p.name for p in held}))}); "
                                   f"continue it with --resume auto, start over with --overwrite, or choose "
                                   f"another --output-dir")
    if distributed.is_main_process():
        for stale in ckpt.remove_stale_temp_files(output_dir):
            log.warning(f"removed {stale}, left by an interrupted save")


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; choose one of {list(AMP_DTYPES)}")
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(item, device) for item in batch)
    return batch


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, loss_fn: LossFn, config: TrainingConfig,
                    epoch: int, step: int, device: torch.device, logger: RunLogger,
                    step_hook: StepHook | None = None) -> tuple[dict[str, float], int]:
    """Train ``epoch`` on ``len(batches) // accum_iter`` optimizer steps taken from ``batches``
    (a :class:`~fcmae.loader.BatchStream`, or any sized iterable); returns
    ({'loss': mean, ...}, global optimizer step after the epoch)."""
    model.train()
    accum = config.accum_iter
    steps = len(batches) // accum
    if steps == 0:
        raise ValueError(f"an epoch has {len(batches)} batches, fewer than --accum-iter {accum}")
    amp_dtype = AMP_DTYPES[config.amp]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(total=steps, desc=f"epoch {epoch}", disable=not distributed.is_main_process(),
                    dynamic_ncols=True)
    step_start = time.perf_counter()
    try:
        for index, batch in enumerate(itertools.islice(iter(batches), steps * accum)):
            if index % accum == 0:   # the schedule at the end of this step: the first step has lr > 0
                lr = cosine_lr(epoch + (index // accum + 1) / steps, config.lr, config.min_lr,
                               config.warmup_epochs, config.epochs)
                set_lr(optimizer, lr)
            batch = move_to(batch, device)
            last_micro_step = (index + 1) % accum == 0
            no_sync = isinstance(model, DistributedDataParallel) and not last_micro_step
            with model.no_sync() if no_sync else nullcontext():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, outputs = loss_fn(model, batch)
                loss_value = distributed.all_reduce_mean(loss.item(), device)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at epoch {epoch}, step {step + 1} (batch {index}); "
                        f"stopped before updating the weights — lower --lr/--blr, use --clip-grad, "
                        f"or --amp bf16 instead of fp16")
                scaler.scale(loss / accum).backward()
            losses.append(loss_value)
            if not last_micro_step:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad or math.inf).item()
            if not math.isfinite(grad_norm) and not scaler.is_enabled():   # fp16's scaler skips such steps
                raise NonFiniteLossError(
                    f"gradient norm is {grad_norm} at epoch {epoch}, step {step + 1}; stopped before updating "
                    f"the weights — lower --lr/--blr or use --clip-grad")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - step_start
            step_start = time.perf_counter()
            images = len(batch[0] if isinstance(batch, (list, tuple)) else batch) * accum * distributed.world_size()
            record = {"epoch": epoch, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": grad_norm, "img_per_s": images / elapsed}
            logger.log(record, step)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_per_s']:.1f}")
            progress.update()
            if step_hook is not None:
                step_hook(step, batch, outputs)
    except BaseException as interrupt:
        mark_progress(interrupt, epoch, step)
        raise
    finally:
        progress.close()
    return {"loss": sum(losses) / len(losses)}, step


def mark_progress(interrupt: BaseException, epoch: int, step: int, checkpoint: Path | None = None) -> None:
    """Note on a KeyboardInterrupt / SIGTERM where training stood (the innermost note wins)
    and the checkpoint ``--resume auto`` would continue from (None: nothing to resume)."""
    if isinstance(interrupt, Exception):
        return
    if not hasattr(interrupt, "progress"):
        interrupt.progress = (epoch, step)
    if checkpoint is not None and not hasattr(interrupt, "checkpoint"):
        interrupt.checkpoint = checkpoint


@dataclass
class RunInfo:
    """What every checkpoint records about the run besides the training state."""

    model_name: str
    args: argparse.Namespace
    output_dir: Path
    save_every: int = 0


@dataclass
class TrainingRun:
    """A model ready to train: ``model`` is the bare module (saved, evaluated), ``train_model``
    its DDP/compiled wrapper (trained); training continues after ``start_epoch`` epochs and
    ``step`` optimizer steps (0, 0 for a fresh run)."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    start_epoch: int = 0
    step: int = 0
    resume_path: Path | None = None


@dataclass
class Callbacks:
    """Optional hooks of :func:`fit`.

    * ``on_step(global_step, batch, outputs)``: after every optimizer step (EMA, images);
    * ``end_of_epoch(epoch) -> metrics``: after every epoch (evaluation), logged with it;
    * ``extra_state() -> entries``: more checkpoint entries (EMA weights).
    """

    on_step: StepHook | None = None
    end_of_epoch: Callable[[int], dict[str, float]] | None = None
    extra_state: Callable[[], dict[str, Any]] | None = None


def fit(run: TrainingRun, loader, loss_fn: LossFn, config: TrainingConfig, info: RunInfo, logger: RunLogger,
        callbacks: Callbacks | None = None) -> Path:
    """The epoch loop shared by every command: train, evaluate, checkpoint atomically.

    Returns the path of ``checkpoint-last.pth``.
    """
    callbacks = callbacks or Callbacks()
    last = info.output_dir / ckpt.LAST
    batches = BatchStream(loader, run.start_epoch) if run.start_epoch < config.epochs else []
    epoch, step = run.start_epoch, run.step
    saved = run.resume_path is not None and run.resume_path == last   # what --resume auto would find
    try:
        for epoch in range(run.start_epoch, config.epochs):
            stats, step = train_one_epoch(run.train_model, batches, run.optimizer, run.scaler, loss_fn, config,
                                          epoch, step, run.device, logger, callbacks.on_step)
            # Evaluation draws random numbers (data-loader seeds); put the streams back afterwards,
            # so an uninterrupted run continues exactly where a resumed one does.
            local_rng = ckpt.capture_rng_state()
            rng = distributed.all_gather_state(local_rng)
            metrics = callbacks.end_of_epoch(epoch) if callbacks.end_of_epoch else {}
            ckpt.restore_rng_state(local_rng)
            weights = {"model": run.model.state_dict(), **(callbacks.extra_state() if callbacks.extra_state else {})}
            broken = ckpt.first_non_finite(weights)   # on every rank: under DDP all ranks stop together
            if broken is not None:
                raise NonFiniteLossError(
                    f"{broken} is not finite after epoch {epoch}, step {step}; not saved — {last} "
                    f"still holds the last good state; lower --lr/--blr or use --clip-grad")
            if distributed.is_main_process():
                state = ckpt.training_checkpoint(weights, run.optimizer, run.scaler, epoch, step, info.args,
                                                 info.model_name, rng)
                ckpt.atomic_save(state, last)
                saved = True
                if info.save_every and (epoch + 1) % info.save_every == 0:   # named by epochs completed
                    ckpt.atomic_link(last, info.output_dir / f"checkpoint-{epoch + 1}.pth")
                record = {"epoch": epoch, "epoch_loss": stats["loss"], **metrics}
                logger.log(record, step, prefix="epoch")
                log.info(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            distributed.barrier()
    except BaseException as interrupt:
        mark_progress(interrupt, epoch, step, last if saved else None)
        raise
    return last

"""The training loop of every command and nothing else: AMP, gradient accumulation, DDP, the
NaN guard, logging, checkpoints at epoch ends and at a preemption stop. It takes typed pieces
(:class:`TrainingRun`, :class:`TrainingConfig`, :class:`RunInfo`), never the command line;
:mod:`fcmae.run` builds them."""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed, preemption
from .atomic import atomic_link, atomic_save
from .loader import BatchStream
from .logger import RunLogger
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


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(item, device) for item in batch)
    return batch


@dataclass
class EpochResult:
    """What :func:`train_one_epoch` did: the loss of every batch of the epoch so far (those of
    an interrupted part first), the global optimizer step after it, and where it stopped early
    on a preemption request (the batches of the epoch done), None for a whole epoch."""

    losses: list[float]
    step: int
    stopped_after: int | None = None
    stop_requested: bool = False

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, loss_fn: LossFn, config: TrainingConfig,
                    epoch: int, step: int, device: torch.device, logger: RunLogger,
                    step_hook: StepHook | None = None, start_batch: int = 0,
                    earlier_losses: list[float] | None = None) -> EpochResult:
    """Train ``epoch`` on ``len(batches) // accum_iter`` optimizer steps taken from ``batches``
    (a :class:`~fcmae.loader.BatchStream`, or any sized iterable), from batch ``start_batch``
    on (a resumed mid-epoch checkpoint: ``batches`` then starts there, ``earlier_losses`` are
    the losses before it). A preemption request (:mod:`fcmae.preemption`, on any rank) ends
    the epoch after the optimizer step in progress, on every rank at the same step."""
    model.train()
    accum = config.accum_iter
    steps = len(batches) // accum
    if steps == 0:
        raise ValueError(f"an epoch has {len(batches)} batches, fewer than --accum-iter {accum}")
    amp_dtype = AMP_DTYPES[config.amp]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = list(earlier_losses or [])
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(total=steps, initial=start_batch // accum, desc=f"epoch {epoch}",
                    disable=not distributed.is_main_process(), dynamic_ncols=True)
    step_start = time.perf_counter()
    try:
        for index, batch in enumerate(itertools.islice(iter(batches), steps * accum - start_batch), start_batch):
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
                loss_sum, stop_votes = distributed.all_reduce_sums(
                    [loss.item(), float(preemption.requested() is not None)], device)
                loss_value = loss_sum / distributed.world_size()
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
            if stop_votes:
                within = index + 1 < steps * accum
                return EpochResult(losses, step, stopped_after=index + 1 if within else None, stop_requested=True)
    except BaseException as interrupt:
        mark_progress(interrupt, epoch, step)
        raise
    finally:
        progress.close()
    return EpochResult(losses, step)


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
    """What every checkpoint records about the run besides the training state: the model
    name and the run's settings (plain values), where checkpoints go and how often a named
    copy is kept."""

    model_name: str
    settings: dict[str, Any]
    output_dir: Path
    save_every: int = 0


@dataclass
class TrainingRun:
    """A model ready to train: ``model`` is the bare module (saved, evaluated), ``train_model``
    its DDP/compiled wrapper (trained); training continues at epoch ``start_epoch``, batch
    ``start_batch`` of it, after ``step`` optimizer steps (0, 0, 0 for a fresh run)."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    start_epoch: int = 0
    step: int = 0
    resume_path: Path | None = None
    start_batch: int = 0                                          # > 0: resumed within start_epoch
    epoch_losses: list[float] = field(default_factory=list)      # the losses of those batches


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
    batches = BatchStream(loader, run.start_epoch, run.start_batch) if run.start_epoch < config.epochs else []
    epoch, step = run.start_epoch, run.step
    saved = run.resume_path is not None and run.resume_path == last   # what --resume auto would find

    def save(epoch_done: int, result: EpochResult, rng: list) -> None:
        weights = {"model": run.model.state_dict(), **(callbacks.extra_state() if callbacks.extra_state else {})}
        broken = ckpt.first_non_finite(weights)   # on every rank: under DDP all ranks stop together
        if broken is not None:
            raise NonFiniteLossError(
                f"{broken} is not finite after epoch {epoch}, step {step}; not saved — {last} "
                f"still holds the last good state; lower --lr/--blr or use --clip-grad")
        if distributed.is_main_process():
            in_epoch = {"batch": result.stopped_after, "epoch_losses": result.losses} if result.stopped_after else {}
            atomic_save(ckpt.training_checkpoint(weights, run.optimizer, run.scaler, epoch_done, step, info.settings,
                                                      info.model_name, rng, **in_epoch), last)

    try:
        for epoch in range(run.start_epoch, config.epochs):
            resumed_within = epoch == run.start_epoch and run.start_batch > 0
            result = train_one_epoch(run.train_model, batches, run.optimizer, run.scaler, loss_fn, config, epoch,
                                     step, run.device, logger, callbacks.on_step,
                                     start_batch=run.start_batch if resumed_within else 0,
                                     earlier_losses=run.epoch_losses if resumed_within else None)
            step = result.step
            # The epoch is saved before evaluation, so a failing evaluation or monitor never costs
            # the training. Evaluation draws random numbers (data-loader seeds); the streams are
            # put back afterwards, so an uninterrupted run continues exactly where a resumed one does.
            local_rng = ckpt.capture_rng_state()
            rng = distributed.all_gather_state(local_rng)
            if result.stopped_after:      # preempted within the epoch: a mid-epoch checkpoint, then stop
                save(epoch - 1, result, rng)
                saved = True
                distributed.barrier()
                raise preemption.Preempted(epoch, step, str(last))
            save(epoch, result, rng)
            saved = True
            if distributed.is_main_process() and info.save_every and (epoch + 1) % info.save_every == 0:
                atomic_link(last, info.output_dir / f"checkpoint-{epoch + 1}.pth")   # named by epochs done
            # preempted at the epoch's last step: no monitors (the time left is short)
            run_callbacks = callbacks.end_of_epoch is not None and not result.stop_requested
            metrics = callbacks.end_of_epoch(epoch) if run_callbacks else {}
            ckpt.restore_rng_state(local_rng)
            if distributed.is_main_process():
                record = {"epoch": epoch, "epoch_loss": result.loss, **metrics}
                logger.log(record, step, prefix="epoch")
                log.info(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            distributed.barrier()
            if result.stop_requested:
                raise preemption.Preempted(epoch + 1, step, str(last))
    except BaseException as interrupt:
        mark_progress(interrupt, epoch, step, last if saved else None)
        raise
    return last

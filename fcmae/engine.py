"""One training loop for every command: AMP, gradient accumulation, DDP, NaN guard, logging."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .logger import RunLogger
from .optim import cosine_lr, set_lr

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# loss_fn(model, batch) -> (loss, outputs); outputs are handed to the step hook.
LossFn = Callable[[nn.Module, Any], tuple[Tensor, Any]]
StepHook = Callable[[int, Any, Any], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the weights are touched."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule and step settings shared by pretraining and fine-tuning."""

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    accum_iter: int = 1
    clip_grad: float | None = None
    amp: str = "none"
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (None: whole loader)


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


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, loss_fn: LossFn, config: ScheduleConfig,
                    epoch: int, step: int, device: torch.device, logger: RunLogger,
                    step_hook: StepHook | None = None) -> tuple[dict[str, float], int]:
    """Train ``epoch``; returns ({'loss': mean, ...}, global optimizer step after the epoch)."""
    model.train()
    accum = config.accum_iter
    steps = len(loader) // accum
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    if steps == 0:
        raise ValueError(f"an epoch has {len(loader)} batches, fewer than --accum-iter {accum}")
    amp_dtype = AMP_DTYPES[config.amp]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(total=steps, desc=f"epoch {epoch}", disable=not distributed.is_main_process(),
                    dynamic_ncols=True)
    step_start = time.perf_counter()
    for index, batch in enumerate(loader):
        if index >= steps * accum:
            break
        if index % accum == 0:
            lr = cosine_lr(epoch + index / (steps * accum), config.lr, config.min_lr,
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
                progress.close()
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
    progress.close()
    return {"loss": sum(losses) / len(losses)}, step


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)

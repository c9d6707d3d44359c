"""The run builder: everything that turns the command line into a run, alike for pretraining
and fine-tuning — the device and process group, the output folder, the learning rate from
the effective batch, AdamW and the loss scaler, resuming, DDP and ``torch.compile`` wrapping,
preemption and requeue, and the logged call of :func:`~fcmae.engine.fit` (the loop, which
never sees the command line)."""
from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from . import distributed, preemption, slurm
from .atomic import remove_stale_temp_files
from .engine import AMP_DTYPES, Callbacks, LossFn, RunInfo, TrainingConfig, TrainingRun, fit
from .logger import LOG_FILE, RunLogger
from .models.layers import enable_grad_checkpointing
from .models.registry import family_kwargs

log = logging.getLogger(__name__)


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
        for stale in remove_stale_temp_files(output_dir):
            log.warning(f"removed {stale}, left by an interrupted save")


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; choose one of {list(AMP_DTYPES)}")
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def model_kwargs(args: argparse.Namespace, device: torch.device) -> dict:
    """Constructor kwargs from the model family's own flags (e.g. ``--dcn-impl``)."""
    return family_kwargs(args.model, args, device.type)


def resolve_warmup(args: argparse.Namespace, recipe_epochs: int, recipe_warmup: float) -> None:
    """Set ``args.warmup_epochs`` when unset: the recipe's share of the run (e.g. 40 of 800
    epochs = 5 %), so a short run warms up as quickly, in proportion, as the full one. A
    warm-up as long as the run is warned about: the lr would never reach its peak."""
    if args.warmup_epochs is None:
        args.warmup_epochs = recipe_warmup * args.epochs / recipe_epochs
    if args.warmup_epochs >= args.epochs:
        log.warning(f"--warmup-epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning rate is still "
                    f"rising when the run ends and never reaches its peak; lower --warmup-epochs")


def scale_lr(args: argparse.Namespace, world_size: int) -> int:
    """Set ``args.lr = blr · effective batch / 256`` unless ``--lr`` was given; returns the
    effective batch (per-process batch × accumulation × processes)."""
    effective_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * effective_batch / 256
    return effective_batch


# Settings a resumed run shares with its checkpoint, or it does not continue the same run
# exactly (data, crops and masks, the batches' composition); another value needs
# --allow-changed-settings. Every other difference is listed, except the purely operational
# (and the model, which the weights themselves must fit).
RESUME_MUST_MATCH = ("data_path", "input_size", "mask_ratio", "batch_size", "accum_iter", "seed")
RESUME_OPERATIONAL = ("model", "resume", "output_dir", "log_dir", "log_level", "num_workers", "device", "threads",
                      "dist_backend", "overwrite", "allow_changed_settings", "save_every", "vis_every", "eval",
                      "preempt_signal", "requeue")


def check_resume_settings(saved: dict, args: argparse.Namespace) -> None:
    """Compare the settings a checkpoint was trained with to this run's: refuse a change of
    :data:`RESUME_MUST_MATCH` unless ``--allow-changed-settings``, and list every difference."""
    current = vars(args)
    changed = {key: (saved[key], current[key]) for key in saved.keys() & current.keys()
               if key not in RESUME_OPERATIONAL and str(saved[key]) != str(current[key])}
    if not changed:
        return
    listed = ", ".join(f"--{key.replace('_', '-')} {old} → {new}" for key, (old, new) in sorted(changed.items()))
    blocking = sorted(key for key in changed if key in RESUME_MUST_MATCH)
    if blocking and not getattr(args, "allow_changed_settings", False):
        raise ckpt.CheckpointError(f"resuming with other settings than the checkpoint's ({listed}); "
                                   f"{', '.join('--' + key.replace('_', '-') for key in blocking)} would not continue "
                                   f"the same run: use the checkpoint's values, or pass --allow-changed-settings")
    log.warning(f"resuming with settings that differ from the checkpoint's: {listed}")


def start_training(args: argparse.Namespace, model: nn.Module, param_groups: list[dict], device: torch.device,
                   betas: Sequence[float] = (0.9, 0.999), extra_state: dict | None = None,
                   initialise: Callable[[nn.Module], None] | None = None) -> TrainingRun:
    """AdamW on ``param_groups`` at ``args.lr``, the loss scaler, the state of a checkpoint
    found by ``--resume`` (``extra_state``: more modules it restores, e.g. EMA), then the
    DDP/compiled wrapper. Without a checkpoint to resume, ``initialise(model)`` runs on the bare
    model first (e.g. ``--init``): a resumed run already holds its weights.
    ``run.start_epoch >= args.epochs`` when the checkpoint already holds the whole run."""
    if args.grad_checkpointing:
        enable_grad_checkpointing(getattr(model, "encoder", model), args.model)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=tuple(betas))
    run = TrainingRun(model, model, optimizer, make_scaler(args.amp, device), device)
    run.resume_path = ckpt.find_resume(args.resume, Path(args.output_dir))
    if run.resume_path is not None:
        point = ckpt.resume_training(run.resume_path, model, optimizer, run.scaler, args.model, distributed.rank(),
                                     distributed.world_size(), extra_state,
                                     lambda saved: check_resume_settings(saved, args))
        run.start_epoch, run.step, run.start_batch, run.epoch_losses = (point.epoch, point.step, point.batch,
                                                                        point.epoch_losses)
        within = f", batch {run.start_batch} of it (a mid-epoch checkpoint)" if run.start_batch else ""
        log.info(f"resumed from {run.resume_path}: epoch {run.start_epoch}{within}, step {run.step}")
        if run.start_epoch >= args.epochs:
            log.info(f"{run.resume_path} already holds all {args.epochs} epochs; raise --epochs to train longer")
            return run
    elif initialise is not None:
        initialise(model)
    if distributed.world_size() > 1:
        run.train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run.train_model = torch.compile(run.train_model, dynamic=False)  # every step has the same shapes
    return run


def train(run: TrainingRun, args: argparse.Namespace, loader, loss_fn: LossFn,
          make_callbacks: Callable[[RunLogger], Callbacks] | None = None) -> Path:
    """:func:`~fcmae.engine.fit` with the schedule of ``args``, TensorBoard/JSON logging
    (``--log-dir``, main process only) and checkpoints in ``--output-dir``; ``make_callbacks(logger)``
    gives the hooks. Returns the path of the last checkpoint."""
    output_dir = Path(args.output_dir)
    logger = RunLogger(Path(args.log_dir) if args.log_dir else output_dir, enabled=distributed.is_main_process(),
                       resume_step=run.step)   # a fresh start (step 0) keeps no record of an earlier one
    config = TrainingConfig(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                            accum_iter=args.accum_iter, clip_grad=args.clip_grad, amp=args.amp)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts:
        log.info(f"Slurm job {os.environ.get('SLURM_JOB_ID')} restarted {restarts} time(s) (requeued)")
    try:
        with preemption.handling(args.preempt_signal):
            info = RunInfo(args.model, run_settings(args), output_dir, args.save_every)
            return fit(run, loader, loss_fn, config, info, logger, make_callbacks(logger) if make_callbacks else None)
    except preemption.Preempted as stop:
        if args.requeue:
            stop.requeued = requeue(run.device)
        raise
    finally:
        logger.close()


def run_settings(args: argparse.Namespace) -> dict:
    """The settings a checkpoint records (what ``--resume`` compares): every flag, paths as text."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def requeue(device: torch.device) -> str | None:
    """``--requeue`` after a preemption stop: rank 0 requeues the Slurm job; every rank learns
    whether it worked (one collective), so all exit alike. Returns the job id, or None."""
    requeued, failure = 0.0, None
    if distributed.is_main_process():
        try:
            slurm.requeue_job()
            requeued = 1.0
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            failure = error
    if failure is not None:
        log.error(f"not requeued: {failure}; resubmit the job (it continues with --resume auto)")
    if distributed.all_reduce_sums([requeued], device)[0] == 0:
        return None
    log.info(f"requeued Slurm job {os.environ.get('SLURM_JOB_ID')}: it starts again and continues with "
             f"--resume auto")
    return os.environ.get("SLURM_JOB_ID")

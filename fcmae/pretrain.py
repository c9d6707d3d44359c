"""FCMAE pretraining: builds data, model, optimizer; runs epochs; checkpoints and resumes."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from . import create_fcmae, distributed
from .data import build_pretrain_dataset
from .engine import RunInfo, TrainingConfig, check_device, fit, make_scaler, prepare_output, setup_run
from .loader import make_train_loader
from .logger import RunLogger
from .masking import check_pretraining_masks
from .models.internimage import dcn_options
from .models.layers import enable_grad_checkpointing
from .optim import param_groups
from .reconstruction import reconstruction_grid

# Official FCMAE recipe (ConvNeXt-V2 pretraining) and the short built-in demo run.
OFFICIAL_RECIPE = dict(epochs=800, batch_size=64, blr=1.5e-4, warmup_epochs=40)
DEMO_RECIPE = dict(epochs=30, batch_size=16, blr=1.6e-2, warmup_epochs=3)


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset --epochs/--batch-size/--blr/--warmup-epochs from the matching recipe."""
    recipe = DEMO_RECIPE if args.data_path is None else OFFICIAL_RECIPE
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    check_pretraining_masks(args.input_size, 32, args.mask_ratio)
    dcn_options(args.model, args.dcn_impl, check_device(args.device).type)   # refuses a bad --dcn-impl early
    if args.init and not Path(args.init).is_file():
        raise ckpt.CheckpointError(f"--init {args.init!r} is not a file")
    for name in ("epochs", "batch_size", "accum_iter"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def run_pretraining(args: argparse.Namespace) -> tuple[Path, torch.nn.Module]:
    """Pretrain as ``args`` says; returns (path of the last checkpoint, the trained FCMAE)."""
    resolve_recipe(args)
    check_args(args)
    rank, world_size, device = setup_run(args)
    main = distributed.is_main_process()
    output_dir = Path(args.output_dir)
    log_dir = Path(args.log_dir) if args.log_dir else output_dir
    prepare_output(output_dir, log_dir)

    dataset = build_pretrain_dataset(args.data_path, args.input_size, args.seed, args.batch_size,
                                     args.shard_index, cache=output_dir / "file-list.txt")
    loader = make_train_loader(dataset, args.batch_size, args.num_workers, device, args.seed,
                               args.accum_iter, args.steps_per_epoch)

    model = create_fcmae(args.model, mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim,
                         decoder_depth=args.decoder_depth, norm_pix_loss=args.norm_pix_loss,
                         backend=args.backend, **dcn_options(args.model, args.dcn_impl, device.type)).to(device)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model.encoder, args.model)
    eff_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    scaler = make_scaler(args.amp, device)

    start_epoch, step = 0, 0
    resume_path = ckpt.find_resume(args.resume, output_dir)
    if resume_path is not None:
        start_epoch, step = ckpt.resume_training(resume_path, model, optimizer, scaler, args.model,
                                                 rank, world_size)
        if main:
            print(f"resumed from {resume_path}: epoch {start_epoch}, step {step}"
                  + (f" (--init {args.init} is already part of this run)" if args.init else ""))
        if start_epoch >= args.epochs:
            if main:
                print(f"{resume_path} already holds all {args.epochs} epochs; raise --epochs to train longer")
            return resume_path, model
    elif args.init:
        loaded = ckpt.init_from_fcmae(model, args.init, args.model)
        if main:
            print(f"initialised from {args.init}: {loaded}; fresh optimizer and schedule")

    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model, dynamic=False)  # FCMAE shapes repeat every step

    logger = RunLogger(log_dir, enabled=main, resume_step=step if resume_path is not None else None)
    if main:
        print(f"fcmae-pretrain: {args.model} on {len(dataset)} images "
              f"({'built-in demo photos' if args.data_path is None else args.data_path}), "
              f"{world_size} process(es) on {device}, backend {args.backend}, "
              f"eff. batch {eff_batch}, lr {args.lr:.3g}, {args.epochs} epochs")
    config = TrainingConfig(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                            epochs=args.epochs, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                            amp=args.amp)

    def log_reconstructions(global_step: int, imgs: torch.Tensor, outputs) -> None:
        if main and args.vis_every and global_step % args.vis_every == 0:
            pred, mask = outputs
            grid = reconstruction_grid(imgs.detach(), pred.detach(), mask, model.patch_size,
                                       args.norm_pix_loss)
            logger.log_image("reconstruction", grid, global_step)

    def skipped_images(epoch: int) -> dict[str, float]:
        return {"skipped_image_reads": dataset.num_skipped} if dataset.num_skipped else {}

    run = RunInfo(args.model, args, output_dir, args.save_every)
    try:
        last = fit(model, train_model, loader, optimizer, scaler, _fcmae_loss, config, run,
                   start_epoch, step, device, logger, log_reconstructions, skipped_images)
    finally:
        logger.close()
    return last, model


def _fcmae_loss(model, imgs):
    loss, pred, mask = model(imgs)
    return loss, (pred, mask)

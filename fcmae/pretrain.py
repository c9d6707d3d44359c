"""FCMAE pretraining: builds data, model, optimizer; runs epochs; checkpoints and resumes."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from .autoencoder import create_fcmae
from .data import check_readable
from .datasets import build_pretrain_dataset
from .engine import Callbacks
from .loader import make_train_loader
from .logger import RunLogger
from .masking import check_pretraining_masks
from .monitor import KnnMonitor, ReconstructionMonitor
from .optim import param_groups
from .reconstruction import reconstruction_grid
from .run import check_device, model_kwargs, prepare_output, resolve_warmup, scale_lr, setup_run, start_training, train
from .weights import WeightsFile, init_from_fcmae, read_pretraining_weights

log = logging.getLogger(__name__)

# Official FCMAE recipe (ConvNeXt-V2 pretraining) and the short built-in demo run.
OFFICIAL_RECIPE = dict(epochs=800, batch_size=64, blr=1.5e-4, warmup_epochs=40)
DEMO_RECIPE = dict(epochs=30, batch_size=16, blr=1.6e-2, warmup_epochs=3)


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset --epochs/--batch-size/--blr from the matching recipe, and --warmup-epochs
    as the recipe's share of --epochs (:func:`~fcmae.run.resolve_warmup`)."""
    recipe = DEMO_RECIPE if args.data_path is None else OFFICIAL_RECIPE
    for key in ("epochs", "batch_size", "blr"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    resolve_warmup(args, recipe["epochs"], recipe["warmup_epochs"])
    return args


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no data: mask ratio vs input size, family options on this device, --init."""
    check_pretraining_masks(args.input_size, 32, args.mask_ratio)
    model_kwargs(args, check_device(args.device))   # refuses another family's option or a bad value
    if args.init and not Path(args.init).exists():
        raise ckpt.CheckpointError(f"--init {args.init!r} does not exist")


def read_init(path: str | None) -> WeightsFile | None:
    """The ``--init`` weights, read and checked (pretraining weights, finite) before any data."""
    return None if path is None else read_pretraining_weights(path, "--init")


def run_pretraining(args: argparse.Namespace) -> tuple[Path, torch.nn.Module]:
    """Pretrain as ``args`` says; returns (path of the last checkpoint, the trained FCMAE)."""
    resolve_recipe(args)
    check_args(args)
    init_checkpoint = read_init(args.init)
    _, world_size, device = setup_run(args)
    output_dir = Path(args.output_dir)
    prepare_output(output_dir, Path(args.log_dir) if args.log_dir else output_dir, args.resume,
                   args.overwrite)
    with ckpt.output_lock(output_dir, enabled=distributed.is_main_process()):
        return _pretrain(args, world_size, device, output_dir, init_checkpoint)


def _pretrain(args: argparse.Namespace, world_size: int, device: torch.device, output_dir: Path,
              init_checkpoint: dict | None) -> tuple[Path, torch.nn.Module]:
    dataset = build_pretrain_dataset(args.data_path, args.input_size, args.seed, args.batch_size,
                                     args.shard_index, cache=output_dir / "file-list.txt")
    check_readable(dataset, "--data-path" if args.data_path else "the demo photos")
    loader = make_train_loader(dataset, args.batch_size, args.num_workers, device, args.seed,
                               args.accum_iter, args.steps_per_epoch)
    model = create_fcmae(args.model, mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim,
                         decoder_depth=args.decoder_depth, norm_pix_loss=args.norm_pix_loss,
                         backend=args.backend, **model_kwargs(args, device)).to(device)
    effective_batch = scale_lr(args, world_size)
    monitors = build_monitors(args, model.patch_size, device)

    def init_weights(model: torch.nn.Module) -> None:
        if init_checkpoint is not None:
            loaded = init_from_fcmae(model, init_checkpoint, args.model)
            log.info(f"initialised from {args.init}: {loaded}; fresh optimizer and schedule")

    run = start_training(args, model, param_groups(model, args.weight_decay), device, betas=(0.9, 0.95),
                         initialise=init_weights)
    if run.resume_path is not None and args.init:
        log.info(f"(--init {args.init} is already part of this run)")
    if run.start_epoch >= args.epochs:
        return run.resume_path, model
    log.info(f"fcmae-pretrain: {args.model} on {len(dataset)} images per epoch "
             f"({'built-in demo photos' if args.data_path is None else args.data_path}), "
             f"{world_size} process(es) on {device}, backend {args.backend}, "
             f"eff. batch {effective_batch}, lr {args.lr:.3g}, {args.epochs} epochs "
             f"(warm-up {args.warmup_epochs:g})")

    def make_callbacks(logger: RunLogger) -> Callbacks:
        def log_reconstructions(global_step: int, imgs: torch.Tensor, outputs) -> None:
            if distributed.is_main_process() and args.vis_every and global_step % args.vis_every == 0:
                pred, mask = outputs
                grid = reconstruction_grid(imgs.detach(), pred.detach(), mask, model.patch_size, args.norm_pix_loss)
                logger.log_image("reconstruction", grid, global_step)

        def end_of_epoch(epoch: int) -> dict[str, float]:
            metrics = {"skipped_image_reads": dataset.num_skipped} if dataset.num_skipped else {}
            for monitor in monitors:
                metrics |= monitor(model, epoch)
            return metrics
        return Callbacks(on_step=log_reconstructions, end_of_epoch=end_of_epoch)

    return train(run, args, loader, _fcmae_loss, make_callbacks), model


def build_monitors(args: argparse.Namespace, patch_size: int, device: torch.device) -> list:
    """The between-epoch measurements asked for (their data is found and a sample of each
    read now, before training)."""
    monitors: list = []
    if args.knn_data_path:
        monitors.append(KnnMonitor(args.knn_data_path, args.input_size, args.epochs, args.monitor_every, args.knn_k,
                                   args.monitor_max_images, args.batch_size, device))
    if args.val_data_path:
        monitors.append(ReconstructionMonitor(args.val_data_path, args.input_size, patch_size, args.mask_ratio,
                                              args.epochs, args.monitor_every, args.monitor_max_images, args.seed,
                                              args.batch_size, device))
    return monitors


def _fcmae_loss(model, imgs):
    loss, pred, mask = model(imgs)
    return loss, (pred, mask)

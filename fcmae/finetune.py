"""Fine-tuning and linear probing of the dense model from converted FCMAE weights.

Reuses the pretraining engine (``engine.fit``), checkpoint format and resume; adds the
supervised parts: ImageFolder data with timm augmentation, layer-wise lr decay,
mixup/cutmix, label smoothing, model EMA, top-1/top-5 evaluation.
"""
from __future__ import annotations

import argparse
import logging
import types
from pathlib import Path

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from . import checkpoint as ckpt
from . import distributed
from .data import IMAGENET_MEAN, IMAGENET_STD, DataError, check_readable, eval_transform
from .datasets import labeled_dataset
from .engine import AMP_DTYPES, Callbacks, move_to
from .loader import make_train_loader
from .models import create_model, get_model_entry
from .optim import layer_decay_param_groups, param_groups
from .run import model_kwargs, prepare_output, resolve_warmup, scale_lr, setup_run, start_training, train
from .shards import is_shard_spec
from .weights import load_dense_state

log = logging.getLogger(__name__)

# Official ConvNeXt V2 fine-tuning schedule (base): 100 epochs, 20 of them warm-up.
FINETUNE_RECIPE = dict(epochs=100, warmup_epochs=20)


def posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for every bit count RandAugment asks for: the increasing variant keeps
    0 bits at the highest magnitudes, which Pillow 13 refuses; 0 bits keeps nothing (a black
    image), as Pillow did before."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def with_any_bit_posterize(transform):
    """``transform`` (timm's training Compose) with its RandAugment posterize ops replaced by
    :func:`posterize` (same policy, runs on Pillow 13)."""
    for step in getattr(transform, "transforms", [transform]):
        for op in getattr(step, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def train_dataset(args: argparse.Namespace, cache_dir: Path) -> Dataset:
    """The training split with timm augmentation: ``DATA/train`` (an ImageFolder tree) or tar
    shards with ``cls`` labels (``--data-path``, classes from ``shards.json``)."""
    augment = dict(scale=(args.crop_min_scale, 1.0), hflip=args.hflip, color_jitter=None, interpolation="bicubic",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if args.linear_probe:   # crops and flips only, as the official probing recipe
        transform = create_transform(args.input_size, is_training=True, auto_augment=None, re_prob=0.0, **augment)
    else:
        transform = with_any_bit_posterize(create_transform(args.input_size, is_training=True,
                                                            auto_augment=args.aa or None, re_prob=args.reprob,
                                                            re_mode="pixel", re_count=1, **augment))
    path = args.data_path if is_shard_spec(args.data_path) else str(Path(args.data_path) / "train")
    return labeled_dataset(path, transform, args.seed, args.batch_size, args.shard_index,
                           cache_dir / "file-list-train.txt", train=True)


def val_dataset(args: argparse.Namespace, cache_dir: Path | None) -> Dataset:
    """The validation split (center crops): ``--val-data-path`` (a folder or labeled shards),
    else ``DATA/val``; ``cache_dir`` None writes no file list (evaluation writes nothing)."""
    if is_shard_spec(args.data_path) and not args.val_data_path:
        raise DataError("training from shards needs --val-data-path (a folder or shards with 'cls' labels)")
    path = args.val_data_path or str(Path(args.data_path) / "val")
    return labeled_dataset(path, eval_transform(args.input_size, args.eval_crop_pct), args.seed, args.batch_size,
                           args.shard_index, cache_dir / "file-list-val.txt" if cache_dir else None, train=False)


def build_datasets(args: argparse.Namespace, cache_dir: Path) -> tuple[Dataset, Dataset]:
    """Train and validation sets with the same classes (:func:`train_dataset`, :func:`val_dataset`),
    a sample of each read before training."""
    val = val_dataset(args, cache_dir)
    train = train_dataset(args, cache_dir)
    if train.classes != val.classes:
        raise DataError(f"train and val classes differ: {train.classes[:5]} vs {val.classes[:5]}")
    check_readable(train, "--data-path" if is_shard_spec(args.data_path) else f"{args.data_path}/train")
    check_readable(val, "--val-data-path" if args.val_data_path else f"{args.data_path}/val")
    return train, val


def load_pretrained(model: nn.Module, path: str, model_name: str) -> None:
    """Load dense (official layout) or FCMAE weights into ``model``; its head (``head_prefixes``:
    final norm, classifier) may be missing and starts fresh, anything else must fit exactly."""
    ckpt.load_body(model, read_pretrained(path, model_name), model_name, path)


def read_pretrained(path: str, model_name: str) -> dict[str, torch.Tensor]:
    """The dense (official layout) weights of a ``--finetune`` file, whatever :func:`~fcmae.weights.load_encoder`
    reads (FCMAE converted on the fly, timm layout mapped back); read before any data, so a
    bad file costs nothing."""
    state, _, _ = load_dense_state(path, model_name)
    return state


def freeze_encoder(model: nn.Module) -> None:
    """Linear probing: only the head (``head_prefixes``) trains; the encoder's parameters are
    frozen and its modules stay in eval mode whatever ``model.train()`` says, so its features
    are deterministic (no drop path; normalisation layers in inference mode). The override is a
    method bound to ``model``, so a deep copy (timm's EMA) is bound to the copy, never to the
    original."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(model.head_prefixes)
    model.train = types.MethodType(_train_head_only, model)


def _train_head_only(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)`` of a linear probe: the head follows ``mode``, the encoder stays in eval."""
    type(model).train(model, mode)
    for name, module in model.named_children():
        if not f"{name}.".startswith(model.head_prefixes):
            module.eval()
    return model


def make_loss(args: argparse.Namespace, num_classes: int):
    """(criterion, mixup or None) as the official recipe: soft targets under mixup/cutmix."""
    mixup = None
    if not args.linear_probe and (args.mixup > 0 or args.cutmix > 0):
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(args.smoothing), None
    return nn.CrossEntropyLoss(), None


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``loader`` (all ranks)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    dtype = AMP_DTYPES[amp]
    for images, targets in loader:
        images, targets = move_to(images, device), move_to(targets, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.tensor([nn.functional.cross_entropy(logits, targets, reduction="sum").item(),
                                hits[:, :1].sum().item(), hits.sum().item(), len(targets)],
                               dtype=torch.float64, device=device)
    if distributed.is_distributed():
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    if count == 0:
        raise DataError("no validation image could be read (see the warnings above)")
    return {"acc1": 100 * top1 / count, "acc5": 100 * top5 / count, "val_loss": loss / count}


def run_evaluation(args: argparse.Namespace) -> dict[str, float]:
    """``--eval``: the weights of ``--resume`` (a fine-tuning checkpoint; its optimizer is not
    read, so the training run's flags are not needed) or ``--finetune`` on the validation
    split. Builds no optimizer and writes nothing."""
    resume = ckpt.find_resume(args.resume, Path(args.output_dir))
    if not args.finetune and resume is None:
        raise ckpt.CheckpointError("--eval needs weights to evaluate: pass --finetune PATH, or --resume "
                                   "PATH (or auto, with a checkpoint in --output-dir)")
    rank, world_size, device = setup_run(args)
    val_set = val_dataset(args, None)
    model = create_model(args.model, num_classes=len(val_set.classes), **model_kwargs(args, device))
    if resume is not None:
        ckpt.load_training_weights(resume, model, args.model)
    else:
        load_pretrained(model, args.finetune, args.model)
    metrics = evaluate(model.to(device), val_loader(val_set, args, rank, world_size), device, args.amp)
    log.info(f"eval: top-1 {metrics['acc1']:.2f}%  top-5 {metrics['acc5']:.2f}%  "
             f"loss {metrics['val_loss']:.4f} on {len(val_set)} images ({resume or args.finetune})")
    return metrics


def val_loader(val_set: Dataset, args: argparse.Namespace, rank: int, world_size: int) -> DataLoader:
    """Each rank evaluates its own slice (shards split themselves), no padding: reduced counts are exact."""
    return DataLoader(val_set if isinstance(val_set, IterableDataset) else
                      Subset(val_set, range(rank, len(val_set), world_size)),
                      batch_size=args.batch_size, num_workers=args.num_workers)


def run_finetuning(args: argparse.Namespace) -> dict[str, float]:
    """Fine-tune (or linear-probe, or just evaluate); returns the last validation metrics."""
    if args.eval:
        return run_evaluation(args)
    resolve_warmup(args, FINETUNE_RECIPE["epochs"], FINETUNE_RECIPE["warmup_epochs"])
    output_dir = Path(args.output_dir)
    if args.batch_size % 2 and not args.linear_probe and (args.mixup > 0 or args.cutmix > 0):
        raise ValueError(f"--batch-size {args.batch_size} is odd; mixup/cutmix mix pairs of images: use an "
                         f"even batch size, or --mixup 0 --cutmix 0")
    pretrained = read_pretrained(args.finetune, args.model) if args.finetune else None
    rank, world_size, device = setup_run(args)
    prepare_output(output_dir, Path(args.log_dir) if args.log_dir else output_dir, args.resume,
                   args.overwrite)
    with ckpt.output_lock(output_dir, enabled=distributed.is_main_process()):
        return _finetune(args, rank, world_size, device, output_dir, pretrained)


def _finetune(args: argparse.Namespace, rank: int, world_size: int, device: torch.device, output_dir: Path,
              pretrained: dict[str, torch.Tensor] | None) -> dict[str, float]:
    train_set, val_set = build_datasets(args, output_dir)
    num_classes = len(train_set.classes)
    loader = make_train_loader(train_set, args.batch_size, args.num_workers, device, args.seed,
                               args.accum_iter, args.steps_per_epoch)
    validation = val_loader(val_set, args, rank, world_size)

    drop_path = 0.0 if args.linear_probe else args.drop_path   # a frozen encoder computes deterministic features
    model = create_model(args.model, num_classes=num_classes, drop_path_rate=drop_path,
                         head_init_scale=args.head_init_scale, **model_kwargs(args, device))
    if pretrained is not None:
        ckpt.load_body(model, pretrained, args.model, args.finetune)
    if args.linear_probe:
        freeze_encoder(model)
    model.to(device)

    effective_batch = scale_lr(args, world_size)
    groups = (layer_decay_param_groups(model, args.weight_decay, args.layer_decay, args.layer_decay_type)
              if args.layer_decay != 1.0 else param_groups(model, args.weight_decay))
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    run = start_training(args, model, groups, device, extra_state={"model_ema": ema} if ema else None)
    if run.start_epoch >= args.epochs:
        return {}
    criterion, mixup = make_loss(args, num_classes)
    supervised_loss = get_model_entry(args.model).family.supervised_loss

    def classification_loss(net, batch):
        images, targets = batch
        if mixup is not None:
            images, targets = mixup(images, targets)
        outputs = net(images)
        if not torch.is_tensor(outputs):   # more than logits (RevCol's --inter-supervision): the family's loss
            return supervised_loss(outputs, images, targets, criterion), None
        return criterion(outputs, targets), None

    def update_ema(global_step: int, batch, outputs) -> None:
        if ema is not None:
            ema.update(model, step=global_step)

    results: dict[str, float] = {}
    best = {"acc1": -1.0, "epoch": -1}

    def evaluate_epoch(epoch: int) -> dict[str, float]:
        results.clear()
        results.update(evaluate(model, validation, device, args.amp))
        if results["acc1"] > best["acc1"]:
            best.update(acc1=results["acc1"], epoch=epoch)
        if ema is not None:
            results.update({f"ema_{k}": v for k, v in evaluate(ema.module, validation, device, args.amp).items()})
        skipped = train_set.num_skipped + val_set.num_skipped
        return {**results, **({"skipped_image_reads": skipped} if skipped else {})}

    mode = "linear probe" if args.linear_probe else "fine-tune"
    log.info(f"fcmae-finetune ({mode}): {args.model}, {num_classes} classes, {len(train_set)} train / "
             f"{len(val_set)} val images, eff. batch {effective_batch}, lr {args.lr:.3g}, "
             f"{args.epochs} epochs (warm-up {args.warmup_epochs:g}), "
             f"weights {args.finetune or 'random init'}")
    last = train(run, args, loader, classification_loss, lambda logger: Callbacks(
        on_step=update_ema, end_of_epoch=evaluate_epoch,
        extra_state=(lambda: {"model_ema": ema.state_dict()}) if ema else None))
    ema_note = f", EMA {results['ema_acc1']:.2f}%" if "ema_acc1" in results else ""
    log.info(f"done: top-1 {results['acc1']:.2f}% after the last epoch{ema_note} (best {best['acc1']:.2f}% after "
             f"epoch {best['epoch']}, counting from 0) on {len(val_set)} val images; checkpoint {last}\n"
             f"next: fcmae-finetune --data-path {args.data_path} --model {args.model} --input-size {args.input_size} "
             f"--eval --resume {last}")
    return results

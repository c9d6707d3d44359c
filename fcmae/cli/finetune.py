"""``fcmae-finetune``: supervised fine-tuning / linear probing of the dense model."""
from __future__ import annotations

import argparse

import torch

from .. import list_models
from ..checkpoint import CheckpointError
from ..data import DataError
from ..engine import AMP_DTYPES, NonFiniteLossError
from . import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    add_execution_arguments,
    number,
    run_or_exit,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae-finetune",
        description="Fine-tune or linear-probe a dense model on an ImageFolder with train/ and val/ "
                    "splits, starting from fcmae-convert output (or an FCMAE checkpoint, converted on "
                    "the fly). Defaults follow the official ConvNeXt V2 fine-tuning recipe for base. "
                    "Official underscore spellings are accepted too.")
    add = parser.add_argument
    add("--model", default="convnextv2_atto", help=f"one of {', '.join(list_models())}")
    add("--data-path", "--data_path", required=True,
        help="folder with train/ and val/ ImageFolder trees, or WebDataset tar shards with 'cls' labels "
             "('/data/train-{000000..000127}.tar', 'pipe:CMD')")
    add("--val-data-path", "--val_data_path", default=None,
        help="validation ImageFolder tree or shards (default DATA/val; required with shards)")
    add("--shard-index", "--shard_index", default=None,
        help="shards.json written by fcmae-shards (sample counts, class names); needed for pipe: shards")
    add("--finetune", default=None, help="pretrained weights (fcmae-convert output); omit for random init")
    add("--output-dir", "--output_dir", default="output/finetune")
    add("--log-dir", "--log_dir", default=None)
    add("--epochs", type=POSITIVE_INT, default=100)
    add("--batch-size", "--batch_size", type=POSITIVE_INT, default=64, help="per process")
    add("--accum-iter", "--accum_iter", type=POSITIVE_INT, default=1)
    add("--blr", type=POSITIVE, default=6.25e-4, help="base lr; lr = blr * effective batch / 256")
    add("--lr", type=NON_NEGATIVE, default=None, help="absolute lr (overrides --blr)")
    add("--min-lr", "--min_lr", type=NON_NEGATIVE, default=1e-6)
    add("--warmup-epochs", "--warmup_epochs", type=NON_NEGATIVE, default=20)
    add("--weight-decay", "--weight_decay", type=NON_NEGATIVE, default=0.05)
    add("--layer-decay", "--layer_decay", type=number(float, 0, 1, low_open=True), default=1.0,
        help="layer-wise lr decay (1.0: off)")
    add("--layer-decay-type", "--layer_decay_type", choices=["single", "group"], default="single")
    add("--drop-path", "--drop_path", type=number(float, 0, 1, high_open=True), default=0.1)
    add_execution_arguments(parser)
    add("--head-init-scale", "--head_init_scale", type=POSITIVE, default=0.001)
    add("--smoothing", type=number(float, 0, 1, high_open=True), default=0.1, help="label smoothing")
    add("--mixup", type=NON_NEGATIVE, default=0.8, help="mixup alpha (0: off)")
    add("--cutmix", type=NON_NEGATIVE, default=1.0, help="cutmix alpha (0: off)")
    add("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy ('' for none)")
    add("--hflip", type=PROBABILITY, default=0.5, help="horizontal flip probability (0 for digits, text ...)")
    add("--reprob", type=PROBABILITY, default=0.25, help="random erasing probability")
    add("--model-ema", "--model_ema", action=argparse.BooleanOptionalAction, default=True)
    add("--model-ema-decay", "--model_ema_decay", type=PROBABILITY, default=0.9999)
    add("--input-size", "--input_size", type=number(int, 32), default=224)
    add("--linear-probe", "--linear_probe", action="store_true",
        help="freeze the encoder; train only the final LayerNorm + linear head on pooled features")
    add("--eval", action="store_true", help="only evaluate (weights from --resume or --finetune)")
    add("--amp", choices=list(AMP_DTYPES), default="none")
    add("--compile", action="store_true")
    add("--clip-grad", "--clip_grad", type=POSITIVE, default=None, help="max global grad norm (omit: no clipping)")
    add("--num-workers", "--num_workers", type=NON_NEGATIVE_INT, default=2)
    add("--seed", type=SEED, default=0)
    add("--resume", default=None, help="checkpoint path or 'auto'")
    add("--save-every", "--save_every", type=NON_NEGATIVE_INT, default=0)
    add("--steps-per-epoch", "--steps_per_epoch", type=POSITIVE_INT, default=None)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dist-backend", "--dist_backend", choices=["nccl", "gloo"], default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .. import distributed
    from ..finetune import run_finetuning
    run_or_exit("fcmae-finetune", lambda: run_finetuning(args),
                (DataError, CheckpointError, NonFiniteLossError, ValueError))
    distributed.cleanup()


if __name__ == "__main__":
    main()

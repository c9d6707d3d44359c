"""Fine-tune or linear-probe a dense model on an ImageFolder with train/ and val/ splits, starting from
fcmae-convert output (or an FCMAE checkpoint, converted on the fly). Defaults follow the official
ConvNeXt V2 fine-tuning recipe for base; an unset --warmup-epochs is the recipe's share of --epochs
(20 of 100). Official underscore spellings are accepted too."""
from __future__ import annotations

import argparse
from functools import partial

from ..finetune import FINETUNE_RECIPE, run_finetuning
from . import NON_NEGATIVE, POSITIVE, PROBABILITY, add_training_arguments, cli_main, new_parser, number


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("fcmae-finetune", __doc__)
    add = parser.add_argument
    add("--data-path", "--data_path", required=True,
        help="folder with train/ and val/ ImageFolder trees, or WebDataset tar shards with 'cls' labels "
             "('/data/train-{000000..000127}.tar', 'pipe:CMD')")
    add("--val-data-path", "--val_data_path", default=None,
        help="validation ImageFolder tree or shards (default DATA/val; required with shards)")
    add("--finetune", default=None, help="pretrained weights (fcmae-convert output); omit for random init")
    add_training_arguments(parser, "finetune")
    parser.set_defaults(output_dir="output/finetune", epochs=FINETUNE_RECIPE["epochs"], batch_size=64, blr=6.25e-4,
                        min_lr=1e-6)
    add("--layer-decay", "--layer_decay", type=number(float, 0, 1, low_open=True), default=1.0,
        help="layer-wise lr decay (1.0: off)")
    add("--layer-decay-type", "--layer_decay_type", choices=["single", "group"], default="single")
    add("--drop-path", "--drop_path", type=number(float, 0, 1, high_open=True), default=0.1)
    add("--head-init-scale", "--head_init_scale", type=POSITIVE, default=0.001)
    add("--smoothing", type=number(float, 0, 1, high_open=True), default=0.1, help="label smoothing")
    add("--mixup", type=NON_NEGATIVE, default=0.8, help="mixup alpha (0: off)")
    add("--cutmix", type=NON_NEGATIVE, default=1.0, help="cutmix alpha (0: off)")
    add("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy ('' for none)")
    add("--hflip", type=PROBABILITY, default=0.5, help="horizontal flip probability (0 for digits, text ...)")
    add("--reprob", type=PROBABILITY, default=0.25, help="random erasing probability")
    add("--crop-min-scale", "--crop_min_scale", type=number(float, 0, 1, low_open=True), default=0.08,
        help="RandomResizedCrop's smallest area fraction (0.08 as ImageNet; larger for small or centred images)")
    add("--eval-crop-pct", "--eval_crop_pct", type=number(float, 0, 1, low_open=True), default=0.875,
        help="evaluation: resize to input-size / pct, then center crop (1.0: no border cut)")
    add("--model-ema", "--model_ema", action=argparse.BooleanOptionalAction, default=True)
    add("--model-ema-decay", "--model_ema_decay", type=PROBABILITY, default=0.9999)
    add("--linear-probe", "--linear_probe", action="store_true",
        help="freeze the encoder (eval mode: no drop path, whatever --drop-path says); train only the final "
             "LayerNorm + linear head on pooled features")
    add("--eval", action="store_true", help="only evaluate (weights from --resume or --finetune)")
    return parser


def run(args: argparse.Namespace) -> int:
    run_finetuning(args)
    return 0


main = partial(cli_main, build_parser, run)   # main(argv=None): parse, run, exit with its code


if __name__ == "__main__":
    main()

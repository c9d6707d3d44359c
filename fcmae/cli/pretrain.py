"""``fcmae-pretrain``: FCMAE self-supervised pretraining."""
from __future__ import annotations

import argparse
import sys

import torch

import sparse_ops

from .. import list_models
from ..checkpoint import CheckpointError
from ..data import DataError
from ..engine import AMP_DTYPES, NonFiniteLossError
from . import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, add_execution_arguments, number, run_or_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae-pretrain",
        description="FCMAE pretraining of a sparse encoder. Without --data-path it runs a short "
                    "demo on photos bundled with scikit-image. Official underscore spellings "
                    "(--mask_ratio, --data_path, ...) are accepted too.")
    add = parser.add_argument
    add("--model", default="convnextv2_atto", help=f"encoder; one of {', '.join(list_models())}")
    add("--mask-ratio", "--mask_ratio", type=number(float, 0, 1, low_open=True, high_open=True), default=0.6,
        help="fraction of 32-px patches removed, in (0, 1); every image keeps >= 1 visible and >= 1 removed patch")
    add("--data-path", "--data_path", default=None,
        help="ImageFolder tree or flat folder of images (labels ignored), or WebDataset tar shards "
             "('/data/train-{000000..000127}.tar', 'pipe:CMD'); omit for the built-in demo photos")
    add("--shard-index", "--shard_index", default=None,
        help="shards.json written by fcmae-shards (sample counts); needed for pipe: shards, found "
             "beside local shards")
    add("--output-dir", "--output_dir", default="output", help="checkpoints go here")
    add("--log-dir", "--log_dir", default=None, help="TensorBoard events and log.jsonl (default: --output-dir)")
    add("--epochs", type=POSITIVE_INT, default=None, help="default 800 (official), 30 for the demo")
    add("--batch-size", "--batch_size", type=POSITIVE_INT, default=None, help="per process; default 64, demo 16")
    add("--accum-iter", "--accum_iter", type=POSITIVE_INT, default=1, help="gradient accumulation steps")
    add("--blr", type=POSITIVE, default=None,
        help="base lr; lr = blr * effective batch / 256 (default 1.5e-4, demo 1.6e-2)")
    add("--lr", type=NON_NEGATIVE, default=None, help="absolute lr (overrides --blr)")
    add("--min-lr", "--min_lr", type=NON_NEGATIVE, default=0.0, help="final lr of the cosine schedule")
    add("--weight-decay", "--weight_decay", type=NON_NEGATIVE, default=0.05,
        help="AdamW weight decay (not applied to norms, biases, GRN, mask token)")
    add("--warmup-epochs", "--warmup_epochs", type=NON_NEGATIVE, default=None,
        help="linear warmup (default 40, demo 3)")
    add("--input-size", "--input_size", type=POSITIVE_INT, default=224, help="crop size, a multiple of 32")
    add("--decoder-dim", "--decoder_dim", type=POSITIVE_INT, default=512, help="decoder width")
    add("--decoder-depth", "--decoder_depth", type=NON_NEGATIVE_INT, default=1, help="decoder ConvNeXt V2 blocks")
    add("--norm-pix-loss", "--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
        help="regress per-patch normalized pixels")
    add("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype (fp16 uses loss scaling)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--clip-grad", "--clip_grad", type=POSITIVE, default=None, help="max global grad norm (omit: no clipping)")
    add("--backend", default="torch", help=f"sparse backend; registered: {', '.join(sparse_ops.list_backends())}")
    add("--num-workers", "--num_workers", type=NON_NEGATIVE_INT, default=2, help="data loader workers per process")
    add_execution_arguments(parser)
    add("--seed", type=SEED, default=0)
    add("--resume", default=None, help="checkpoint path, or 'auto' for OUTPUT/checkpoint-last.pth if present")
    add("--init", default=None,
        help="continue pretraining from an FCMAE checkpoint (ours or official, .pth or .safetensors): "
             "loads encoder + decoder (encoder only if the file has no decoder) with a fresh optimizer "
             "and schedule; a checkpoint found by --resume takes precedence")
    add("--save-every", "--save_every", type=NON_NEGATIVE_INT, default=0,
        help="also keep checkpoint-EPOCH.pth every N epochs (checkpoint-last.pth is always written)")
    add("--vis-every", "--vis_every", type=NON_NEGATIVE_INT, default=50,
        help="log a reconstruction grid to TensorBoard every N steps (0: never)")
    add("--steps-per-epoch", "--steps_per_epoch", type=POSITIVE_INT, default=None,
        help="cap optimizer steps per epoch (quick runs)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dist-backend", "--dist_backend", choices=["nccl", "gloo"], default=None,
        help="torch.distributed backend under torchrun (default: nccl on GPU, gloo on CPU)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from ..pretrain import run_pretraining
    errors = (DataError, CheckpointError, NonFiniteLossError, ValueError)
    last, _ = run_or_exit("fcmae-pretrain", lambda: run_pretraining(args), errors)
    from .. import distributed
    if distributed.is_main_process():
        print(f"done: checkpoint {last}\n"
              f"next: fcmae-convert {last} -o {last.parent / (args.model + '_dense.pth')} --verify",
              file=sys.stderr)
    distributed.cleanup()


if __name__ == "__main__":
    main()

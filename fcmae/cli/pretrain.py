"""``fcmae-pretrain``: FCMAE self-supervised pretraining."""
from __future__ import annotations

import argparse
import logging

import sparse_ops

from ..checkpoint import CheckpointError
from ..data import DataError
from ..engine import NonFiniteLossError
from . import NON_NEGATIVE_INT, HelpFormatter, add_training_arguments, configure_logging, number, run_or_exit

log = logging.getLogger("fcmae.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae-pretrain", formatter_class=HelpFormatter,
        description="FCMAE pretraining of a sparse encoder. Without --data-path it runs a short "
                    "demo on photos bundled with scikit-image. Official underscore spellings "
                    "(--mask_ratio, --data_path, ...) are accepted too. Unset --epochs, --batch-size, "
                    "--blr and --warmup-epochs follow the official recipe (800, 64, 1.5e-4, 40) or, "
                    "without --data-path, the demo's (30, 16, 1.6e-2, 3).")
    add = parser.add_argument
    add("--data-path", "--data_path", default=None,
        help="ImageFolder tree or flat folder of images (labels ignored), or WebDataset tar shards "
             "('/data/train-{000000..000127}.tar', 'pipe:CMD'); omit for the built-in demo photos")
    add("--mask-ratio", "--mask_ratio", type=number(float, 0, 1, low_open=True, high_open=True), default=0.6,
        help="fraction of 32-px patches removed, in (0, 1); every image keeps >= 1 visible and >= 1 removed patch")
    add_training_arguments(parser)
    parser.set_defaults(output_dir="output", min_lr=0.0)
    add("--decoder-dim", "--decoder_dim", type=number(int, 1), default=512, help="decoder width")
    add("--decoder-depth", "--decoder_depth", type=NON_NEGATIVE_INT, default=1, help="decoder ConvNeXt V2 blocks")
    add("--norm-pix-loss", "--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
        help="regress per-patch normalized pixels")
    add("--backend", default="torch", help=f"sparse backend; registered: {', '.join(sparse_ops.list_backends())}")
    add("--init", default=None,
        help="continue pretraining from an FCMAE checkpoint (ours or official, .pth or .safetensors): "
             "loads encoder + decoder (encoder only if the file has no decoder) with a fresh optimizer "
             "and schedule; a checkpoint found by --resume takes precedence")
    add("--vis-every", "--vis_every", type=NON_NEGATIVE_INT, default=50,
        help="log a reconstruction grid to TensorBoard every N steps (0: never)")
    add("--knn-data-path", "--knn_data_path", default=None,
        help="ImageFolder with train/ and val/: log the k-NN top-1 (%%) of the encoder's pooled features "
             "(knn_top1) every --monitor-every epochs and after the last")
    add("--knn-k", "--knn_k", type=number(int, 1), default=20, help="neighbours of the k-NN monitor")
    add("--val-data-path", "--val_data_path", default=None,
        help="held-out images: log their reconstruction loss under fixed masks (val_loss) every "
             "--monitor-every epochs and after the last")
    add("--monitor-every", "--monitor_every", type=number(int, 1), default=1, help="epochs between k-NN / val checks")
    add("--monitor-max-images", "--monitor_max_images", type=number(int, 1), default=1000,
        help="images per split the k-NN and val checks use at most (spread over the classes)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from ..pretrain import run_pretraining
    errors = (DataError, CheckpointError, NonFiniteLossError, ValueError)
    last, _ = run_or_exit("fcmae-pretrain", lambda: run_pretraining(args), errors)
    from .. import distributed
    log.info(f"done: checkpoint {last}\n"
             f"next: fcmae-convert {last} -o {last.parent / (args.model + '_dense.pth')} --verify")
    distributed.cleanup()


if __name__ == "__main__":
    main()

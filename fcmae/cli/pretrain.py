"""FCMAE pretraining of a sparse encoder. Without --data-path it runs a short demo on photos bundled
with scikit-image. Official underscore spellings (--mask_ratio, --data_path, ...) are accepted too.
Unset --epochs, --batch-size, --blr and --warmup-epochs follow the official recipe (800, 64, 1.5e-4,
40) or, without --data-path, the demo's (30, 16, 1.6e-2, 3)."""
from __future__ import annotations

import argparse
import logging
from functools import partial

import sparse_ops

from . import NON_NEGATIVE_INT, add_training_arguments, cli_main, new_parser, number

log = logging.getLogger("fcmae.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("fcmae-pretrain", __doc__)
    add = parser.add_argument
    add("--data-path", "--data_path", default=None,
        help="ImageFolder tree or flat folder of images (labels ignored), or WebDataset tar shards "
             "('/data/train-{000000..000127}.tar', 'pipe:CMD'); omit for the built-in demo photos")
    add("--mask-ratio", "--mask_ratio", type=number(float, 0, 1, low_open=True, high_open=True), default=0.6,
        help="fraction of 32-px patches removed, in (0, 1); every image keeps >= 1 visible and >= 1 removed patch")
    add_training_arguments(parser, "pretrain")
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


def run(args: argparse.Namespace) -> int:
    """Pretrain, then name the checkpoint and the next command."""
    from ..pretrain import run_pretraining  # torch-heavy: imported when a run starts, not for --help
    last, _ = run_pretraining(args)
    log.info(f"done: checkpoint {last}\n"
             f"next: fcmae-convert {last} -o {last.parent / (args.model + '_dense.pth')} --verify")
    return 0


main = partial(cli_main, build_parser, run)   # main(argv=None): parse, run, exit with its code


if __name__ == "__main__":
    main()

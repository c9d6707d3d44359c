"""Weighted k-NN classification (cosine similarity, temperature 0.07) of the pooled final features of
an encoder: DATA/val against DATA/train. The same code as fcmae-pretrain's --knn-data-path monitor."""
from __future__ import annotations

import argparse
import logging
from functools import partial

from ..knn import knn_evaluate, knn_splits
from ..run import check_device
from ..weights import extract_features, input_size_for, load_encoder
from . import cli_main, new_parser, number

log = logging.getLogger("fcmae.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("fcmae-knn", __doc__)
    add = parser.add_argument
    add("weights", help="FCMAE checkpoint, dense or timm weights, or random:MODEL (as fcmae-analyze)")
    add("--data-path", required=True, help="ImageFolder with train/ and val/")
    add("--k", type=number(int, 1), default=20)
    add("--input-size", type=number(int, 32), default=None,
        help="image side (default: the size the weights were trained at, else 224)")
    add("--eval-crop-pct", type=number(float, 0, 1, low_open=True), default=0.875,
        help="resize to input-size / pct, then center crop (1.0: no border cut)")
    add("--max-images", type=number(int, 1), default=None, help="images per split at most (spread over classes)")
    add("--batch-size", type=number(int, 1), default=64)
    add("--num-workers", type=number(int, 0), default=2)
    add("--model", default=None, help="model name, if the file does not say and it cannot be inferred")
    add("--seed", type=number(int, 0), default=0, help="seed of random:MODEL initialisations")
    add("--device", default="cpu")
    return parser


def run(args: argparse.Namespace) -> float:
    device = check_device(args.device)   # before any weights or data are read
    encoder, model_name = load_encoder(args.weights, args.model, args.seed)
    input_size, source = input_size_for(encoder, args.input_size)
    log.info(f"{model_name}: images at {input_size}px ({source})")
    train, val, classes = knn_splits(args.data_path, input_size, args.max_images, args.eval_crop_pct)
    encoder.to(device)
    top1 = knn_evaluate(lambda images: extract_features(encoder, images), train, val, args.k, args.batch_size,
                        device, args.num_workers)
    log.info(f"{model_name}: k-NN (k={min(args.k, len(train))}) top-1 {top1:.2f}% on {len(val)} val images, "
             f"{len(train)} train images, {len(classes)} classes, {input_size}px")
    return top1


main = partial(cli_main, build_parser, run)   # main(argv=None): parse, run, exit with its code


if __name__ == "__main__":
    main()

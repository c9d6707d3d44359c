#!/usr/bin/env python
"""Is pretraining input-bound? Data-loader img/s beside the model's training img/s.

The loader side runs the real pretraining pipeline (``fcmae.data``: decode, RGB conversion,
RandomResizedCrop + flip, normalisation, collation) over a folder for each worker count; the
model side runs FCMAE training steps (forward, backward, AdamW) on the chosen model and device
with the same batch size. If the loader's img/s at your worker count is below the model's,
the GPU waits for data: add workers or move to faster storage.

    python tools/loader_bench.py                                  # synthetic JPEGs, CPU model
    python tools/loader_bench.py --data-path /data/train --workers 4,8,16 --device cuda --amp bf16

Without ``--data-path`` it writes ``--num-images`` synthetic 500x375 JPEGs (ImageNet's typical
size) to a temporary folder first.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import fcmae
from fcmae.data import build_pretrain_dataset
from fcmae.engine import AMP_DTYPES
from fcmae.optim import param_groups


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=None, help="image folder (default: synthetic JPEGs)")
    parser.add_argument("--num-images", type=int, default=512, help="synthetic images to write")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,2,4", help="comma list of DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=8, help="batches timed per worker count")
    parser.add_argument("--model", default="convnextv2_atto", help="model for the training-step side ('' to skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.num_images, args.batch_size, args.batches, args.steps) < 1:
        parser.error("--num-images, --batch-size, --batches and --steps must be at least 1")
    return args


def write_synthetic_jpegs(folder: Path, count: int) -> None:
    """``count`` 500x375 JPEGs of smooth random colour fields (compress like photos, not noise)."""
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((500, 375), Image.BICUBIC).save(folder / f"{index:06d}.jpg", quality=90)


def loader_img_per_s(data_path: str, args: argparse.Namespace, workers: int) -> float:
    dataset = build_pretrain_dataset(data_path, args.input_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    batches = iter(loader)
    next(batches)                                    # worker start-up is not throughput
    start, images = time.perf_counter(), 0
    for _ in range(args.batches):
        try:
            images += next(batches).shape[0]
        except StopIteration:
            batches = iter(loader)
            images += next(batches).shape[0]
    return images / (time.perf_counter() - start)


def model_img_per_s(args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    model = fcmae.create_fcmae(args.model).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    dtype = AMP_DTYPES[args.amp]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(imgs)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()                                           # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch_size * args.steps / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        data_path = args.data_path
        if data_path is None:
            data_path = scratch
            write_synthetic_jpegs(Path(scratch), args.num_images)
        loader = {int(w): loader_img_per_s(data_path, args, int(w)) for w in args.workers.split(",")}
    model = model_img_per_s(args) if args.model else None
    print(f"input {args.input_size}px, batch {args.batch_size}, data {args.data_path or 'synthetic JPEGs'}")
    print(f"{'workers':<10}{'loader img/s':>14}{'per worker':>12}")
    for workers, rate in loader.items():
        print(f"{workers:<10}{rate:>14.1f}{rate / max(workers, 1):>12.1f}")
    if model is not None:
        enough = [workers for workers, rate in loader.items() if rate >= model]
        verdict = (f"the loader keeps up from {min(enough)} worker(s) on" if enough else
                   "the loader is slower than the model at every worker count tried: input-bound")
        print(f"model {args.model} training step on {args.device} ({args.amp}): {model:.1f} img/s; {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "loader_img_per_s": loader,
                                               "model_img_per_s": model}, indent=2))


if __name__ == "__main__":
    main()

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
size) to a temporary folder first. It also packs them into WebDataset shards (``fcmae-shards``)
and measures the same pipeline reading shards; times the first batch of the second epoch
against the later ones (persistent workers: no restart stall); compares JPEG decoding with
Pillow and with ``torchvision.io.decode_jpeg``; and with ``--scan-files N`` times listing a
generated tree of N tiny files, fresh and from the run's cached file list.
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

import fcmae
from fcmae.data import find_images, load_rgb
from fcmae.datasets import build_pretrain_dataset
from fcmae.engine import AMP_DTYPES
from fcmae.loader import BatchStream, make_train_loader
from fcmae.optim import param_groups
from fcmae.run import check_device
from fcmae.shards import write_shards


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
    parser.add_argument("--scan-files", type=int, default=0, help="also time listing a tree of this many files")
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


def loader_img_per_s(dataset, args: argparse.Namespace, workers: int,
                     restart_each_epoch: bool = False) -> tuple[float, float, float]:
    """(img/s over ``--batches`` batches, first batch of epoch 2 in s, median later batch in s)
    through the training loader: one stream across epochs as in training, or (for comparison)
    a fresh iterator — fresh workers — per epoch. Each batch is "trained" for as long as the
    loader needs per batch, so the workers run ahead as they would beside a model."""
    loader = make_train_loader(dataset, args.batch_size, workers, torch.device("cpu"), seed=0)
    stream = BatchStream(loader, start_epoch=0)
    batches = iter(stream)
    next(batches)                                    # worker start-up is not throughput
    start, count = time.perf_counter(), min(args.batches, len(stream) - 1)
    for _ in range(count):
        next(batches)
    per_batch = (time.perf_counter() - start) / max(count, 1)
    for _ in range(len(stream) - 1 - count):         # finish epoch 1 at the model's pace
        next(batches)
        time.sleep(per_batch)
    if restart_each_epoch:
        batches = iter(BatchStream(loader, start_epoch=1))
    times = []
    for _ in range(len(stream)):
        tick = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - tick)
        time.sleep(per_batch)
    return args.batch_size / per_batch, times[0], float(np.median(times[1:])) if len(times) > 1 else float("nan")


def decode_img_per_s(folder: Path) -> dict[str, float]:
    """JPEG decoding alone, Pillow vs torchvision.io.decode_jpeg (CPU), over the folder's files."""
    from torchvision.io import decode_jpeg
    files = sorted(folder.glob("*.jpg"))
    blobs = [path.read_bytes() for path in files]
    start = time.perf_counter()
    for path in files:
        load_rgb(path)
    pillow = len(files) / (time.perf_counter() - start)
    start = time.perf_counter()
    for blob in blobs:
        decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    return {"pillow": pillow, "torchvision_decode_jpeg": len(files) / (time.perf_counter() - start)}


def scan_seconds(count: int, scratch: Path) -> tuple[float, float]:
    """(fresh scan, cached list) seconds for a tree of ``count`` tiny files in 100 folders."""
    root = scratch / "tree"
    for index in range(count):
        folder = root / f"class{index % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:07d}.jpg").write_bytes(b"x")
    cache = scratch / "file-list.txt"
    start = time.perf_counter()
    find_images(root, cache)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    find_images(root, cache)
    return fresh, time.perf_counter() - start


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
    try:
        check_device(args.device)       # before minutes of measuring, not after
    except ValueError as error:
        raise SystemExit(f"loader_bench: {error}") from None
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = Path(args.data_path) if args.data_path else scratch / "images"
        if args.data_path is None:
            folder.mkdir()
            write_synthetic_jpegs(folder, args.num_images)
            results["decode_img_per_s"] = decode_img_per_s(folder)
        write_shards(folder, scratch / "shards", max_count=max(1, args.num_images // 16), labeled=False)
        shard_count = len(list((scratch / "shards").glob("shard-*.tar")))
        sources = {"folder": build_pretrain_dataset(str(folder), args.input_size, batch_size=args.batch_size),
                   "shards": build_pretrain_dataset(f"{scratch}/shards/shard-{{000000..{shard_count - 1:06d}}}.tar",
                                                    args.input_size, batch_size=args.batch_size)}
        for name, dataset in sources.items():
            for workers in (int(w) for w in args.workers.split(",")):
                rate, first, later = loader_img_per_s(dataset, args, workers)
                results[f"{name}/{workers}"] = {"img_per_s": rate, "epoch2_first_batch_s": first,
                                                "later_batch_s": later}
                if workers > 0 and name == "folder":   # the stall one stream across epochs avoids
                    results[f"{name}/{workers} restarted"] = dict(zip(
                        ("img_per_s", "epoch2_first_batch_s", "later_batch_s"),
                        loader_img_per_s(dataset, args, workers, restart_each_epoch=True)))
        if args.scan_files:
            fresh, cached = scan_seconds(args.scan_files, scratch)
            results["scan_s"] = {"files": args.scan_files, "fresh": fresh, "cached": cached}
    model = model_img_per_s(args) if args.model else None
    print(f"input {args.input_size}px, batch {args.batch_size}, data {args.data_path or 'synthetic JPEGs'}")
    print(f"{'source/workers':<22}{'img/s':>10}{'epoch-2 1st batch s':>22}{'later batch s':>15}")
    for key, value in results.items():
        if "/" in key:
            print(f"{key:<22}{value['img_per_s']:>10.1f}{value['epoch2_first_batch_s']:>22.3f}"
                  f"{value['later_batch_s']:>15.3f}")
    if "decode_img_per_s" in results:
        decode = results["decode_img_per_s"]
        print(f"JPEG decode only: Pillow {decode['pillow']:.0f} img/s, "
              f"torchvision.io.decode_jpeg {decode['torchvision_decode_jpeg']:.0f} img/s")
    if "scan_s" in results:
        scan = results["scan_s"]
        print(f"listing {scan['files']} files: {scan['fresh']:.2f} s fresh, "
              f"{scan['cached']:.2f} s from the cached list")
    if model is not None:
        best = max(value["img_per_s"] for key, value in results.items() if "/" in key)
        verdict = "the loader keeps up" if best >= model else "input-bound: add workers or faster storage"
        print(f"model {args.model} training step on {args.device} ({args.amp}): {model:.1f} img/s; {verdict}")
        results["model_img_per_s"] = model
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()

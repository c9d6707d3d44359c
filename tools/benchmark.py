#!/usr/bin/env python
"""Encoder forward+backward throughput and peak memory: dense vs masked-dense vs sparse.

Every variant runs in its own fresh process (so peak memory is its own) with the same
model size, batch, masks and settings, and the table prints the ratios side by side:

    python tools/benchmark.py --model convnextv2_atto --batch-size 32 --input-size 224
    python tools/benchmark.py --model convnextv2_base --batch-size 128 --device cuda --dtype bf16 --compile

Variants: ``dense`` (no mask, the fine-tuning network), ``masked`` (dense network that
re-applies the mask after every spatial op, the JAX-style reference), ``sparse-<backend>``
for every installed ``sparse_ops`` backend (families with a sparse encoder), and the
variants each family declares (``benchmark_variants`` in its registration: e.g. RevCol's
``masked-plain``, ordinary autograd instead of reversible; InternImage's ``packed`` and,
on CUDA, ``dense-triton``/``packed-triton``). A ``+ckpt`` suffix on a variant of a model
that supports it turns on gradient checkpointing (``dense+ckpt``, ``sparse-torch+ckpt``,
``packed+ckpt``); pass such variants with ``--variants``.
Peak memory is ``torch.cuda.max_memory_allocated``
on GPU and the growth of the process' peak RSS over its idle RSS on CPU.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

import torch

import fcmae
import sparse_ops
from fcmae.masking import patch_grid, random_masks
from fcmae.models import get_model_entry

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="keep dense variants in NCHW memory format (channels-last is the default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--variants", default="all",
                        help="comma list of dense,masked,sparse-<backend>; 'all' = every available")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def dense_variants(model_name: str, device_type: str) -> dict[str, dict]:
    """Dense-network variants of ``model_name`` → constructor options (``dense`` and ``masked``
    with none, then the family's own, which may redefine ``masked``)."""
    family = get_model_entry(model_name).family
    return {"dense": {}, "masked": {}, **family.benchmark_variants(device_type)}


def build_step(variant: str, args: argparse.Namespace):
    """A closure running one forward+backward of the encoder for ``variant``."""
    variant, _, option = variant.partition("+")
    device = torch.device(args.device)
    grid = patch_grid((args.input_size, args.input_size), 32)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    mask = random_masks(args.batch_size, grid[0] * grid[1], args.mask_ratio, device=device)
    if variant.startswith("sparse-"):
        model = fcmae.create_encoder(args.model, backend=variant.split("-", 1)[1]).to(device)
        forward = model
    else:
        options = dense_variants(args.model, device.type)
        if variant not in options:
            raise SystemExit(f"unknown variant {variant!r} for {args.model}; "
                             f"known: {', '.join(options)}, sparse-BACKEND")
        model = fcmae.create_model(args.model, num_classes=0, **options[variant]).to(device)
        if not args.no_channels_last:
            model = model.to(memory_format=torch.channels_last)
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        forward = model.forward_features
        if variant.startswith("dense"):
            mask = None
    if option == "ckpt":
        model.set_grad_checkpointing()
    elif option:
        raise SystemExit(f"unknown variant option +{option} (known: +ckpt)")
    if args.compile:
        forward = torch.compile(forward, dynamic=False)   # as fcmae-pretrain --compile
    autocast_dtype = DTYPES[args.dtype]

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            features = forward(imgs, mask) if mask is not None else forward(imgs)
        features.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def measure(variant: str, args: argparse.Namespace, queue) -> None:
    torch.manual_seed(0)
    step = build_step(variant, args)
    cuda = args.device.startswith("cuda")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    idle_rss = current_rss_mb()
    for _ in range(args.warmup):
        step()
    synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb() - idle_rss
    queue.put({"variant": variant, "img_per_s": args.batch_size * args.iters / elapsed,
               "peak_mem_mb": peak})


def main(argv=None) -> None:
    args = parse_args(argv)
    patch_grid((args.input_size, args.input_size), 32)
    if args.variants != "all":
        variants = args.variants.split(",")
    else:
        variants = list(dense_variants(args.model, torch.device(args.device).type))
        if get_model_entry(args.model).family.sparse_encoder:
            variants += [f"sparse-{name}" for name in sparse_ops.available_backends()]
    context = mp.get_context("spawn")
    results = []
    for variant in variants:
        queue = context.Queue()
        process = context.Process(target=measure, args=(variant, args, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"variant {variant} failed (exit code {process.exitcode})")
        results.append(queue.get())

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model}  batch {args.batch_size}  {args.input_size}px  mask ratio {args.mask_ratio}  "
          f"{args.dtype}  compile={args.compile}  device={device_name}  torch {torch.__version__}")
    masked = next((r for r in results if r["variant"] == "masked"), None)
    print(f"{'variant':<16}{'img/s':>10}{'peak MB':>12}{'vs masked':>12}")
    for result in results:
        ratio = result["img_per_s"] / masked["img_per_s"] if masked else float("nan")
        result["speedup_vs_masked"] = ratio
        print(f"{result['variant']:<16}{result['img_per_s']:>10.1f}{result['peak_mem_mb']:>12.0f}{ratio:>11.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "device": device_name, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""DCNv3 sampling implementations side by side: ``grid_sample`` vs ``triton`` (CUDA), and
``grid_sample`` under activation checkpointing (``grid_sample+ckpt``: nothing kept but the
inputs, the sampling recomputed in backward, as InternImage's grad checkpointing does).

For each InternImage level shape (InternImage-T widths and groups at the given batch and
input size; every site a query, as in the dense network, or the visible 40 % with
``--mask-ratio 0.6``) it reports forward+backward time, the activation bytes autograd keeps
for backward, and for each other variant its speed relative to ``grid_sample`` (above 1:
faster) and the largest difference from its output:

    python tools/dcnv3_bench.py --batch-size 8 --input-size 224
    python tools/dcnv3_bench.py --batch-size 64 --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from profiling import saved_activation_bytes
from torch.utils.checkpoint import checkpoint

from fcmae.models.dcnv3 import DEFAULT_DCNV3_IMPL, available_impls, dcnv3_sample
from fcmae.models.internimage import INTERNIMAGE_SIZES
from fcmae.models.layers import stage_strides

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def level_inputs(batch: int, size: int, channels: int, groups: int, keep_ratio: float,
                 dtype: torch.dtype, device: torch.device):
    """value (B, S, S, C), offset/weight for the queries, query_yx (B, Q, 2) or None."""
    generator = torch.Generator(device=device).manual_seed(0)
    value = torch.randn(batch, size, size, channels, generator=generator, device=device)
    queries = size * size if keep_ratio >= 1 else max(1, int(size * size * keep_ratio))
    query_yx = None
    if keep_ratio < 1:
        order = torch.rand(batch, size * size, generator=generator, device=device).argsort(-1)[:, :queries]
        query_yx = torch.stack([order // size, order % size], -1)
    offset = torch.randn(batch, queries, groups * 18, generator=generator, device=device)
    weight = torch.rand(batch, queries, groups * 9, generator=generator, device=device).softmax(-1)
    leaves = [t.to(dtype).requires_grad_() for t in (value, offset, weight)]
    return leaves, query_yx


def sampler_variants(device_type: str) -> dict[str, Callable[..., torch.Tensor]]:
    """Every DCNv3 implementation available on ``device_type``, plus grid_sample checkpointed."""
    samplers = {impl: partial(dcnv3_sample, impl=impl) for impl in available_impls(device_type)}
    samplers["grid_sample+ckpt"] = partial(checkpoint, dcnv3_sample, use_reentrant=False)
    return samplers


def time_step(run, device: torch.device, iters: int) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    synchronize()
    return (time.perf_counter() - start) / iters * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.0, help="queries = visible sites only")
    parser.add_argument("--size", default="t", choices=list(INTERNIMAGE_SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = INTERNIMAGE_SIZES[args.size]
    print(f"InternImage-{args.size.upper()} DCNv3 shapes, batch {args.batch_size}, {args.input_size}px, "
          f"queries {100 * (1 - args.mask_ratio):.0f} %, {args.dtype}, {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    samplers = sampler_variants(device.type)
    reference, others = DEFAULT_DCNV3_IMPL, [name for name in samplers if name != DEFAULT_DCNV3_IMPL]
    print(f"{'level':>5}{'map':>8}{'G':>4}" + "".join(f"{name + ' ms':>21}{'saved MiB':>11}" for name in samplers)
          + "".join(f"{name + ' speed':>24}{'max |diff|':>12}" for name in others))
    for level in range(len(config["depths"])):
        size = args.input_size // stage_strides(level + 1)[-1]
        channels, groups = config["channels"] * 2 ** level, config["groups"][level]
        (value, offset, weight), query_yx = level_inputs(args.batch_size, size, channels, groups,
                                                         1 - args.mask_ratio, dtype, device)
        row, outputs = {}, {}
        for name, sampler in samplers.items():
            forward = partial(sampler, value, offset, weight, groups, query_yx=query_yx)
            saved, outputs[name] = saved_activation_bytes(forward)
            row[name] = (time_step(lambda run=forward: run().float().square().mean().backward(), device, args.iters),
                         saved / 2 ** 20)
        line = f"{level:>5}{f'{size}x{size}':>8}{groups:>4}" + "".join(
            f"{row[name][0]:>21.1f}{row[name][1]:>11.1f}" for name in samplers)
        for name in others:
            diff = (outputs[name].float() - outputs[reference].float()).abs().max().item()
            line += f"{row[reference][0] / row[name][0]:>23.2f}x{diff:>12.2e}"
        print(line)


if __name__ == "__main__":
    main()

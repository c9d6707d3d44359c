#!/usr/bin/env python
"""What ``fcmae-pretrain --compile`` costs and gains: graph count, first-step compile time,
and the steady training step compiled vs eager, measured side by side in one process.

    python tools/compile_check.py --model convnextv2_atto --input-size 128 --batch-size 8
    python tools/compile_check.py --model convnextv2_base --device cuda --dtype bf16 --batch-size 64

The step is the pretraining one (forward with the mask drawn inside, loss, backward); the
compiled model is ``torch.compile(model, dynamic=False)`` as the command builds it. Graphs
are counted by a recording backend (no code generation), then the real inductor compile is
timed on the first step. ``--json`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from torch._dynamo.testing import CompileCounter

import fcmae

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnextv2_atto", help="FCMAE encoder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--mask-ratio", type=float, default=0.6, help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per mode (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true",
                        help="count graphs and time eager steps only (a CPU dry run of the GPU check)")
    parser.add_argument("--json", help="also write the results to this JSON file (rewritten as numbers arrive)")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(model: torch.nn.Module, imgs: torch.Tensor, autocast) -> float:
    """Seconds of one training step (forward with a fresh mask, loss, backward)."""
    sync(imgs.device)
    start = time.perf_counter()
    with autocast:
        loss = model(imgs)[0]
    loss.backward()
    sync(imgs.device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("compile_check: --device cuda but PyTorch sees no GPU; use --device cpu")
    model = fcmae.create_fcmae(args.model, mask_ratio=args.mask_ratio).to(device)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    result = dict(model=args.model, batch_size=args.batch_size, input_size=args.input_size, dtype=args.dtype,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__)

    def report(**numbers) -> None:
        """Print and save each number as soon as it is measured (a timeout keeps what came)."""
        result.update(numbers)
        print("  ".join(f"{key}: {value}" for key, value in numbers.items()), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as file:
                json.dump(result, file, indent=1)

    print(f"{args.model} {args.input_size}px batch {args.batch_size} {args.dtype} on {result['device']}, "
          f"torch {torch.__version__}", flush=True)
    counter = CompileCounter()
    with autocast:
        torch.compile(lambda x: model(x)[0], backend=counter, dynamic=False)(imgs)
    torch._dynamo.reset()
    report(graphs=counter.frame_count)
    timed_step(model, imgs, autocast)      # warm-up
    eager_s = min(timed_step(model, imgs, autocast) for _ in range(args.iters))
    report(eager_step_ms=round(eager_s * 1e3, 2))
    if args.no_compile:
        return result
    compiled = torch.compile(model, dynamic=False)
    report(first_step_s=round(timed_step(compiled, imgs, autocast), 2))
    compiled_s = min(timed_step(compiled, imgs, autocast) for _ in range(args.iters))
    report(compiled_step_ms=round(compiled_s * 1e3, 2), speedup=round(eager_s / compiled_s, 3))
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""RevCol activation memory vs number of columns: reversible vs plain autograd.

Counts the bytes autograd keeps between forward and backward (saved-tensor hooks) for the
masked FCMAE encoder with RevCol-T widths and 2/4/8/16 columns, then checks that backward
runs. On GPU it also reports torch.cuda.max_memory_allocated for a full training step.

    python tools/revcol_memory.py --batch-size 1 --input-size 224
"""
from __future__ import annotations

import argparse

import torch
from profiling import saved_activation_bytes

from fcmae.masking import random_masks
from fcmae.models.revcol import REVCOL_SIZES, RevCol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--columns", default="2,4,8,16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    channels, layers, _ = REVCOL_SIZES["t"]
    device = torch.device(args.device)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    mask = random_masks(args.batch_size, (args.input_size // 32) ** 2, 0.6, device=device)
    print(f"RevCol-T widths, batch {args.batch_size}, {args.input_size}px, mask ratio 0.6, {device}")
    print(f"{'columns':>8}{'reversible MiB':>16}{'plain MiB':>12}{'ratio':>8}")
    for columns in map(int, args.columns.split(",")):
        row = {}
        for reversible in (True, False):
            model = RevCol(channels, layers, columns, num_classes=0, reversible=reversible).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            saved, out = saved_activation_bytes(lambda net=model: net.forward_features(imgs, mask))
            out.square().mean().backward()
            row[reversible] = saved / 2 ** 20
            if device.type == "cuda":
                row[(reversible, "peak")] = torch.cuda.max_memory_allocated() / 2 ** 20
            del model, out
        print(f"{columns:>8}{row[True]:>16.1f}{row[False]:>12.1f}{row[False] / row[True]:>7.1f}x"
              + (f"   peak GPU MiB {row[(True, 'peak')]:.0f} vs {row[(False, 'peak')]:.0f}"
                 if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Does FCMAE pretraining help? Linear-probe and fine-tune accuracy from FCMAE-pretrained
weights vs random init, same budget, on scikit-learn's handwritten digits (1,797 8×8
images, upscaled to 96×96 RGB; shipped inside scikit-learn, nothing is downloaded).

Steps: write the digits as an ImageFolder (train 1,000 / val 797, fixed split) →
``fcmae-pretrain`` on the train images without labels → ``fcmae-convert`` →
``fcmae-finetune`` (and ``--linear-probe``) from those weights and from random init.

    python tools/finetune_evidence.py --pretrain-epochs 30 --epochs 10 --output-dir output/evidence
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from fcmae.atomic import atomic_save
from fcmae.checkpoint import load_checkpoint, state_dict_of
from fcmae.cli.finetune import build_parser as finetune_parser
from fcmae.cli.pretrain import build_parser as pretrain_parser
from fcmae.convert import convert_state
from fcmae.finetune import run_finetuning
from fcmae.pretrain import run_pretraining

SIDE = 96


def write_digits(root: Path, train_count: int = 1000, seed: int = 0) -> None:
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    for rank, index in enumerate(order):
        split = "train" if rank < train_count else "val"
        folder = root / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((SIDE, SIDE), Image.BICUBIC).convert("RGB").save(folder / f"{index}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tune / linear-probe epochs")
    parser.add_argument("--output-dir", default="output/evidence")
    options = parser.parse_args()
    out = Path(options.output_dir)
    data = out / "digits"
    if not (data / "val").is_dir():
        write_digits(data)

    pretrain_args = pretrain_parser().parse_args([
        "--model", options.model, "--data-path", str(data / "train"), "--input-size", str(SIDE),
        "--epochs", str(options.pretrain_epochs), "--batch-size", "32", "--blr", "8e-3",
        "--warmup-epochs", "3", "--output-dir", str(out / "pretrain"), "--vis-every", "0",
        "--resume", "auto"])
    last, _ = run_pretraining(pretrain_args)
    dense, _ = convert_state(state_dict_of(load_checkpoint(last)))
    weights = out / "pretrained_dense.pth"
    atomic_save({"model": dense}, weights)

    results = {}
    common = ["--model", options.model, "--data-path", str(data), "--input-size", str(SIDE),
              "--epochs", str(options.epochs), "--batch-size", "32", "--warmup-epochs", "1",
              "--mixup", "0", "--cutmix", "0", "--aa", "", "--reprob", "0", "--hflip", "0",
              "--no-model-ema", "--drop-path", "0.0", "--layer-decay", "0.9"]
    for init in ("fcmae", "random"):
        for mode in ("linear_probe", "finetune"):
            extra = ["--output-dir", str(out / f"{mode}_{init}"), "--blr",
                     "2e-2" if mode == "linear_probe" else "2e-3"]
            extra += ["--finetune", str(weights)] if init == "fcmae" else []
            extra += ["--linear-probe"] if mode == "linear_probe" else []
            metrics = run_finetuning(finetune_parser().parse_args(common + extra))
            results[f"{mode}/{init}"] = round(metrics["acc1"], 2)
            print(f"{mode:>12} from {init:>6}: top-1 {metrics['acc1']:.2f}%", flush=True)
    print(json.dumps({"model": options.model, "pretrain_epochs": options.pretrain_epochs,
                      "epochs": options.epochs, "val_images": 797, "top1": results}, indent=2))


if __name__ == "__main__":
    main()

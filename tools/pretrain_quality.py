#!/usr/bin/env python
"""Does FCMAE learn? Held-out normalized-pixel loss before and after a short CPU pretraining.

Pretrains on the built-in demo photos (scikit-image's bundled photos, minus three held-out
ones) with ``fcmae-pretrain``'s own code, then scores reconstruction of removed patches on
the held-out photos (rocket, motorcycle left/right) with fixed crops and fixed masks.
A loss of 1.0 is what predicting each patch's mean scores under ``norm_pix_loss``.

    python tools/pretrain_quality.py --epochs 30 --output-dir output/quality
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from PIL import Image

from fcmae import create_fcmae
from fcmae.checkpoint import load_checkpoint
from fcmae.cli.pretrain import build_parser
from fcmae.data import DEMO_HELDOUT_PHOTOS, demo_photo_paths, pretrain_transform
from fcmae.masking import random_masks
from fcmae.pretrain import run_pretraining


def heldout_batch(crops_per_photo: int, input_size: int, seed: int) -> torch.Tensor:
    """Fixed random crops of the held-out photos: (3 · crops_per_photo, 3, S, S)."""
    torch.manual_seed(seed)
    transform = pretrain_transform(input_size)
    crops = []
    for path in demo_photo_paths(DEMO_HELDOUT_PHOTOS):
        with Image.open(path) as photo:
            rgb = photo.convert("RGB")
        crops += [transform(rgb) for _ in range(crops_per_photo)]
    return torch.stack(crops)


@torch.no_grad()
def heldout_loss(model, imgs: torch.Tensor, mask: torch.Tensor) -> float:
    model.eval()
    loss, _, _ = model(imgs, mask=mask)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--output-dir", default="output/quality")
    parser.add_argument("--crops-per-photo", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    imgs = heldout_batch(options.crops_per_photo, 224, seed=1234)
    mask = random_masks(len(imgs), 49, 0.6, generator=torch.Generator().manual_seed(1234))
    torch.manual_seed(options.seed)
    untrained = create_fcmae(options.model)
    before = heldout_loss(untrained, imgs, mask)

    args = build_parser().parse_args(["--model", options.model, "--epochs", str(options.epochs),
                                      "--output-dir", options.output_dir, "--seed", str(options.seed),
                                      "--vis-every", "0"])
    last, model = run_pretraining(args)
    after = heldout_loss(model, imgs, mask)
    train_losses = [json.loads(line) for line in open(os.path.join(options.output_dir, "log.jsonl"))]
    epoch_losses = [r["epoch_loss"] for r in train_losses if "epoch_loss" in r]
    print(json.dumps({"model": options.model, "epochs": options.epochs,
                      "heldout_images": len(imgs), "heldout_loss_untrained": round(before, 4),
                      "heldout_loss_pretrained": round(after, 4),
                      "train_loss_first_epoch": round(epoch_losses[0], 4),
                      "train_loss_last_epoch": round(epoch_losses[-1], 4),
                      "checkpoint": str(last), "reference_patch_mean_loss": 1.0}, indent=2))
    assert load_checkpoint(last)["epoch"] == options.epochs - 1


if __name__ == "__main__":
    main()

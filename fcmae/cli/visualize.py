"""Reconstructions of an FCMAE checkpoint (ours or official, any family): one column per image; rows =
original, masked input, reconstruction, reconstruction with the visible patches pasted back. Norm-
pix-loss predictions are mapped back with each patch's own mean and std. The same picture fcmae-
pretrain logs to TensorBoard."""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

import torch
from torchvision.transforms.functional import to_pil_image

from ..atomic import atomic_write
from ..data import DEMO_HELDOUT_PHOTOS, demo_photo_paths, find_images, load_center_crops, spread_indices
from ..masking import check_pretraining_masks, patch_grid, random_masks
from ..reconstruction import reconstruction_grid, with_row_labels
from ..weights import load_fcmae
from . import SEED, check_output_file, cli_main, new_parser, number

log = logging.getLogger("fcmae.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("fcmae-visualize", __doc__)
    add = parser.add_argument
    add("checkpoint", help="FCMAE pretraining checkpoint (.pth or .safetensors)")
    add("images", nargs="*", help="image files (default: --data-path, else the built-in held-out demo photos)")
    add("-o", "--output", required=True, help="the picture, e.g. recon.png (its folder must exist)")
    add("--data-path", default=None, help="folder of images (--max-images of them, evenly spread over the "
                                          "path-sorted list, so over the classes of an ImageFolder)")
    add("--max-images", type=number(int, 1), default=8)
    add("--mask-ratio", type=number(float, 0, 1, low_open=True, high_open=True), default=None,
        help="fraction of patches removed (default: the checkpoint's, else 0.6)")
    add("--input-size", type=number(int, 32), default=None,
        help="center crop side (default: the checkpoint's, else 224)")
    add("--seed", type=SEED, default=0, help="seed of the random masks")
    add("--model", default=None, help="model name, if the file does not say and it cannot be inferred")
    return parser


def run(args: argparse.Namespace) -> int:
    output = check_output_file(args.output, (".png", ".jpg", ".jpeg"))
    model, model_name, saved = load_fcmae(args.checkpoint, args.model)
    input_size = args.input_size or saved["input_size"] or 224
    mask_ratio = args.mask_ratio or saved["mask_ratio"] or 0.6
    check_pretraining_masks(input_size, model.patch_size, mask_ratio)
    paths = [Path(path) for path in args.images] or (find_images(args.data_path) if args.data_path
                                                      else demo_photo_paths(DEMO_HELDOUT_PHOTOS))
    paths = [paths[index] for index in spread_indices(len(paths), args.max_images)]   # every class, not the first
    imgs = torch.stack(load_center_crops(paths, input_size))
    grid = patch_grid(imgs.shape[-2:], model.patch_size)
    mask = random_masks(len(imgs), grid[0] * grid[1], mask_ratio, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask=mask)
    picture = with_row_labels(to_pil_image(reconstruction_grid(imgs, pred, mask, model.patch_size,
                                                               model.norm_pix_loss, max_images=len(imgs))))
    atomic_write(output, lambda file: picture.save(file, format="PNG" if output.suffix.lower() == ".png" else "JPEG"))
    log.info(f"{model_name}: {len(imgs)} images at {input_size}px, mask ratio {mask_ratio:g}, "
             f"loss on removed patches {loss.item():.4f}; wrote {output}")
    return 0


main = partial(cli_main, build_parser, run)   # main(argv=None): parse, run, exit with its code


if __name__ == "__main__":
    main()

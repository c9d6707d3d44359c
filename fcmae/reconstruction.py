"""Reconstructions as pictures: input, masked input, prediction, prediction pasted on the
visible patches — for TensorBoard during pretraining (and any other viewer)."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from .autoencoder import patchify, unpatchify
from .data import IMAGENET_MEAN, IMAGENET_STD


def reconstruction_grid(imgs: Tensor, pred: Tensor, mask: Tensor, patch_size: int,
                        norm_pix_loss: bool, max_images: int = 8) -> Tensor:
    """A (3, H', W') grid: rows = input, masked input, reconstruction, reconstruction pasted
    onto the visible patches. imgs (B, 3, H, W) normalized; pred (B, L, p·p·3); mask (B, L).

    With ``norm_pix_loss`` the prediction lives in per-patch normalized space and is mapped
    back with each patch's true mean and std (as in the MAE visualisations).
    """
    imgs, pred, mask = imgs[:max_images].float(), pred[:max_images].float(), mask[:max_images].float()
    grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)
    if norm_pix_loss:
        target = patchify(imgs, patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * std + mean
    recon = unpatchify(pred, patch_size, grid)
    removed = unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]), patch_size, grid)
    masked_input = imgs * (1 - removed)
    pasted = imgs * (1 - removed) + recon * removed
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    rows = [(row * std + mean).clamp(0, 1) for row in (imgs, masked_input, recon, pasted)]
    return make_grid(torch.cat(rows), nrow=imgs.shape[0], padding=2).cpu()


ROW_NAMES = ("input", "masked", "reconstruction", "pasted")


def with_row_labels(picture: Image.Image, names: tuple[str, ...] = ROW_NAMES, margin: int = 96) -> Image.Image:
    """``picture`` (a :func:`reconstruction_grid` as a PIL image) with each row's name in a
    white margin on the left."""
    labelled = Image.new("RGB", (picture.width + margin, picture.height), "white")
    labelled.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    row_height = picture.height / len(names)
    for index, name in enumerate(names):
        draw.text((4, int((index + 0.5) * row_height) - 5), name, fill="black")
    return labelled

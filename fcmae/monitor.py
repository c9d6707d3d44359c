"""What pretraining measures between epochs, besides its training loss: k-NN accuracy of the
encoder's features (``--knn-data-path``) and the reconstruction loss on held-out images with
fixed masks (``--val-data-path``). Both run on the main process only, in eval mode, and
return metrics for the epoch's log record."""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import distributed
from .data import ImageFiles, check_readable, eval_transform, find_images
from .knn import knn_evaluate, knn_splits, spread_subset
from .masking import patch_grid, random_masks


def _due(epoch: int, every: int, epochs: int) -> bool:
    return distributed.is_main_process() and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


class KnnMonitor:
    """k-NN top-1 (%) of the FCMAE encoder's pooled features (every patch visible) on an
    ImageFolder with ``train/`` and ``val/``, every ``every`` epochs and after the last."""

    def __init__(self, root: str | os.PathLike, input_size: int, epochs: int, every: int = 1, k: int = 20,
                 max_images: int = 1000, batch_size: int = 64, device: torch.device | str = "cpu") -> None:
        self.train, self.val, self.classes = knn_splits(root, input_size, max_images)
        check_readable(self.train, "--knn-data-path train/")
        check_readable(self.val, "--knn-data-path val/")
        self.epochs, self.every, self.k = epochs, every, k
        self.batch_size, self.device = batch_size, device

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if not _due(epoch, self.every, self.epochs):
            return {}
        encoder, was_training = model.encoder, model.training
        model.eval()

        def pooled(images: Tensor) -> Tensor:
            grid = patch_grid(images.shape[-2:], model.patch_size)
            return encoder(images, images.new_zeros(len(images), grid[0] * grid[1])).mean(dim=(-2, -1))
        try:
            return {"knn_top1": knn_evaluate(pooled, self.train, self.val, self.k, self.batch_size, self.device)}
        finally:
            model.train(was_training)


class ReconstructionMonitor:
    """Mean normalised-pixel loss on held-out images (center crops) under masks fixed once by
    ``seed``, so the curve is comparable between epochs and runs."""

    def __init__(self, root: str | os.PathLike, input_size: int, patch_size: int, mask_ratio: float,
                 epochs: int, every: int = 1, max_images: int = 512, seed: int = 0, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> None:
        self.images = spread_subset(ImageFiles(find_images(root), eval_transform(input_size)), max_images)
        check_readable(self.images, "--val-data-path")
        grid = patch_grid((input_size, input_size), patch_size)
        self.masks = random_masks(len(self.images), grid[0] * grid[1], mask_ratio,
                                  generator=torch.Generator().manual_seed(seed))
        self.epochs, self.every, self.batch_size, self.device = epochs, every, batch_size, device

    @torch.no_grad()
    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if not _due(epoch, self.every, self.epochs):
            return {}
        was_training = model.training
        model.eval()
        total, start = 0.0, 0
        try:
            for images in DataLoader(self.images, batch_size=self.batch_size):
                mask = self.masks[start:start + len(images)].to(self.device)
                loss, _, _ = model(images.to(self.device), mask=mask)
                total += loss.item() * len(images)
                start += len(images)
        finally:
            model.train(was_training)
        return {"val_loss": total / start}

"""The one dataset factory: a data path as the dataset a command trains or evaluates on — tar
shards (a shard spec, :mod:`fcmae.shards`), an image folder (:mod:`fcmae.data`), or, for
pretraining without a path, the built-in demo photos. It stands above both readers, which
know nothing of each other's formats."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .data import DataError, ImageFiles, demo_photo_paths, find_images, labeled_images, pretrain_transform
from .shards import SHARD_INDEX, ShardImages, is_shard_spec, open_shard_set

Transform = Callable[[Image.Image], torch.Tensor]


def build_pretrain_dataset(data_path: str | None, input_size: int, seed: int = 0, batch_size: int = 1,
                           shard_index: str | None = None, cache: str | os.PathLike | None = None,
                           demo_repeats: int = 8) -> Dataset:
    """Unlabeled training images with the pretraining augmentation: tar shards, a folder
    (``cache``: see :func:`~fcmae.data.find_images`), or with ``data_path`` None the built-in
    demo photos (each listed ``demo_repeats`` times per epoch)."""
    transform = pretrain_transform(input_size)
    if data_path is None:
        return ImageFiles(demo_photo_paths(), transform, repeats=demo_repeats, seed=seed)
    if is_shard_spec(data_path):
        return ShardImages(open_shard_set(data_path, shard_index), transform, labeled=False,
                           batch_size=batch_size, seed=seed)
    return ImageFiles(find_images(data_path, cache), transform, seed=seed)


def labeled_dataset(path: str, transform: Transform, seed: int = 0, batch_size: int = 1,
                    shard_index: str | None = None, cache: str | os.PathLike | Path | None = None,
                    train: bool = True) -> Dataset:
    """One labeled split: an ImageFolder tree (``path/<class>/**/<image>``) or ``cls``-labeled
    tar shards whose ``shards.json`` names the classes; ``train`` selects the endless,
    rank-balanced training stream of shards (else each sample once)."""
    if not is_shard_spec(path):
        return labeled_images(path, transform, seed, cache)
    shard_set = open_shard_set(path, shard_index)
    if not shard_set.classes:
        raise DataError(f"shards {path!r} come with no class names; write them with fcmae-shards "
                        f"(its {SHARD_INDEX} lists the classes) or pass --shard-index")
    return ShardImages(shard_set, transform, labeled=True, batch_size=batch_size, seed=seed, train=train)

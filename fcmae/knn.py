"""k-nearest-neighbour classification of pooled encoder features: how linearly-free, label-free
features separate the classes — used by ``fcmae-knn`` and the ``--knn-data-path`` monitor of
``fcmae-pretrain``.

Features are L2-normalised; each validation image takes its ``k`` most cosine-similar
training images, which vote for their class with weight ``exp(similarity / temperature)``
(the weighted k-NN of Wu et al. 2018, as DINO and MAE-style papers report it).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .data import eval_transform, labeled_images, spread_indices

FeatureFn = Callable[[Tensor], Tensor]   # images (B, 3, H, W) → pooled features (B, C)


def spread_subset(dataset: Dataset, max_items: int | None) -> Dataset:
    """At most ``max_items`` items, evenly spaced over the (class-sorted) dataset, so every
    class keeps its share; the dataset itself when it is small enough."""
    if max_items is None or len(dataset) <= max_items:
        return dataset
    return Subset(dataset, spread_indices(len(dataset), max_items))


def knn_splits(root: str | os.PathLike, input_size: int, max_images: int | None = None,
               crop_pct: float = 224 / 256) -> tuple[Dataset, Dataset, list[str]]:
    """``root/train`` and ``root/val`` ImageFolder trees with the evaluation transform, each cut
    to ``max_images`` (spread over the classes): (train, val, class names)."""
    root = Path(root)
    train = labeled_images(root / "train", eval_transform(input_size, crop_pct))
    val = labeled_images(root / "val", eval_transform(input_size, crop_pct))
    if train.classes != val.classes:
        raise ValueError(f"{root}: train and val classes differ ({train.classes[:3]} vs {val.classes[:3]})")
    return spread_subset(train, max_images), spread_subset(val, max_images), train.classes


@torch.no_grad()
def embed(features: FeatureFn, dataset: Dataset, batch_size: int = 64, device: torch.device | str = "cpu",
          num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """(L2-normalised features (N, C), labels (N,)) of a labeled dataset, in dataset order."""
    all_features, all_labels = [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        all_features.append(F.normalize(features(images.to(device)).float(), dim=1).cpu())
        all_labels.append(labels)
    return torch.cat(all_features), torch.cat(all_labels)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of the weighted k-NN vote; features L2-normalised (N, C)."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, len(train_features))
    correct = 0
    for start in range(0, len(val_features), chunk):
        similarity = val_features[start:start + chunk] @ train_features.T             # (n, N_train)
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_index), num_classes)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        correct += (votes.argmax(1) == val_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / len(val_features)


def knn_evaluate(features: FeatureFn, train: Dataset, val: Dataset, k: int = 20, batch_size: int = 64,
                 device: torch.device | str = "cpu", num_workers: int = 0) -> float:
    """k-NN top-1 (%) of ``features`` on ``val`` with ``train`` as the reference set."""
    train_features, train_labels = embed(features, train, batch_size, device, num_workers)
    val_features, val_labels = embed(features, val, batch_size, device, num_workers)
    return knn_accuracy(train_features, train_labels, val_features, val_labels, k)

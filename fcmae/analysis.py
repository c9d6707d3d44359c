"""Feature-collapse analysis (ConvNeXt V2 paper, Sec. 3): the average pairwise cosine distance
between the channels of each block's activations, and the activation maps themselves.

For an activation X ∈ R^{H×W×C} of one image with X_i the i-th channel flattened to an H·W
vector, d = 1/C² · Σ_i Σ_j (1 − cos(X_i, X_j)) / 2: 0 when every channel carries the same
pattern (collapse), 1/2 · (1 − 1/C) for mutually orthogonal channels.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.registry import AnalysisPoint

WHERE = ("expansion", "block-output")


def channel_cosine_distance(activation: Tensor) -> Tensor:
    """(B, C, H, W) activations → (B,) average pairwise cosine distance between channels.

    A channel that is zero everywhere has cosine 0 with every other channel; a channel's
    cosine with itself counts as 1."""
    channels = F.normalize(activation.flatten(2).double(), dim=-1)       # (B, C, H·W), unit rows
    cosine = channels @ channels.transpose(1, 2)                          # (B, C, C)
    cosine.diagonal(dim1=1, dim2=2).fill_(1.0)
    return ((1.0 - cosine).mean(dim=(1, 2)) / 2).float()


def analysis_points(model: nn.Module, model_name: str) -> list[AnalysisPoint]:
    """The model's blocks in order (its ``analysis_points()``), or a ValueError for a family
    that declares none."""
    if not hasattr(model, "analysis_points"):
        raise ValueError(f"{model_name} declares no blocks for the feature-collapse analysis")
    return model.analysis_points()


@contextmanager
def capture(points: Iterable[AnalysisPoint], where: str):
    """Within the block, ``activations[name]`` holds each point's last activation as
    (B, C, H, W): the expansion layer's output after its activation (and GRN where the block has
    one) — the input of the projection layer — or the block's output (``where='block-output'``)."""
    if where not in WHERE:
        raise ValueError(f"unknown --where {where!r}; choose one of {', '.join(WHERE)}")
    activations: dict[str, Tensor] = {}
    handles = []
    for point in points:
        def store(tensor: Tensor, channels_last: bool, name: str = point.name) -> None:
            activations[name] = (tensor.permute(0, 3, 1, 2) if channels_last else tensor).detach()
        if where == "expansion":
            handles.append(point.expansion.register_forward_pre_hook(
                lambda module, inputs, store=store: store(inputs[0], True)))
        else:
            handles.append(point.block.register_forward_hook(
                lambda module, inputs, output, store=store, point=point: store(output, point.block_channels_last)))
    try:
        yield activations
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collapse_profile(model: nn.Module, points: list[AnalysisPoint], batches: Iterable[Tensor],
                     where: str = "expansion") -> tuple[dict[str, float], dict[str, float]]:
    """Per block (``points`` order): the channel cosine distance averaged over every image of
    ``batches`` ((B, 3, H, W) tensors, normalised as in training), and its standard deviation
    over the images (the spread). Returns (means, spreads), keyed by block name."""
    totals = {point.name: 0.0 for point in points}
    squares = {point.name: 0.0 for point in points}
    count = 0
    with capture(points, where) as activations:
        for images in batches:
            model.forward_features(images)
            for name in totals:
                distances = channel_cosine_distance(activations[name]).double()
                totals[name] += distances.sum().item()
                squares[name] += distances.square().sum().item()
            count += images.shape[0]
    if count == 0:
        raise ValueError("no images to analyse")
    means = {name: total / count for name, total in totals.items()}
    return means, {name: max(squares[name] / count - means[name] ** 2, 0.0) ** 0.5 for name in totals}


@torch.no_grad()
def feature_maps(model: nn.Module, point: AnalysisPoint, image: Tensor, where: str = "expansion",
                 channels: int = 64) -> Tensor:
    """The first ``channels`` activation maps of one block for one image (3, H, W): (N, h, w),
    each scaled to [0, 1] on its own (the paper's feature-map figure)."""
    with capture([point], where) as activations:
        model.forward_features(image.unsqueeze(0))
    maps = activations[point.name][0, :channels].float()                  # (N, h, w)
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    return (maps - low) / (high - low).clamp(min=1e-12)

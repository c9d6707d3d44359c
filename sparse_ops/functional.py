"""Functional sparse ops. Spatial ops dispatch to the tensor's backend; pointwise ops act
on ``features`` (N, C) directly and are the same for every backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import get_backend
from .tensor import SparseImage


def depthwise_conv2d(x: SparseImage, kernel: Tensor, bias: Tensor | None = None) -> SparseImage:
    """Submanifold depthwise conv. ``kernel`` (k·k, C) with odd k, ``bias`` (1, C).

    Output only at x's active sites; inactive neighbours count as zero.
    """
    if kernel.shape[1] != x.features.shape[1]:
        raise ValueError(f"kernel has {kernel.shape[1]} channels, input has {x.features.shape[1]}")
    return get_backend(x.backend).depthwise_conv2d(x, kernel, bias)


def strided_conv2d(x: SparseImage, kernel: Tensor, bias: Tensor | None, stride: int) -> SparseImage:
    """Conv with kernel size == ``stride``. ``kernel`` (s·s, C_in, C_out), ``bias`` (1, C_out)."""
    if kernel.shape[0] != stride * stride or kernel.shape[1] != x.features.shape[1]:
        raise ValueError(f"kernel {tuple(kernel.shape)} does not fit stride {stride} and "
                         f"{x.features.shape[1]} input channels")
    return get_backend(x.backend).strided_conv2d(x, kernel, bias, stride)


def linear(x: SparseImage, weight: Tensor, bias: Tensor | None = None) -> SparseImage:
    """Per-site ``F.linear``: (N, C_in) → (N, C_out)."""
    return x.replace(F.linear(x.features, weight, bias))


def layer_norm(x: SparseImage, weight: Tensor | None, bias: Tensor | None,
               eps: float = 1e-6) -> SparseImage:
    """LayerNorm over the channels of each site."""
    return x.replace(F.layer_norm(x.features, (x.features.shape[1],), weight, bias, eps))


def gelu(x: SparseImage) -> SparseImage:
    return x.replace(F.gelu(x.features))


def grn(x: SparseImage, gamma: Tensor, beta: Tensor, eps: float = 1e-6,
        batch_stats: bool = False) -> SparseImage:
    """Global Response Normalization; ``gamma``, ``beta`` (1, C).

    Per image (default): the L2 norm runs over that image's active sites, which equals the
    dense GRN applied to the image with inactive sites zeroed. ``batch_stats=True``
    reproduces the official MinkowskiEngine code, which pools all sites of the batch.
    """
    features = x.features
    if batch_stats:
        scale = torch.linalg.vector_norm(features, dim=0, keepdim=True)               # (1, C)
        scale = scale / (scale.mean(dim=-1, keepdim=True) + eps)
    else:
        norms = torch.linalg.vector_norm(x.sites.to_padded(features), dim=1)           # (B, C)
        scale = (norms / (norms.mean(dim=-1, keepdim=True) + eps))[x.sites.batch_index]  # (N, C)
    return x.replace(torch.addcmul(beta + features, gamma, features * scale))


def drop_path(x: SparseImage, drop_prob: float, training: bool) -> SparseImage:
    """Drop whole images of the residual branch (per sample), rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.features.new_empty(x.batch_size).bernoulli_(keep_prob).div_(keep_prob)  # (B,)
    return x.replace(x.features * keep[x.sites.batch_index, None])

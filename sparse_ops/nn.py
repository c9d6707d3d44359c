"""Sparse layers named like ``torch.nn``. Parameter names and shapes follow the official
ConvNeXt-V2 FCMAE (MinkowskiEngine) checkpoints, whatever backend runs them."""
from __future__ import annotations

import torch
from torch import nn

from . import functional as SF
from .tensor import SparseImage


class DepthwiseConv2d(nn.Module):
    """Submanifold depthwise conv. Parameters ``kernel`` (k·k, C) and ``bias`` (1, C)."""

    def __init__(self, channels: int, kernel_size: int = 7, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"submanifold conv needs an odd kernel size, got {kernel_size}")
        self.kernel_size = kernel_size
        self.kernel = nn.Parameter(torch.empty(kernel_size * kernel_size, channels))
        self.bias = nn.Parameter(torch.zeros(1, channels)) if bias else None
        nn.init.trunc_normal_(self.kernel, std=0.02)

    def forward(self, x: SparseImage) -> SparseImage:
        return SF.depthwise_conv2d(x, self.kernel, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kernel.shape[1]}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


class Conv2d(nn.Module):
    """Strided conv with ``kernel_size == stride`` (e.g. 2×2/2 downsampling).

    Parameters ``kernel`` (k·k, C_in, C_out) and ``bias`` (1, C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2,
                 stride: int = 2, bias: bool = True) -> None:
        super().__init__()
        if kernel_size != stride:
            raise ValueError(f"sparse Conv2d supports kernel_size == stride, got {kernel_size}/{stride}")
        self.stride = stride
        self.kernel = nn.Parameter(torch.empty(kernel_size * kernel_size, in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(1, out_channels)) if bias else None
        nn.init.trunc_normal_(self.kernel, std=0.02)

    def forward(self, x: SparseImage) -> SparseImage:
        return SF.strided_conv2d(x, self.kernel, self.bias, self.stride)

    def extra_repr(self) -> str:
        return (f"{self.kernel.shape[1]}, {self.kernel.shape[2]}, kernel_size={self.stride}, "
                f"stride={self.stride}, bias={self.bias is not None}")


class Linear(nn.Module):
    """Per-site linear layer; the weights live in ``self.linear`` (an ``nn.Linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: SparseImage) -> SparseImage:
        return SF.linear(x, self.linear.weight, self.linear.bias)


class LayerNorm(nn.Module):
    """LayerNorm over channels; the weights live in ``self.ln`` (an ``nn.LayerNorm``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: SparseImage) -> SparseImage:
        return SF.layer_norm(x, self.ln.weight, self.ln.bias, self.ln.eps)


class GELU(nn.Module):
    def forward(self, x: SparseImage) -> SparseImage:
        return SF.gelu(x)


class GRN(nn.Module):
    """Global Response Normalization, per image. ``gamma``/``beta`` (1, C), zero-initialised.

    ``batch_stats=True`` is a compatibility mode matching the official sparse code, whose
    statistics pool every image of the batch.
    """

    def __init__(self, channels: int, eps: float = 1e-6, batch_stats: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels))
        self.beta = nn.Parameter(torch.zeros(1, channels))
        self.eps = eps
        self.batch_stats = batch_stats

    def forward(self, x: SparseImage) -> SparseImage:
        return SF.grn(x, self.gamma, self.beta, self.eps, self.batch_stats)

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[1]}, eps={self.eps}" + (", batch_stats=True" if self.batch_stats else "")


class DropPath(nn.Module):
    """Per-image stochastic depth for a residual branch."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: SparseImage) -> SparseImage:
        return SF.drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def add(a: SparseImage, b: SparseImage) -> SparseImage:
    """Site-wise sum of two tensors on the same sites (residual connections)."""
    if a.sites is not b.sites and not torch.equal(a.coords, b.coords):
        raise ValueError("cannot add sparse tensors on different sites")
    return a.replace(a.features + b.features)


__all__ = ["DepthwiseConv2d", "Conv2d", "Linear", "LayerNorm", "GELU", "GRN", "DropPath", "add"]

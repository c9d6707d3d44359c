"""The default backend: pure PyTorch, CPU and GPU.

* Depthwise conv: scatter the active features into a zero (B, H, W, C) channels-last map,
  run ``F.conv2d(groups=C)`` and gather the active sites back. Inactive sites hold zeros,
  which is exactly the submanifold rule "missing neighbours count as zero".
* Strided conv (kernel == stride): gather the s×s children of every active output site
  (a zero row for missing ones) and apply the kernel as one matmul, so only active output
  sites are computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import depthwise_kernel_to_weight
from ..tensor import ActiveSites, SparseImage
from . import Backend


class TorchBackend(Backend):
    name = "torch"

    def depthwise_conv2d(self, x: SparseImage, kernel: Tensor, bias: Tensor | None) -> SparseImage:
        weight = depthwise_kernel_to_weight(kernel)                  # (C, 1, k, k)
        grid = x.sites.scatter_dense(x.features).permute(0, 3, 1, 2)  # (B, C, H, W) channels-last
        out = F.conv2d(grid, weight, None, padding=weight.shape[-1] // 2, groups=weight.shape[0])
        features = x.sites.gather_dense(out.permute(0, 2, 3, 1))     # (N, C)
        if bias is not None:
            features = features + bias
        return x.replace(features)

    def strided_conv2d(self, x: SparseImage, kernel: Tensor, bias: Tensor | None,
                       stride: int) -> SparseImage:
        out_sites, children = _downsample_map(x.sites, stride)       # (N_out, s·s) rows of x
        padded = torch.cat([x.features, x.features.new_zeros(1, x.features.shape[1])])
        gathered = padded[children].flatten(1)                       # (N_out, s·s·C_in)
        features = gathered @ kernel.reshape(-1, kernel.shape[-1])   # (N_out, C_out)
        if bias is not None:
            features = features + bias
        return SparseImage(features, out_sites, x.backend)


def coarse_sites(sites: ActiveSites, stride: int) -> ActiveSites:
    """Sites of the stride-``stride`` grid that have at least one active child (raster order)."""
    return _downsample_map(sites, stride)[0]


def _downsample_map(sites: ActiveSites, stride: int) -> tuple[ActiveSites, Tensor]:
    """Coarse sites and, per coarse site, the row of each child (N for a missing child).

    Children are listed in kernel-row order ``r = dx * stride + dy``. Cached on ``sites``.
    """
    key = ("downsample", stride)
    if key in sites.cache:
        return sites.cache[key]
    height, width = sites.spatial_shape
    out_shape = (-(-height // stride), -(-width // stride))
    b, y, x = sites.coords.unbind(1)
    parent = (b * out_shape[0] + y // stride) * out_shape[1] + x // stride
    unique_parents = torch.unique(parent)                                  # sorted = raster order
    out_w = out_shape[1]
    out_coords = torch.stack([unique_parents // (out_shape[0] * out_w),
                              (unique_parents // out_w) % out_shape[0],
                              unique_parents % out_w], 1)
    out_sites = ActiveSites(out_coords, out_shape, sites.batch_size, sites.stride * stride)

    row_of = torch.full((sites.batch_size * height * width,), len(sites), dtype=torch.long,
                        device=sites.device)
    row_of[sites.flat_index] = torch.arange(len(sites), device=sites.device)
    ob, oy, ox = out_coords.unbind(1)
    offsets = torch.arange(stride, device=sites.device)
    dx, dy = torch.meshgrid(offsets, offsets, indexing="ij")              # r = dx * s + dy
    child_y = oy[:, None] * stride + dy.reshape(1, -1)
    child_x = ox[:, None] * stride + dx.reshape(1, -1)
    inside = (child_y < height) & (child_x < width)
    flat = (ob[:, None] * height + child_y.clamp(max=height - 1)) * width + child_x.clamp(max=width - 1)
    children = torch.where(inside, row_of[flat], torch.full_like(flat, len(sites)))
    sites.cache[key] = (out_sites, children)
    return out_sites, children

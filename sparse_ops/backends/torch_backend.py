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
from ..tensor import SparseImage
from .base import Backend


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
        out_sites, children = x.sites.downsample(stride)             # (N_out, s·s) rows of x
        padded = torch.cat([x.features, x.features.new_zeros(1, x.features.shape[1])])
        gathered = padded[children].flatten(1)                       # (N_out, s·s·C_in)
        features = gathered @ kernel.reshape(-1, kernel.shape[-1])   # (N_out, C_out)
        if bias is not None:
            features = features + bias
        return SparseImage(features, out_sites, x.backend)

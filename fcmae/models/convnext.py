"""ConvNeXt (V1): the dense classifier and the sparse FCMAE encoder — the no-GRN baseline of
the ConvNeXt V2 paper's feature-collapse study.

The network is ConvNeXt V2's (stem, stages, downsampling, head: :mod:`.convnextv2`) with the
V1 block: no GRN; the MLP output is scaled per channel by LayerScale ``gamma`` (init 1e-6).
The dense model follows the official V1 key layout (``downsample_layers``, ``stages.i.j.
{dwconv, norm, pwconv1, pwconv2, gamma}``, ``norm``, ``head``); the sparse encoder has the
same keys in the FCMAE sparse layout (``dwconv.kernel``, ``norm.ln.*``, ``pwconv1.linear.*``).
Sizes are timm's ``convnext_*``; converted weights load into timm.
"""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import Tensor, nn

import sparse_ops
import sparse_ops.nn as snn

from .convnextv2 import ConvNeXtV2, SparseConvNeXtV2, checkpoint_filter_fn, timm_filter_fn
from .layers import apply_keep
from .registry import EncoderFamily, register_family

# name: (depths, dims), as timm registers them (tiny … xlarge are the official sizes)
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


class Block(nn.Module):
    """dwconv k×k → LN → Linear(C→eC) → GELU → Linear(eC→C) → ×gamma → DropPath, residual
    (expansion e = 4; RevCol's columns use this block too).

    With ``keep`` (B, 1, H, W) the masked-dense reference: removed sites are zeroed after the
    depthwise conv and at the output.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7,
                 layer_scale_init_value: float = 1e-6, expansion: int = 4) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expansion * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        shortcut = x                                                     # (B, C, H, W)
        x = apply_keep(self.dwconv(x), keep).permute(0, 2, 3, 1)         # (B, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))           # (B, H, W, C), via eC
        x = (self.gamma * x).permute(0, 3, 1, 2)                         # (B, C, H, W)
        return apply_keep(shortcut + self.drop_path(x), keep)


class SparseBlock(nn.Module):
    """The ConvNeXt V1 block on a :class:`sparse_ops.SparseImage`."""

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7,
                 layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = snn.DepthwiseConv2d(dim, kernel_size)
        self.norm = snn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = snn.Linear(dim, 4 * dim)
        self.act = snn.GELU()
        self.pwconv2 = snn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = snn.DropPath(drop_path)

    def forward(self, x: sparse_ops.SparseImage) -> sparse_ops.SparseImage:
        out = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))   # (N, C), via 4C
        return snn.add(x, self.drop_path(out.replace(out.features * self.gamma)))


class ConvNeXt(ConvNeXtV2):
    """Dense ConvNeXt V1 classifier (official V1 layout); ``forward_features(x, mask)`` with a
    patch mask is the masked-dense FCMAE reference."""

    block = Block


class SparseConvNeXt(SparseConvNeXtV2):
    """FCMAE encoder with the V1 block: only visible sites are computed."""

    block = SparseBlock


register_family(EncoderFamily(
    name="convnext",
    sizes={size: dict(depths=depths, dims=dims) for size, (depths, dims) in CONVNEXT_SIZES.items()},
    dense=ConvNeXt, encoder=SparseConvNeXt, checkpoint_filter_fn=checkpoint_filter_fn, timm_filter_fn=timm_filter_fn))

"""ConvNeXt V2: the ConvNeXt network (:mod:`.convnext`) with the V2 block — GRN after the
MLP's expansion, no LayerScale — dense and sparse, in the official ConvNeXt-V2 key layouts.
"""
from __future__ import annotations

from collections.abc import Callable

from timm.layers import DropPath
from torch import Tensor, nn

import sparse_ops
import sparse_ops.nn as snn

from .convnext import (
    CONVNEXT_SHAPES,
    ConvNeXt,
    SparseConvNeXt,
    checkpoint_filter_fn,
    timm_filter_fn,
    transformers_layout,
)
from .layers import GRN, apply_keep
from .registry import EncoderFamily, register_family

# the sizes ConvNeXt V2 is registered in
CONVNEXTV2_SIZES = {size: CONVNEXT_SHAPES[size] for size in
                    ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")}


class Block(nn.Module):
    """dwconv k×k → LN → Linear(C→4C) → GELU → GRN → Linear(4C→C) → DropPath, residual.

    With ``keep`` (B, 1, H, W) the block is the masked-dense reference: removed sites are
    zeroed after the depthwise conv, excluded from GRN statistics and zeroed at the output.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        shortcut = x                                   # (B, C, H, W)
        x = apply_keep(self.dwconv(x), keep)
        x = x.permute(0, 2, 3, 1)                      # (B, H, W, C)
        x = self.act(self.pwconv1(self.norm(x)))       # (B, H, W, 4C)
        x = self.grn(x, None if keep is None else keep.permute(0, 2, 3, 1))
        x = self.pwconv2(x).permute(0, 3, 1, 2)        # (B, C, H, W)
        return apply_keep(shortcut + self.drop_path(x), keep)


class SparseBlock(nn.Module):
    """The ConvNeXt V2 block on a :class:`sparse_ops.SparseImage` (official FCMAE keys)."""

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7,
                 grn_batch_stats: bool = False) -> None:
        super().__init__()
        self.dwconv = snn.DepthwiseConv2d(dim, kernel_size)
        self.norm = snn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = snn.Linear(dim, 4 * dim)
        self.act = snn.GELU()
        self.grn = snn.GRN(4 * dim, batch_stats=grn_batch_stats)
        self.pwconv2 = snn.Linear(4 * dim, dim)
        self.drop_path = snn.DropPath(drop_path)

    def forward(self, x: sparse_ops.SparseImage) -> sparse_ops.SparseImage:
        out = self.dwconv(x)                                     # (N, C)
        out = self.act(self.pwconv1(self.norm(out)))             # (N, 4C)
        out = self.pwconv2(self.grn(out))                        # (N, C)
        return snn.add(x, self.drop_path(out))


class ConvNeXtV2(ConvNeXt):
    """Dense ConvNeXt V2 classifier (official key layout): :class:`~.convnext.ConvNeXt` with the
    GRN block. ``forward_features(x, mask)`` with a patch mask is the masked-dense FCMAE reference."""

    block: Callable[..., nn.Module] = Block


class SparseConvNeXtV2(SparseConvNeXt):
    """FCMAE encoder of ConvNeXt V2 (keys of the ``encoder.*`` part of official FCMAE
    checkpoints): only visible sites are computed."""

    block: Callable[..., nn.Module] = SparseBlock


register_family(EncoderFamily(
    name="convnextv2",
    sizes={size: dict(depths=depths, dims=dims) for size, (depths, dims) in CONVNEXTV2_SIZES.items()},
    dense=ConvNeXtV2, encoder=SparseConvNeXtV2, checkpoint_filter_fn=checkpoint_filter_fn,
    timm_filter_fn=timm_filter_fn, transformers_layout=transformers_layout("convnextv2", "ConvNextV2Model")))

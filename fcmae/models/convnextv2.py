"""ConvNeXt V2: the dense classifier and the sparse FCMAE encoder.

Both follow the official ConvNeXt-V2 state_dict layouts: the dense model loads official
dense checkpoints strictly, the sparse encoder loads the ``encoder.*`` part of official
FCMAE (MinkowskiEngine) checkpoints strictly, whatever ``sparse_ops`` backend runs it.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from timm.layers import DropPath
from torch import Tensor, nn

import sparse_ops
import sparse_ops.nn as snn

from ..masking import keep_maps
from .layers import (
    GRN,
    BlockSequence,
    GradCheckpointing,
    LayerNorm2d,
    apply_keep,
    drop_path_rates,
    scale_head_init,
    trunc_normal_init,
)
from .registry import register_model

# name: (depths, dims)
CONVNEXTV2_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

STEM_STRIDE = 4


def _make_stem(in_chans: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=STEM_STRIDE, stride=STEM_STRIDE),
                         LayerNorm2d(dim, eps=1e-6))


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


class ConvNeXtV2(GradCheckpointing, nn.Module):
    """Dense ConvNeXt V2 classifier (official key layout).

    ``forward_features(x, mask)`` with a patch mask is the masked-dense FCMAE reference.
    """

    head_prefixes = ("norm.", "head.")  # not part of an FCMAE encoder; fine-tuning starts them fresh

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 in_chans: int = 3, num_classes: int = 1000, drop_path_rate: float = 0.0,
                 head_init_scale: float = 1.0, kernel_size: int = 7) -> None:
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.num_features = dims[-1]
        self.patch_size = STEM_STRIDE * 2 ** (len(dims) - 1)
        self.downsample_layers = nn.ModuleList([_make_stem(in_chans, dims[0])])
        for i in range(1, len(dims)):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i - 1], eps=1e-6),
                nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(
            BlockSequence(*[Block(dim, rate, kernel_size) for rate in rates])          # all see one keep mask
            for dim, rates in zip(dims, drop_path_rates(depths, drop_path_rate)))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(trunc_normal_init)
        scale_head_init([self.head] if num_classes > 0 else [], head_init_scale)

    def num_layers(self, decay_type: str = "single") -> int:
        """Depth used by layer-wise lr decay: one id per block ('single') or 12 groups ('group')."""
        return sum(self.depths) if decay_type == "single" else 12

    def layer_id(self, param_name: str, decay_type: str = "single") -> int:
        """Layer-wise lr decay id of a parameter (0 = stem … num_layers + 1 = norm/head).

        'single': every block its own id, a downsample layer shares the id of the first block
        after it. 'group' (official recipe for base/large, depths 3,3,27,3): twelve groups —
        stage 0 → 1, stage 1 → 2, stage 2 in runs of three blocks → 3…11, stage 3 → 12, with
        the stem at 0 and downsample layers 1, 2 joining their stages' first group.
        """
        parts = param_name.split(".")
        if parts[0] not in ("downsample_layers", "stages"):
            return self.num_layers(decay_type) + 1
        stage = int(parts[1])
        if decay_type == "single":
            block = int(parts[2]) if parts[0] == "stages" else 0
            return sum(self.depths[:stage]) + block + 1
        if parts[0] == "downsample_layers":
            return {0: 0, 1: 2, 2: 3}.get(stage, 12)
        if stage < 2:
            return stage + 1
        return 3 + int(parts[2]) // 3 if stage == 2 else 12

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) → (B, C_last, H/32, W/32). ``mask`` (B, L): 1 = removed patch."""
        strides = [STEM_STRIDE * 2 ** i for i in range(len(self.stages))]
        keeps = ([keep.unsqueeze(1).type_as(x) for keep in keep_maps(mask, x.shape[-2:], self.patch_size, strides)]
                 if mask is not None else [None] * len(self.stages))
        for downsample, stage, keep in zip(self.downsample_layers, self.stages, keeps):
            x = apply_keep(downsample(x), keep)
            x = stage(x, keep)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, C, h, w) → (B, num_classes): global average pool → LayerNorm → Linear."""
        return self.head(self.norm(features.mean(dim=(-2, -1))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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


class SparseConvNeXtV2(GradCheckpointing, nn.Module):
    """FCMAE encoder: dense stem, then only visible sites are computed.

    ``forward(imgs, mask)``: imgs (B, 3, H, W), mask (B, L) with 1 = removed patch →
    (B, C_last, H/32, W/32) features, zero at removed patches. Keys match the ``encoder.*``
    part of official FCMAE checkpoints (no final norm, no head).
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 in_chans: int = 3, drop_path_rate: float = 0.0, kernel_size: int = 7,
                 backend: str = "torch", grn_batch_stats: bool = False) -> None:
        super().__init__()
        sparse_ops.get_backend(backend)  # fail early on an unknown or missing backend
        self.backend = backend
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.num_features = dims[-1]
        self.patch_size = STEM_STRIDE * 2 ** (len(dims) - 1)
        self.downsample_layers = nn.ModuleList([_make_stem(in_chans, dims[0])])
        for i in range(1, len(dims)):
            self.downsample_layers.append(nn.Sequential(
                snn.LayerNorm(dims[i - 1], eps=1e-6), snn.Conv2d(dims[i - 1], dims[i], 2, 2)))
        self.stages = nn.ModuleList(
            BlockSequence(*[SparseBlock(dim, rate, kernel_size, grn_batch_stats) for rate in rates])
            for dim, rates in zip(dims, drop_path_rates(depths, drop_path_rate)))
        self.apply(trunc_normal_init)

    def forward(self, imgs: Tensor, mask: Tensor) -> Tensor:
        stem = self.downsample_layers[0](imgs)                             # (B, C0, H/4, W/4)
        visible = keep_maps(mask, imgs.shape[-2:], self.patch_size, [STEM_STRIDE])[0] > 0
        x = sparse_ops.SparseImage.from_dense(stem, visible, STEM_STRIDE, self.backend)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsample_layers[i](x)
            x = stage(x)
        return x.dense()                                                   # (B, C, h, w)


def _register_sizes() -> None:
    for size, (depths, dims) in CONVNEXTV2_SIZES.items():
        register_model(f"convnextv2_{size}",
                       partial(ConvNeXtV2, depths=depths, dims=dims),
                       partial(SparseConvNeXtV2, depths=depths, dims=dims))


_register_sizes()

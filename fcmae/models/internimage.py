"""InternImage (Wang et al., CVPR 2023) with DCNv3 in pure PyTorch: dense classifier and
masked FCMAE encoder. Sizes T–XL and H; state-dict keys follow the official classification
checkpoints (``patch_embed``, ``levels.{i}.blocks.{j}.dcn.*``, ``conv_head``/``head`` for
T–XL, the attention-pooling ``clip_projector`` head for H).

From the stem output on, tensors are channels-last (N, H, W, C).

Masked (FCMAE) mode: the image is zeroed at removed patches before the (not patch-local)
stem, and every spatial op reads maps that are zero at removed sites — the stem output,
each DCNv3's depthwise-conv input and its sampled values ``v``, each block output and each
downsample input — so nothing from a removed patch reaches a visible site. By default the
features of visible sites are kept packed (B, n, C) (:class:`PackedGrid`): projections,
offset/modulation heads, MLPs and norms run on visible sites only, and the spatial ops
(depthwise conv, deformable sampling at the visible queries, downsampling) scatter into a
zero map. ``packed_masked=False`` computes every site and re-masks (:class:`DenseGrid`);
both give the same numbers.

``dcn_impl`` picks the DCNv3 sampling implementation (``grid_sample``, or the fused CUDA
``triton`` kernels, see :mod:`fcmae.models.dcnv3`); both give the same numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from ..masking import keep_maps, visible_count, visible_sites
from .dcnv3 import DCNV3_IMPLS, DEFAULT_DCNV3_IMPL, DCNv3, DenseGrid, Grid, PackedGrid, available_impls, layer_norm
from .layers import (
    GradCheckpointing,
    TimmFeatures,
    drop_path_rates,
    run_block,
    scale_head_init,
    stage_keeps,
    stage_strides,
    trunc_normal_init,
)
from .registry import AnalysisPoint, EncoderFamily, FamilyOption, masked_dense_encoder, register_family

_H_EXTRAS = dict(dw_kernel_size=5, res_post_norm=True, center_feature_scale=True,
                 level2_post_norm_ids=(5, 11, 17, 23, 29), clip_projector=True)
INTERNIMAGE_SIZES: dict[str, dict] = {
    "t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32)),
    "s": dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5, post_norm=True),
    "b": dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5, post_norm=True),
    "l": dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), layer_scale=1e-5,
              post_norm=True, offset_scale=2.0),
    "xl": dict(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), layer_scale=1e-5,
               post_norm=True, offset_scale=2.0),
    "h": dict(channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80), **_H_EXTRAS),
}


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm (T): x += DP(dcn(norm1(x))); x += DP(mlp(norm2(x))).
    Post-norm with layer scale (S–XL): x += DP(gamma1·norm1(dcn(x))); likewise for the MLP.
    Residual post-norm (H): x += DP(res_post_norm1(dcn(norm1(x)))); likewise for the MLP."""

    def __init__(self, dim: int, groups: int, drop_path: float, layer_scale: float | None = None,
                 post_norm: bool = False, offset_scale: float = 1.0, dw_kernel_size: int = 3,
                 res_post_norm: bool = False, center_feature_scale: bool = False,
                 dcn_impl: str = DEFAULT_DCNV3_IMPL) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = layer_norm(dim)
        self.dcn = DCNv3(dim, groups, offset_scale=offset_scale, dw_kernel_size=dw_kernel_size,
                         center_feature_scale=center_feature_scale, impl=dcn_impl)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale))
            self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.layer_scale = layer_scale is not None
        self.res_post_norm = res_post_norm
        if res_post_norm:
            self.res_post_norm1 = layer_norm(dim)
            self.res_post_norm2 = layer_norm(dim)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        if self.post_norm:
            branch = self.norm1(self.dcn(x, grid))
        else:
            branch = self.dcn(self.norm1(x), grid)
            branch = self.res_post_norm1(branch) if self.res_post_norm else branch
        x = x + self.drop_path(self.gamma1 * branch if self.layer_scale else branch)
        if self.post_norm:
            branch = self.norm2(self.mlp(x))
        else:
            branch = self.mlp(self.norm2(x))
            branch = self.res_post_norm2(branch) if self.res_post_norm else branch
        x = x + self.drop_path(self.gamma2 * branch if self.layer_scale else branch)
        return grid.zero_removed(x)


class AttentionPooling(nn.Module):
    """Multi-head attention of the mean token over all tokens (the H/G ``clip_projector``).

    Keys: ``norm1_{q,k,v}.0``, ``cross_dcn.{q,k,v}.weight`` (no Linear bias), separate
    ``cross_dcn.{q,k,v}_bias``, ``cross_dcn.proj``. tokens (B, L, D) → (B, out_dim).
    """

    def __init__(self, dim: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1_q, self.norm1_k, self.norm1_v = layer_norm(dim), layer_norm(dim), layer_norm(dim)
        self.cross_dcn = nn.Module()
        for name in ("q", "k", "v"):
            setattr(self.cross_dcn, name, nn.Linear(dim, dim, bias=False))
            setattr(self.cross_dcn, f"{name}_bias", nn.Parameter(torch.zeros(dim)))
        self.cross_dcn.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        attn = self.cross_dcn
        query = self.norm1_q(tokens.mean(dim=1, keepdim=True))
        q, k, v = (F.linear(source, getattr(attn, name).weight, getattr(attn, f"{name}_bias"))
                   for name, source in (("q", query), ("k", self.norm1_k(tokens)), ("v", self.norm1_v(tokens))))
        split = partial(_split_heads, heads=self.heads)
        pooled = F.scaled_dot_product_attention(split(q), split(k), split(v))   # (B, heads, 1, d)
        return attn.proj(pooled.transpose(1, 2).flatten(2)).squeeze(1)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class Downsample(nn.Module):
    """3×3 stride-2 conv (no bias) + LayerNorm, channels-last in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False)
        self.norm = layer_norm(2 * dim, first_in=True)

    def forward(self, x: Tensor, grid: Grid, next_grid: Grid) -> Tensor:
        """Reads ``grid``'s zero-filled map; returns features laid out as ``next_grid``."""
        coarse = self.conv(grid.to_map(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm[1](next_grid.from_map(coarse))


class Level(nn.Module):
    def __init__(self, dim: int, groups: int, drop_rates: Sequence[float], downsample: bool,
                 post_norm_ids: Sequence[int] = (), **block_options) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, groups, rate, **block_options) for rate in drop_rates)
        post_norm = block_options.get("post_norm", False)
        center_feature_scale = block_options.get("center_feature_scale", False)
        self.norm = layer_norm(dim) if not post_norm or center_feature_scale else None
        self.post_norm_ids = tuple(post_norm_ids)
        if post_norm_ids:                     # H/G level 2: extra LayerNorms after some blocks
            self.post_norms = nn.ModuleList(layer_norm(dim) for _ in post_norm_ids)
        self.downsample = Downsample(dim) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: Tensor, grid: Grid, next_grid: Grid | None = None) -> tuple[Tensor, Tensor]:
        """→ (this level's output, input of the next level laid out as ``next_grid``)."""
        for index, block in enumerate(self.blocks):
            x = run_block(block, x, grid, checkpointing=self.grad_checkpointing)
            if index in self.post_norm_ids:
                x = grid.zero_removed(self.post_norms[self.post_norm_ids.index(index)](x))
        if self.norm is not None:
            x = grid.zero_removed(self.norm(x))
        return x, (self.downsample(x, grid, next_grid) if self.downsample is not None else x)


class StemEmbed(nn.Module):
    """conv 3×3/2 → LN → GELU → conv 3×3/2 → LN; NCHW in, channels-last out."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = layer_norm(dim // 2, first_in=True, first_out=True)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = layer_norm(dim, first_in=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class InternImage(TimmFeatures, GradCheckpointing, nn.Module):
    """InternImage T–XL classifier (official key layout); ``forward_features(x, mask)``
    with a patch mask is the masked FCMAE encoder."""

    head_prefixes = ("conv_head.", "head.", "dcnv3_head_x4.", "dcnv3_head_x3.", "clip_projector.", "fc_norm.")

    def __init__(self, channels: int = 64, depths: Sequence[int] = (4, 4, 18, 4),
                 groups: Sequence[int] = (4, 8, 16, 32), layer_scale: float | None = None,
                 post_norm: bool = False, offset_scale: float = 1.0, num_classes: int = 1000,
                 drop_path_rate: float = 0.0, cls_scale: float = 1.5, head_init_scale: float = 1.0,
                 dw_kernel_size: int = 3, res_post_norm: bool = False, center_feature_scale: bool = False,
                 level2_post_norm_ids: Sequence[int] = (), clip_projector: bool = False,
                 packed_masked: bool = True, dcn_impl: str = DEFAULT_DCNV3_IMPL, in_chans: int = 3) -> None:
        super().__init__()
        self.packed_masked = packed_masked
        self.depths = tuple(depths)
        self.stage_channels = tuple(channels * 2 ** level for level in range(len(depths)))
        self.num_features = self.stage_channels[-1]
        self.feature_strides = stage_strides(len(depths))
        self.patch_size = self.feature_strides[-1]
        self.patch_embed = StemEmbed(in_chans, channels)
        rates = drop_path_rates(depths, drop_path_rate)
        block_options = dict(layer_scale=layer_scale, post_norm=post_norm, offset_scale=offset_scale,
                             dw_kernel_size=dw_kernel_size, res_post_norm=res_post_norm,
                             center_feature_scale=center_feature_scale, dcn_impl=dcn_impl)
        self.levels = nn.ModuleList(
            Level(channels * 2 ** i, groups[i], rates[i],
                  downsample=i < len(depths) - 1, post_norm_ids=level2_post_norm_ids if i == 2 else (),
                  **block_options)
            for i in range(len(depths)))
        self.clip_projector_head = clip_projector and num_classes > 0
        if self.clip_projector_head:
            self._build_clip_head(num_classes)
        elif num_classes > 0:
            hidden = int(self.num_features * cls_scale)
            self.conv_head = nn.Sequential(nn.Conv2d(self.num_features, hidden, 1, bias=False),
                                           nn.Sequential(nn.BatchNorm2d(hidden)), nn.GELU())
            self.head = nn.Linear(hidden, num_classes)
        self.apply(partial(trunc_normal_init, types=(nn.Linear,)))  # convs: torch defaults
        for module in self.modules():
            if isinstance(module, DCNv3):
                module.reset_parameters()
        scale_head_init([self.head] if num_classes > 0 else [], head_init_scale)

    def _build_clip_head(self, num_classes: int, embed_dim: int = 1024, clip_dim: int = 768,
                         heads: int = 16) -> None:
        """H/G head: stride-32 and stride-16 outputs → 1024-d tokens at stride 16 → attention
        pooling (query = mean token) → 768-d → LayerNorm → Linear."""
        self.dcnv3_head_x4 = nn.Sequential(nn.Conv2d(self.num_features, embed_dim * 4, 1), nn.PixelShuffle(2))
        self.dcnv3_head_x3 = nn.Conv2d(self.num_features // 2, embed_dim, 1)
        self.clip_projector = AttentionPooling(embed_dim, heads, clip_dim)
        self.fc_norm = layer_norm(clip_dim)
        self.head = nn.Linear(clip_dim, num_classes)

    def _grids(self, x: Tensor, mask: Tensor | None, num_visible: int | None = None) -> list[Grid]:
        """Per level: plain dense, masked-dense, or packed visible sites (``packed_masked``
        and every image keeping the same number of patches, as FCMAE masks do; static shapes
        when ``num_visible`` is given)."""
        if mask is not None and self.packed_masked:
            num_visible = visible_count(mask) if num_visible is None else num_visible
            if num_visible is not None:
                return [PackedGrid(sites) for sites in
                        visible_sites(mask, x.shape[-2:], self.patch_size, self.feature_strides, num_visible)]
        return [DenseGrid(keep) for keep in stage_keeps(mask, x, self.feature_strides, channel_dim=-1)]

    def forward_levels(self, x: Tensor, mask: Tensor | None = None, num_visible: int | None = None) -> list[Tensor]:
        """(B, 3, H, W) → every level's output (B, H_i, W_i, C_i) (after its norm, before its
        downsample); with ``mask`` (B, L) zero at removed patches (``num_visible``: the patches
        every image keeps, when known)."""
        grids = self._grids(x, mask, num_visible)
        if mask is not None:   # the stem reads 3 px across patch borders: zero removed pixels first
            (keep,) = keep_maps(mask, x.shape[-2:], self.patch_size, strides=[1])
            x = x * keep.unsqueeze(1).type_as(x)
        x = grids[0].zero_removed(grids[0].from_map(self.patch_embed(x)))
        outputs = []
        for i, (level, grid) in enumerate(zip(self.levels, grids)):
            out, x = level(x, grid, grids[i + 1] if i + 1 < len(grids) else None)
            outputs.append(grid.to_map(out))
        return outputs

    def forward_stages(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """(B, 3, H, W) → every level's output, channels-first (B, C_i, H/s_i, W/s_i)."""
        return [level.permute(0, 3, 1, 2) for level in self.forward_levels(x, mask)]

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) → (B, 8C, H/32, W/32); with ``mask`` (B, L) zero at removed patches."""
        return self.forward_levels(x, mask)[-1].permute(0, 3, 1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None, num_visible: int | None = None) -> Tensor:
        """Logits (B, num_classes); as FCMAE encoder, ``encoder(imgs, mask, num_visible)`` →
        (B, 8C, H/32, W/32) features, zero at removed patches."""
        if mask is not None:
            return self.forward_levels(x, mask, num_visible)[-1].permute(0, 3, 1, 2)
        if self.clip_projector_head:
            levels = self.forward_levels(x)
            tokens = self.dcnv3_head_x4(levels[3].permute(0, 3, 1, 2)) \
                + self.dcnv3_head_x3(levels[2].permute(0, 3, 1, 2))            # (B, 1024, H/16, W/16)
            pooled = self.clip_projector(tokens.flatten(2).transpose(1, 2))
            return self.head(self.fc_norm(pooled))
        features = self.conv_head(self.forward_features(x))
        return self.head(features.mean(dim=(-2, -1)))

    def num_layers(self, decay_type: str = "single") -> int:
        return sum(self.depths)

    def layer_id(self, param_name: str, decay_type: str = "single") -> int:
        """Layer-wise lr decay: stem 0, block j of level i → sum(depths[:i]) + j + 1, head last."""
        parts = param_name.split(".")
        if parts[0] == "patch_embed":
            return 0
        if parts[0] == "levels":
            level = int(parts[1])
            if parts[2] == "blocks":
                return sum(self.depths[:level]) + int(parts[3]) + 1
            return sum(self.depths[:level + 1])      # level norm / downsample: with its last block
        return sum(self.depths) + 1

    def analysis_points(self) -> list[AnalysisPoint]:
        """Every block, ``levels.{i}.blocks.{j}``; its expansion activation is the input of ``mlp.fc2``."""
        return [AnalysisPoint(f"levels.{i}.blocks.{j}", i, block, block.mlp.fc2, block_channels_last=True)
                for i, level in enumerate(self.levels) for j, block in enumerate(level.blocks)]

    def no_weight_decay(self) -> set[str]:
        """None beyond 1-D parameters and biases: every weight matrix, DCNv3 offsets included, is decayed."""
        return set()


def dcn_impl_kwargs(dcn_impl: str, device_type: str) -> dict:
    """Constructor kwargs for ``--dcn-impl``: only implementations that run on ``device_type``."""
    if dcn_impl not in available_impls(device_type):
        raise ValueError(f"--dcn-impl {dcn_impl} does not run on {device_type} here; "
                         f"choose one of {', '.join(available_impls(device_type))}")
    return {"dcn_impl": dcn_impl}


def benchmark_variants(device_type: str) -> dict[str, dict]:
    """``masked``: every site computed and re-masked; ``packed``: pointwise layers on visible
    sites only (the FCMAE default); ``dense-IMPL``/``packed-IMPL`` for each other DCNv3
    implementation that runs on ``device_type``."""
    variants: dict[str, dict] = {"masked": {"packed_masked": False}, "packed": {}}
    for impl in available_impls(device_type):
        if impl != DEFAULT_DCNV3_IMPL:
            variants |= {f"dense-{impl}": {"dcn_impl": impl}, f"packed-{impl}": {"dcn_impl": impl}}
    return variants


register_family(EncoderFamily(
    name="internimage", sizes=INTERNIMAGE_SIZES, dense=InternImage, encoder=partial(masked_dense_encoder, InternImage),
    options=(FamilyOption("--dcn-impl", f"DCNv3 sampling (default {DEFAULT_DCNV3_IMPL}); 'triton': fused Triton "
                          "kernels, CUDA only", DCNV3_IMPLS, dcn_impl_kwargs),),
    sparse_encoder=False, benchmark_variants=benchmark_variants))

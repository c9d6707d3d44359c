"""The DCNv3 operator (InternImage) and the feature layouts it runs on.

Features are channels-last. :class:`DenseGrid` holds a (B, H, W, C) map (with a keep map:
the masked-dense FCMAE mode, zero at removed sites); :class:`PackedGrid` holds only the
visible sites, packed (B, n, C), and spatial ops scatter them into a zero map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_ops import ActiveSites

from ..layers import apply_keep
from .sampling import DEFAULT_DCNV3_IMPL, check_impl, dcnv3_sample


class ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


def layer_norm(dim: int, first_in: bool = False, first_out: bool = False) -> nn.Sequential:
    """LayerNorm wrapped like the official ``build_norm_layer`` (permutes carry no keys)."""
    modules: list[nn.Module] = [ToChannelsLast()] if first_in else []
    modules.append(nn.LayerNorm(dim, eps=1e-6))
    if first_out:
        modules.append(ToChannelsFirst())
    return nn.Sequential(*modules)


class DenseGrid:
    """Features as a (B, H, W, C) map; with ``keep`` (B, H, W, 1) the masked-dense mode,
    where every map handed to a spatial op is re-masked."""

    def __init__(self, keep: Tensor | None = None) -> None:
        self.keep = keep
        self.query_yx = None                                   # every site is a query

    def to_map(self, features: Tensor) -> Tensor:
        return apply_keep(features, self.keep)

    def from_map(self, grid_map: Tensor) -> Tensor:
        return grid_map

    def zero_removed(self, features: Tensor) -> Tensor:
        """``features`` zero at removed sites (before a spatial op reads them)."""
        return apply_keep(features, self.keep)


class PackedGrid:
    """Features of the visible sites only, packed (B, n, C) (every image keeps n sites, as
    FCMAE guarantees): pointwise layers touch visible sites alone; spatial ops scatter into
    a zero map and gather back."""

    def __init__(self, sites: ActiveSites) -> None:
        self.sites = sites
        self.batch_size, self.count = sites.batch_size, sites.max_count
        self.query_yx = sites.coords[:, 1:].reshape(self.batch_size, self.count, 2)

    def to_map(self, features: Tensor) -> Tensor:
        return self.sites.scatter_dense(features.reshape(-1, features.shape[-1]))

    def from_map(self, grid_map: Tensor) -> Tensor:
        return self.sites.gather_dense(grid_map).reshape(self.batch_size, self.count, -1)

    def zero_removed(self, features: Tensor) -> Tensor:
        """Packed features hold visible sites only: nothing to zero."""
        return features


Grid = DenseGrid | PackedGrid


class DCNv3(nn.Module):
    """DCNv3 operator on (N, H, W, C): offsets and modulation from a depthwise-conv branch,
    deformable bilinear sampling of ``input_proj(x)``, then ``output_proj``."""

    def __init__(self, channels: int, groups: int, kernel_size: int = 3, dw_kernel_size: int = 3,
                 offset_scale: float = 1.0, center_feature_scale: bool = False,
                 impl: str = DEFAULT_DCNV3_IMPL) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels {channels} not divisible by groups {groups}")
        check_impl(impl)
        self.groups, self.kernel_size, self.offset_scale = groups, kernel_size, offset_scale
        self.impl = impl
        points = kernel_size * kernel_size
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=dw_kernel_size // 2, groups=channels),
            layer_norm(channels, first_in=True), nn.GELU())
        self.offset = nn.Linear(channels, groups * points * 2)
        self.mask = nn.Linear(channels, groups * points)   # modulation logits; ``mask`` is the official key
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.center_feature_scale = center_feature_scale
        if center_feature_scale:   # H/G: blend the output with the centre value, per group
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(groups, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(groups))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets and modulation start at zero (a 3×3 box average); projections xavier."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, grid: Grid | None = None) -> Tensor:
        """x: features laid out as ``grid`` says ((B, H, W, C) map or packed (B, n, C))."""
        grid = grid or DenseGrid()
        value = self.input_proj(x)
        value_map = grid.to_map(value)                                        # zero where removed
        conv, norm, act = self.dw_conv
        query = act(norm[1](grid.from_map(conv(grid.to_map(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))))
        offset = self.offset(query)
        modulation = self.mask(query).unflatten(-1, (self.groups, -1)).softmax(-1).flatten(-2)
        out = dcnv3_sample(value_map, offset, modulation, self.groups, self.kernel_size,
                           self.offset_scale, grid.query_yx, impl=self.impl)
        if self.center_feature_scale:
            alpha = torch.sigmoid(F.linear(query, self.center_feature_scale_proj_weight,
                                           self.center_feature_scale_proj_bias))      # (N, H, W, G)
            alpha = alpha.repeat_interleave(out.shape[-1] // self.groups, dim=-1)
            out = out * (1 - alpha) + grid.zero_removed(value) * alpha
        return self.output_proj(out)

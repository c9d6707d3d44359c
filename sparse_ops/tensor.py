"""The sparse image tensor: features at the active sites of a batch of 2-D grids.

A :class:`SparseImage` holds ``features`` (N, C) for the N active sites of a batch of
images and an :class:`ActiveSites` object with their ``(b, y, x)`` coordinates. Sites are
always kept in raster order (batch, then row, then column), so that tensors built from the
same active mask line up row for row and index maps can be cached on the shared
:class:`ActiveSites` (like MinkowskiEngine's coordinate manager).
"""
from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import Tensor


def flat_site_index(batch: Tensor, y: Tensor, x: Tensor, spatial_shape: tuple[int, int]) -> Tensor:
    """Position of the sites ``(batch, y, x)`` (equal-shape int tensors) in the flattened
    (B·H·W) grid of ``spatial_shape`` (H, W): ``(batch·H + y)·W + x``, raster order."""
    height, width = spatial_shape
    return (batch * height + y) * width + x


class ActiveSites:
    """The active sites of a batch of ``batch_size`` grids of shape ``spatial_shape``.

    Args:
        coords: (N, 3) int64 ``(b, y, x)`` in raster order.
        spatial_shape: (H, W) of the grid.
        batch_size: number of images B (some may have no active site).
        stride: pixel stride of one grid cell relative to the input image.
    """

    def __init__(self, coords: Tensor, spatial_shape: tuple[int, int], batch_size: int,
                 stride: int = 1) -> None:
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise ValueError(f"coords must have shape (N, 3) as (b, y, x), got {tuple(coords.shape)}")
        self.coords = coords.long()
        self.spatial_shape = (int(spatial_shape[0]), int(spatial_shape[1]))
        self.batch_size = int(batch_size)
        self.stride = int(stride)
        self.cache: dict[Any, Any] = {}  # backend-owned derived data (kernel maps, ...)

    @classmethod
    def from_mask(cls, active: Tensor, stride: int = 1) -> ActiveSites:
        """Sites where ``active`` (B, H, W) is true, in raster order."""
        if active.ndim != 3:
            raise ValueError(f"active mask must be (B, H, W), got {tuple(active.shape)}")
        coords = torch.nonzero(active.bool(), as_tuple=False)
        return cls(coords, tuple(active.shape[1:]), active.shape[0], stride)

    def __len__(self) -> int:
        return self.coords.shape[0]

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @cached_property
    def batch_index(self) -> Tensor:
        """(N,) image index of each site."""
        return self.coords[:, 0].contiguous()

    @cached_property
    def flat_index(self) -> Tensor:
        """(N,) position of each site in the flattened (B·H·W) grid; strictly increasing."""
        return flat_site_index(*self.coords.unbind(1), self.spatial_shape)

    @cached_property
    def counts(self) -> Tensor:
        """(B,) number of active sites per image."""
        return torch.bincount(self.batch_index, minlength=self.batch_size)

    @cached_property
    def equal_counts(self) -> bool:
        """True when every image has the same number of active sites (the FCMAE case)."""
        counts = self.counts
        return bool((counts == counts[0]).all()) if self.batch_size > 0 else True

    @cached_property
    def max_count(self) -> int:
        return int(self.counts.max()) if len(self) else 0

    @cached_property
    def rank_in_image(self) -> Tensor:
        """(N,) index of each site among the sites of its own image."""
        offsets = torch.cumsum(self.counts, 0) - self.counts
        return torch.arange(len(self), device=self.device) - offsets[self.batch_index]

    def downsample(self, stride: int) -> tuple[ActiveSites, Tensor]:
        """The sites of the stride-``stride`` grid with at least one active child (raster order),
        and per coarse site the row of each of its ``stride²`` children here (``len(self)`` for a
        missing child), children in kernel-row order ``r = dx * stride + dy``
        (:mod:`sparse_ops.layout`). Returns (coarse sites, children (N_coarse, stride²)); cached."""
        key = ("downsample", stride)
        if key not in self.cache:
            self.cache[key] = self._downsample(stride)
        return self.cache[key]

    def _downsample(self, stride: int) -> tuple[ActiveSites, Tensor]:
        height, width = self.spatial_shape
        coarse_shape = (-(-height // stride), -(-width // stride))
        batch, y, x = self.coords.unbind(1)
        parents = torch.unique(flat_site_index(batch, y // stride, x // stride, coarse_shape))  # sorted = raster
        coarse_b = parents // (coarse_shape[0] * coarse_shape[1])
        coarse_y = (parents // coarse_shape[1]) % coarse_shape[0]
        coarse_x = parents % coarse_shape[1]
        coarse = ActiveSites(torch.stack([coarse_b, coarse_y, coarse_x], 1), coarse_shape, self.batch_size,
                             self.stride * stride)

        missing = len(self)
        row_of = torch.full((self.batch_size * height * width,), missing, dtype=torch.long, device=self.device)
        row_of[self.flat_index] = torch.arange(len(self), device=self.device)
        offsets = torch.arange(stride, device=self.device)
        dx, dy = torch.meshgrid(offsets, offsets, indexing="ij")                    # r = dx * s + dy
        child_y = coarse_y[:, None] * stride + dy.reshape(1, -1)
        child_x = coarse_x[:, None] * stride + dx.reshape(1, -1)
        inside = (child_y < height) & (child_x < width)
        flat = flat_site_index(coarse_b[:, None], child_y.clamp(max=height - 1), child_x.clamp(max=width - 1),
                               self.spatial_shape)
        children = torch.where(inside, row_of[flat], torch.full_like(flat, missing))
        return coarse, children

    def active_mask(self) -> Tensor:
        """(B, H, W) bool, true at active sites."""
        mask = torch.zeros(self.batch_size * self.spatial_shape[0] * self.spatial_shape[1],
                           dtype=torch.bool, device=self.device)
        mask[self.flat_index] = True
        return mask.view(self.batch_size, *self.spatial_shape)

    def to_padded(self, features: Tensor) -> Tensor:
        """(N, C) → (B, max_count, C) per-image rows, zero-padded; a free view when counts are equal."""
        channels = features.shape[1]
        if self.equal_counts:
            return features.view(self.batch_size, self.max_count, channels)
        padded = features.new_zeros(self.batch_size, self.max_count, channels)
        return padded.index_put((self.batch_index, self.rank_in_image), features)

    def scatter_dense(self, features: Tensor) -> Tensor:
        """(N, C) → (B, H, W, C) channels-last map with zeros at inactive sites."""
        height, width = self.spatial_shape
        grid = features.new_zeros(self.batch_size * height * width, features.shape[1])
        grid = grid.index_copy(0, self.flat_index, features)
        return grid.view(self.batch_size, height, width, features.shape[1])

    def gather_dense(self, grid: Tensor) -> Tensor:
        """(B, H, W, C) map (any memory layout) → (N, C) features at the active sites."""
        channels = grid.shape[-1]
        return grid.reshape(-1, channels).index_select(0, self.flat_index)


class SparseImage:
    """Features at the active sites of a batch of images.

    Args:
        features: (N, C) one row per active site, in the order of ``sites.coords``.
        sites: the active sites (shared between tensors on the same grid).
        backend: name of the ``sparse_ops`` backend that runs spatial ops on this tensor.
    """

    def __init__(self, features: Tensor, sites: ActiveSites, backend: str = "torch") -> None:
        if features.ndim != 2 or features.shape[0] != len(sites):
            raise ValueError(f"features must be (N={len(sites)}, C), got {tuple(features.shape)}")
        self.features = features
        self.sites = sites
        self.backend = backend

    @classmethod
    def from_dense(cls, dense: Tensor, active: Tensor, stride: int = 1,
                   backend: str = "torch") -> SparseImage:
        """Keep the sites of ``dense`` (B, C, H, W) where ``active`` (B, H, W) is true."""
        if dense.ndim != 4 or active.shape != (dense.shape[0], *dense.shape[2:]):
            raise ValueError(f"expected dense (B, C, H, W) and active (B, H, W), got "
                             f"{tuple(dense.shape)} and {tuple(active.shape)}")
        sites = ActiveSites.from_mask(active, stride)
        features = sites.gather_dense(dense.permute(0, 2, 3, 1))
        return cls(features, sites, backend)

    def dense(self) -> Tensor:
        """(B, C, H, W) with zeros at inactive sites (channels-last memory layout)."""
        return self.sites.scatter_dense(self.features).permute(0, 3, 1, 2)

    def replace(self, features: Tensor) -> SparseImage:
        """The same sites and backend with new (N, C') features."""
        return SparseImage(features, self.sites, self.backend)

    @property
    def coords(self) -> Tensor:
        return self.sites.coords

    @property
    def stride(self) -> int:
        return self.sites.stride

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return self.sites.spatial_shape

    @property
    def batch_size(self) -> int:
        return self.sites.batch_size

    @property
    def shape(self) -> torch.Size:
        return self.features.shape

    def __repr__(self) -> str:
        return (f"SparseImage(sites={len(self.sites)}, channels={self.features.shape[1]}, "
                f"batch={self.batch_size}, grid={self.spatial_shape}, stride={self.stride}, "
                f"backend={self.backend!r})")

"""The sparse image tensor: features at the active sites of a batch of 2-D grids.

A :class:`SparseImage` holds ``features`` (N, C) for the N active sites of a batch of
images and an :class:`ActiveSites` object with their ``(b, y, x)`` coordinates. Sites are
always kept in raster order (batch, then row, then column), so that tensors built from the
same sites line up row for row. FCMAE's sites tile whole kept patches
(:meth:`ActiveSites.from_patches`): built and downsampled with static shapes, so a compiled
encoder is one graph.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor


def flat_site_index(batch: Tensor, y: Tensor, x: Tensor, spatial_shape: tuple[int, int]) -> Tensor:
    """Position of the sites ``(batch, y, x)`` (equal-shape int tensors) in the flattened
    (B·H·W) grid of ``spatial_shape`` (H, W): ``(batch·H + y)·W + x``, raster order."""
    height, width = spatial_shape
    return (batch * height + y) * width + x


class ActiveSites:
    """The active sites of a batch of ``batch_size`` grids of shape ``spatial_shape``.

    Everything a layer needs (``batch_index``, ``flat_index``, the per-image site count when
    it is the same for every image) is computed when the object is built, so a compiled
    model reads plain tensors and Python ints, never lazily filled state.

    Args:
        coords: (N, 3) int64 ``(b, y, x)`` in raster order.
        spatial_shape: (H, W) of the grid.
        batch_size: number of images B (some may have no active site).
        stride: pixel stride of one grid cell relative to the input image.
        sites_per_image: the number of sites of every image when all images have the same
            number (the FCMAE case), else None.
        patches: the kept patches these sites tile, when built by :meth:`from_patches`.
    """

    def __init__(self, coords: Tensor, spatial_shape: tuple[int, int], batch_size: int,
                 stride: int = 1, sites_per_image: int | None = None,
                 patches: PatchTiling | None = None) -> None:
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise ValueError(f"coords must have shape (N, 3) as (b, y, x), got {tuple(coords.shape)}")
        self.coords = coords.long()
        self.spatial_shape = (int(spatial_shape[0]), int(spatial_shape[1]))
        self.batch_size = int(batch_size)
        self.stride = int(stride)
        self.sites_per_image = sites_per_image
        self.patches = patches
        self.batch_index = self.coords[:, 0].contiguous()                     # (N,) image of each site
        self.flat_index = flat_site_index(*self.coords.unbind(1), self.spatial_shape)  # (N,) increasing
        self.cache: dict[Any, Any] = {}  # backend-owned derived data (MinkowskiEngine's coordinate map)

    @classmethod
    def from_mask(cls, active: Tensor, stride: int = 1) -> ActiveSites:
        """Sites where ``active`` (B, H, W) is true, in raster order (data-dependent: reads the mask)."""
        if active.ndim != 3:
            raise ValueError(f"active mask must be (B, H, W), got {tuple(active.shape)}")
        coords = torch.nonzero(active.bool(), as_tuple=False)
        counts = active.flatten(1).sum(1)
        equal = active.shape[0] > 0 and bool((counts == counts[0]).all())
        return cls(coords, tuple(active.shape[1:]), active.shape[0], stride,
                   sites_per_image=int(counts[0]) if equal else None)

    @classmethod
    def from_patches(cls, kept: Tensor, patch_grid: tuple[int, int], cells_per_patch: int,
                     stride: int = 1) -> ActiveSites:
        """The sites covered by kept patches, with static shapes (no data-dependent op).

        ``kept`` (B, K) holds each image's kept patch indices (raster order in the (h, w)
        ``patch_grid``, any order along K); every patch covers ``cells_per_patch``² sites of
        this grid, which has shape (h·cells_per_patch, w·cells_per_patch). Gives
        B·K·cells_per_patch² sites in raster order.
        """
        batch, num_kept = kept.shape
        cells = cells_per_patch
        width = patch_grid[1] * cells
        offsets = torch.arange(cells, device=kept.device)
        rows = (kept // patch_grid[1])[:, :, None, None] * cells + offsets[:, None]   # (B, K, cells, 1)
        columns = (kept % patch_grid[1])[:, :, None, None] * cells + offsets          # (B, K, 1, cells)
        in_image = torch.sort((rows * width + columns).reshape(batch, -1), dim=1).values  # (B, K·cells²)
        image = torch.arange(batch, device=kept.device)[:, None].expand_as(in_image)
        coords = torch.stack([image, in_image // width, in_image % width], dim=-1).reshape(-1, 3)
        return cls(coords, (patch_grid[0] * cells, width), batch, stride,
                   sites_per_image=num_kept * cells * cells,
                   patches=PatchTiling(kept, patch_grid, cells))

    def __len__(self) -> int:
        return self.coords.shape[0]

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @property
    def equal_counts(self) -> bool:
        """True when every image has the same number of active sites (the FCMAE case)."""
        return self.sites_per_image is not None

    def counts(self) -> Tensor:
        """(B,) number of active sites per image."""
        if self.sites_per_image is not None:
            return torch.full((self.batch_size,), self.sites_per_image, dtype=torch.long, device=self.device)
        return torch.bincount(self.batch_index, minlength=self.batch_size)

    @property
    def max_count(self) -> int:
        """The largest number of sites of one image (a static int when counts are equal)."""
        if self.sites_per_image is not None:
            return self.sites_per_image
        return int(self.counts().max()) if len(self) else 0

    def downsample(self, stride: int) -> tuple[ActiveSites, Tensor]:
        """The sites of the stride-``stride`` grid with at least one active child (raster order),
        and per coarse site the row of each of its ``stride²`` children here (``len(self)`` for a
        missing child), children in kernel-row order ``r = dx * stride + dy``
        (:mod:`sparse_ops.layout`). Returns (coarse sites, children (N_coarse, stride²)).

        Sites tiling kept patches (:meth:`from_patches`) stay patch tilings with static shapes
        while ``stride`` divides the cells per patch; others use ``torch.unique``."""
        patches = self.patches
        if patches is not None and patches.cells_per_patch % stride == 0:
            coarse = ActiveSites.from_patches(patches.kept, patches.grid, patches.cells_per_patch // stride,
                                              self.stride * stride)
        else:
            coarse = self._coarse_sites(stride)
        return coarse, self._children(coarse, stride)

    def _coarse_sites(self, stride: int) -> ActiveSites:
        height, width = self.spatial_shape
        coarse_shape = (-(-height // stride), -(-width // stride))
        batch, y, x = self.coords.unbind(1)
        parents = torch.unique(flat_site_index(batch, y // stride, x // stride, coarse_shape))  # sorted = raster
        coarse_b = parents // (coarse_shape[0] * coarse_shape[1])
        coarse_y = (parents // coarse_shape[1]) % coarse_shape[0]
        coarse_x = parents % coarse_shape[1]
        return ActiveSites(torch.stack([coarse_b, coarse_y, coarse_x], 1), coarse_shape, self.batch_size,
                           self.stride * stride)

    def _children(self, coarse: ActiveSites, stride: int) -> Tensor:
        """(N_coarse, stride²) row here of each child of every ``coarse`` site, ``len(self)`` if missing."""
        height, width = self.spatial_shape
        missing = len(self)
        row_of = torch.full((self.batch_size * height * width,), missing, dtype=torch.long, device=self.device)
        row_of[self.flat_index] = torch.arange(len(self), device=self.device)
        coarse_b, coarse_y, coarse_x = coarse.coords.unbind(1)
        offsets = torch.arange(stride, device=self.device)
        dx, dy = torch.meshgrid(offsets, offsets, indexing="ij")                    # r = dx * s + dy
        child_y = coarse_y[:, None] * stride + dy.reshape(1, -1)
        child_x = coarse_x[:, None] * stride + dx.reshape(1, -1)
        inside = (child_y < height) & (child_x < width)
        flat = flat_site_index(coarse_b[:, None], child_y.clamp(max=height - 1), child_x.clamp(max=width - 1),
                               self.spatial_shape)
        return torch.where(inside, row_of[flat], torch.full_like(flat, missing))

    def to_padded(self, features: Tensor) -> Tensor:
        """(N, C) → (B, max_count, C) per-image rows, zero-padded; a free view when counts are equal."""
        channels = features.shape[1]
        if self.sites_per_image is not None:
            return features.view(self.batch_size, self.sites_per_image, channels)
        counts = self.counts()
        first_row = (torch.cumsum(counts, 0) - counts)[self.batch_index]          # (N,) row of the image's first site
        rank_in_image = torch.arange(len(self), device=self.device) - first_row
        padded = features.new_zeros(self.batch_size, self.max_count, channels)
        return padded.index_put((self.batch_index, rank_in_image), features)

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


class PatchTiling(NamedTuple):
    """Sites that tile whole patches: ``kept`` (B, K) patch indices in the (h, w) patch ``grid``,
    each patch ``cells_per_patch``² sites."""

    kept: Tensor
    grid: tuple[int, int]
    cells_per_patch: int


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
        return cls.at_sites(dense, ActiveSites.from_mask(active, stride), backend)

    @classmethod
    def at_sites(cls, dense: Tensor, sites: ActiveSites, backend: str = "torch") -> SparseImage:
        """The features of ``dense`` (B, C, H, W) at ``sites`` (a grid of shape (H, W))."""
        if dense.ndim != 4 or (dense.shape[0], *dense.shape[2:]) != (sites.batch_size, *sites.spatial_shape):
            raise ValueError(f"dense map {tuple(dense.shape)} does not match sites of {sites.batch_size} "
                             f"images on a {sites.spatial_shape} grid")
        return cls(sites.gather_dense(dense.permute(0, 2, 3, 1)), sites, backend)

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

"""Random patch masks for FCMAE. Convention (official): mask == 1 marks a *removed* patch."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparse_ops import ActiveSites


def check_mask_ratio(mask_ratio: float) -> float:
    """Return ``mask_ratio`` if it lies in [0, 1), else raise a ``ValueError`` (the FCMAE
    constructor's check; the command line checks its flag itself)."""
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return float(mask_ratio)


def patch_grid(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(h, w) patches of an image of (H, W) pixels; both sides must be multiples of patch_size."""
    height, width = image_size
    if height % patch_size or width % patch_size or height == 0 or width == 0:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size "
                         f"{patch_size}; resize or crop to e.g. {max(patch_size, height // patch_size * patch_size)}")
    return height // patch_size, width // patch_size


def check_pretraining_masks(image_size: int, patch_size: int, mask_ratio: float) -> None:
    """Refuse settings where an image of ``image_size``² pixels would keep no visible patch or
    lose none (nothing to encode, or nothing to reconstruct); the message says what works."""
    grid = patch_grid((image_size, image_size), patch_size)
    num_patches = grid[0] * grid[1]
    num_keep = num_visible(num_patches, mask_ratio)
    if 1 <= num_keep < num_patches:
        return
    if num_patches < 2:
        raise ValueError(f"--input-size {image_size} gives a single {patch_size}-px patch, which cannot be both "
                         f"visible and removed; use --input-size {2 * patch_size} or larger (e.g. 224)")
    raise ValueError(f"--mask-ratio {mask_ratio:g} at --input-size {image_size} ({num_patches} patches) keeps "
                     f"{num_keep} visible; every image needs >= 1 visible and >= 1 removed patch: use a ratio "
                     f"in (0, {1 - 1 / num_patches:.4g}] or a larger --input-size")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches every image keeps under ``mask_ratio``: ``int(L * (1 - mask_ratio))`` (official).
    The ratio is checked where it enters (the command line, :func:`check_pretraining_masks`,
    the FCMAE constructor), not here."""
    return int(num_patches * (1 - mask_ratio))


def random_masks(batch_size: int, num_patches: int, mask_ratio: float,
                 device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """(B, L) float masks, 1 = removed. Each row keeps ``int(L * (1 - mask_ratio))`` patches,
    chosen uniformly at random (argsort of Gaussian noise, as in the official code)."""
    num_keep = num_visible(num_patches, mask_ratio)
    noise = torch.randn(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :num_keep] = 0
    return torch.gather(mask, 1, ids_restore)


def upsample_mask(mask: Tensor, grid: tuple[int, int], scale: int) -> Tensor:
    """(B, h·w) patch mask → (B, h·scale, w·scale) mask at a finer feature resolution."""
    patches = mask.reshape(mask.shape[0], *grid)
    return patches.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def keep_maps(mask: Tensor, image_size: tuple[int, int], patch_size: int,
              strides: Sequence[int]) -> list[Tensor]:
    """(B, L) patch mask → for each feature stride s, a (B, H/s, W/s) map that is 1 at the
    sites of kept patches and 0 at removed ones (same dtype as ``mask``)."""
    grid = patch_grid(image_size, patch_size)
    return [1.0 - upsample_mask(mask, grid, patch_size // stride) for stride in strides]


def visible_count(mask: Tensor) -> int | None:
    """The number of kept patches of every row of ``mask`` (B, L) when all rows keep the same
    number (always so for FCMAE masks), else None. Reads the mask: a host sync, and a graph
    break under ``torch.compile``; pass the count where it is known instead."""
    kept = (mask == 0).sum(dim=1)
    return int(kept[0]) if mask.shape[0] and bool((kept == kept[0]).all()) else None


def visible_sites(mask: Tensor, image_size: tuple[int, int], patch_size: int, strides: Sequence[int],
                  num_visible: int | None = None) -> list[ActiveSites]:
    """For each feature stride s, the sites of the kept patches of ``mask`` (B, L) on the
    (H/s, W/s) grid of an image of ``image_size`` (raster order).

    With ``num_visible`` (the patches every row keeps, as FCMAE draws them) the sites come from
    the kept patch indices with static shapes (:meth:`ActiveSites.from_patches`): no
    data-dependent op, so a compiled encoder is one graph. Without it the count is read from
    the mask (:func:`visible_count`); rows keeping different numbers fall back to
    :meth:`ActiveSites.from_mask` (``sites_per_image`` None).
    """
    grid = patch_grid(image_size, patch_size)
    if num_visible is None:
        num_visible = visible_count(mask)
    if num_visible is None:
        return [ActiveSites.from_mask(keep > 0, stride) for keep, stride in
                zip(keep_maps(mask, image_size, patch_size, strides), strides)]
    kept = torch.argsort(mask, dim=1, stable=True)[:, :num_visible]       # (B, K) kept patches, ascending
    return [ActiveSites.from_patches(kept, grid, patch_size // stride, stride) for stride in strides]

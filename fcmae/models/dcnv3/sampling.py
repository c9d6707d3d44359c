"""DCNv3 deformable sampling (stride 1, dilation 1, 'same' padding) without a CUDA-extension build.

Two implementations with the same arguments and the same numbers:

- ``"grid_sample"`` (default, every device): ``F.grid_sample`` per group into a
  (B·G, Cg, Q, P) tensor, then the modulation-weighted sum over points. Autograd keeps that
  P-times-larger tensor for backward; InternImage's ``grad_checkpointing`` recomputes it.
- ``"triton"``: fused Triton kernels for CUDA devices (:mod:`.triton_kernels`): positions,
  corners and the weighted sum in registers, value gradients by fp32 atomics, nothing saved
  but the inputs. Tested on CPU through Triton's interpreter; its GPU speed is not measured.

Sampling positions are computed in at least fp32 in both, also for bf16 inputs: in bf16 a
position near x = 56 is only resolved to 0.25 px.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

DCNV3_IMPLS = ("grid_sample", "triton")
DEFAULT_DCNV3_IMPL = "grid_sample"


def check_impl(impl: str) -> None:
    if impl not in DCNV3_IMPLS:
        raise ValueError(f"unknown DCNv3 implementation {impl!r}; choose one of {', '.join(DCNV3_IMPLS)}")


def available_impls(device_type: str) -> tuple[str, ...]:
    """The implementations that run on ``device_type`` ("cpu", "cuda", ...) here."""
    if device_type != "cuda" or importlib.util.find_spec("triton") is None:
        return tuple(impl for impl in DCNV3_IMPLS if impl != "triton")
    return DCNV3_IMPLS


def _position_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _all_sites(batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """(B, H·W, 2) (y, x) of every site, raster order."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                            indexing="ij")
    return torch.stack([ys, xs], -1).reshape(1, height * width, 2).expand(batch, -1, -1)


def sample_positions(offset: Tensor, query_yx: Tensor, groups: int, kernel_size: int,
                     offset_scale: float) -> tuple[Tensor, Tensor]:
    """offset (B, Q, G·P·2) ordered [group][point][dx, dy], query_yx (B, Q, 2) →
    (x, y) pixel positions, each (B, Q, G, P), in at least fp32.

    Point p = i·k + j sits at (x, y) = (i − k//2, j − k//2) on the base grid, scaled by
    ``offset_scale`` together with the learned offset."""
    batch, queries = query_yx.shape[:2]
    dtype = _position_dtype(offset.dtype)
    steps = torch.arange(kernel_size, device=offset.device, dtype=dtype) - kernel_size // 2
    grid_dx = steps.repeat_interleave(kernel_size)                 # i (x) outer
    grid_dy = steps.repeat(kernel_size)                            # j (y) inner
    offset = offset.to(dtype).reshape(batch, queries, groups, kernel_size * kernel_size, 2)
    query_yx = query_yx.to(dtype).view(batch, queries, 1, 1, 2)
    sample_x = query_yx[..., 1] + (grid_dx + offset[..., 0]) * offset_scale
    sample_y = query_yx[..., 0] + (grid_dy + offset[..., 1]) * offset_scale
    return sample_x, sample_y


def _grid_sample_sampling(value: Tensor, offset: Tensor, weight: Tensor, query_yx: Tensor,
                           groups: int, kernel_size: int, offset_scale: float) -> Tensor:
    """The ``grid_sample`` implementation (arguments as :func:`dcnv3_sample` after its
    reshape to (B, Q, ·)): → (B, Q, C), computed in at least fp32."""
    batch, height, width, channels = value.shape
    queries, points = query_yx.shape[1], kernel_size * kernel_size
    sample_x, sample_y = sample_positions(offset, query_yx, groups, kernel_size, offset_scale)
    grid = torch.stack([(2 * sample_x + 1) / width - 1, (2 * sample_y + 1) / height - 1], dim=-1)
    grid = grid.transpose(1, 2).reshape(batch * groups, queries, points, 2)
    per_group = (value.to(grid.dtype).reshape(batch, height * width, groups, channels // groups)
                 .permute(0, 2, 3, 1).reshape(batch * groups, channels // groups, height, width))
    sampled = F.grid_sample(per_group, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)                   # (B·G, Cg, Q, P)
    weight = weight.to(grid.dtype).reshape(batch, queries, groups, points).transpose(1, 2)
    out = (sampled * weight.reshape(batch * groups, 1, queries, points)).sum(-1)   # (B·G, Cg, Q)
    return out.reshape(batch, channels, queries).transpose(1, 2).to(value.dtype)


def dcnv3_sample(value: Tensor, offset: Tensor, weight: Tensor, groups: int, kernel_size: int = 3,
                 offset_scale: float = 1.0, query_yx: Tensor | None = None,
                 impl: str = DEFAULT_DCNV3_IMPL) -> Tensor:
    """Deformable sampling of DCNv3.

    value (B, H, W, C) is the map sampled from. Queries are every site (``query_yx`` None;
    offset (B, H, W, G·P·2), weight (B, H, W, G·P) → (B, H, W, C)) or Q sites per image
    (``query_yx`` (B, Q, 2) as (y, x); offset (B, Q, G·P·2), weight (B, Q, G·P) → (B, Q, C)).
    Offsets are ordered [group][point][dx, dy]; weights are the softmaxed modulation.
    Corners outside the map read zero. The result has ``value``'s dtype.
    """
    check_impl(impl)
    batch, height, width, channels = value.shape
    out_shape = (*offset.shape[:-1], channels)
    if query_yx is None:
        query_yx = _all_sites(batch, height, width, value.device)
    queries = query_yx.shape[1]
    offset, weight = offset.reshape(batch, queries, -1), weight.reshape(batch, queries, -1)
    if impl == "grid_sample":
        out = _grid_sample_sampling(value, offset, weight, query_yx, groups, kernel_size, offset_scale)
    else:
        from .triton_kernels import TritonSample  # Triton is optional; CUDA devices only
        out = TritonSample.apply(value, offset, weight, query_yx, groups, kernel_size, offset_scale)
    return out.reshape(out_shape)

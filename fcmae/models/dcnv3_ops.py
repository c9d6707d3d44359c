"""DCNv3 deformable sampling (stride 1, dilation 1, 'same' padding) in pure PyTorch.

Two interchangeable implementations with the same arguments and the same numbers (tests
compare them in fp64, and both against a hand-written bilinear definition):

- ``"grid_sample"`` (default): ``F.grid_sample`` per group into a (B·G, Cg, Q, P) tensor,
  then the modulation-weighted sum over points. Fastest where measured (CPU), but autograd
  keeps that P-times-larger tensor for backward.
- ``"gather"``: every query's 4·P bilinear corners become row indices into the
  channels-last value map seen as a (B·H·W·G, Cg) table, with coefficients = bilinear
  weight × modulation. The weighted gather-sum is one ``F.embedding_bag`` call. A custom
  autograd function saves only its inputs and rebuilds the corners in backward, so no
  (B, Q, G, P, Cg) tensor is ever formed or kept: about 4× (fp32) to 8× (bf16) fewer
  saved bytes per DCNv3 call, at 2–3× the time on CPU (``tools/dcnv3_bench.py``).
- ``"triton"``: fused Triton kernels for CUDA devices (:mod:`.dcnv3_triton`): positions,
  corners and the weighted sum in registers, value gradients by fp32 atomics. Tested on
  CPU through Triton's interpreter; its GPU speed is not measured yet.

Sampling positions are computed in at least fp32 in both, also for bf16 inputs: in bf16 a
position near x = 56 is only resolved to 0.25 px.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

DCNV3_IMPLS = ("grid_sample", "gather", "triton")
DEFAULT_DCNV3_IMPL = "grid_sample"
_CORNER_DX = (0, 1, 0, 1)                      # corner c of the bilinear cell: (y0 + dy, x0 + dx)
_CORNER_DY = (0, 0, 1, 1)


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


def _corner_rows(value_shape: torch.Size, sample_x: Tensor, sample_y: Tensor,
                 weight: Tensor) -> tuple[Tensor, Tensor]:
    """Positions (B, Q, G, P), weight (B, Q, G, P) → rows (B·Q·G, 4P) into the (B·H·W·G, Cg)
    value table and coefficients (B·Q·G, 4P) (bilinear × modulation; 0 for corners off the
    map, whose rows are clamped to a valid one)."""
    batch, height, width, _ = value_shape
    _, queries, groups, points = sample_x.shape
    device = sample_x.device
    sample_x = sample_x.clamp(-2.0, width + 1.0)      # far-off points: all corners off the map
    sample_y = sample_y.clamp(-2.0, height + 1.0)
    left, top = sample_x.floor(), sample_y.floor()
    frac_x, frac_y = sample_x - left, sample_y - top               # carry the position gradient
    weight_x = torch.stack([1 - frac_x, frac_x], -1)               # (B, Q, G, P, 2) for dx = 0, 1
    weight_y = torch.stack([1 - frac_y, frac_y], -1)
    bilinear = (weight_y.unsqueeze(-1) * weight_x.unsqueeze(-2)).flatten(-2)   # (…, 4): dy outer
    corner_x = left.long().unsqueeze(-1) + torch.tensor(_CORNER_DX, device=device)
    corner_y = top.long().unsqueeze(-1) + torch.tensor(_CORNER_DY, device=device)
    inside = (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
    coef = bilinear * inside * weight.to(bilinear.dtype).reshape(batch, queries, groups, points, 1)
    image = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1)
    group = torch.arange(groups, device=device).view(1, 1, groups, 1, 1)
    site = (image * height + corner_y.clamp(0, height - 1)) * width + corner_x.clamp(0, width - 1)
    rows = (site * groups + group).reshape(batch * queries * groups, points * 4)
    return rows, coef.reshape(batch * queries * groups, points * 4)


class _GatherSample(torch.autograd.Function):
    """(value (B, H, W, C), offset (B, Q, G·P·2), weight (B, Q, G·P), query_yx (B, Q, 2))
    → (B·Q·G, Cg). Saves its inputs only; backward rebuilds rows and coefficients."""

    @staticmethod
    def forward(ctx, value: Tensor, offset: Tensor, weight: Tensor, query_yx: Tensor,
                groups: int, kernel_size: int, offset_scale: float) -> Tensor:
        ctx.save_for_backward(value, offset, weight, query_yx)
        ctx.options = (groups, kernel_size, offset_scale)
        with torch.autocast(value.device.type, enabled=False):
            rows, coef = _GatherSample.corners(value, offset, weight, query_yx, *ctx.options)
            table = value.reshape(-1, value.shape[-1] // groups)
            return F.embedding_bag(rows, table, mode="sum", per_sample_weights=coef.to(value.dtype))

    @staticmethod
    def corners(value: Tensor, offset: Tensor, weight: Tensor, query_yx: Tensor, groups: int,
                kernel_size: int, offset_scale: float) -> tuple[Tensor, Tensor]:
        sample_x, sample_y = sample_positions(offset, query_yx, groups, kernel_size, offset_scale)
        return _corner_rows(value.shape, sample_x, sample_y, weight.unflatten(-1, (groups, -1)))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, offset, weight, query_yx = ctx.saved_tensors
        need_value, need_offset, need_weight = ctx.needs_input_grad[:3]
        table = value.reshape(-1, value.shape[-1] // ctx.options[0])
        with torch.autocast(value.device.type, enabled=False), torch.enable_grad():
            offset = offset.detach().requires_grad_(need_offset)
            weight = weight.detach().requires_grad_(need_weight)
            rows, coef = _GatherSample.corners(value, offset, weight, query_yx, *ctx.options)
            grad_value = grad_offset = grad_weight = None
            if need_value:      # table rows += coef · grad_out, accumulated in fp32, one corner at a time
                grad_table = torch.zeros(table.shape, dtype=coef.dtype, device=table.device)
                grad_wide = grad_out.to(coef.dtype)
                for corner in range(rows.shape[1]):
                    grad_table.index_add_(0, rows[:, corner], grad_wide * coef[:, corner, None].detach())
                grad_value = grad_table.to(value.dtype).view_as(value)
            if need_offset or need_weight:
                # d out / d coef[m, k] = <table[rows[m, k]], grad_out[m]>: embedding_bag's own
                # per-sample-weight gradient computes exactly these dot products
                probe = coef.detach().to(value.dtype).requires_grad_()
                gathered = F.embedding_bag(rows, table.detach(), mode="sum", per_sample_weights=probe)
                (grad_coef,) = torch.autograd.grad(gathered, probe, grad_out)
                inputs = [t for t, need in ((offset, need_offset), (weight, need_weight)) if need]
                grads = iter(torch.autograd.grad(coef, inputs, grad_coef.to(coef.dtype)))
                grad_offset = next(grads).to(offset.dtype) if need_offset else None
                grad_weight = next(grads).to(weight.dtype) if need_weight else None
        return grad_value, grad_offset, grad_weight, None, None, None, None


def _grid_sample_sampling(value: Tensor, offset: Tensor, weight: Tensor, query_yx: Tensor,
                           groups: int, kernel_size: int, offset_scale: float) -> Tensor:
    """The ``grid_sample`` path: → (B, Q, C), computed in at least fp32."""
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
    elif impl == "gather":
        out = _GatherSample.apply(value, offset, weight, query_yx, groups, kernel_size, offset_scale)
    else:
        from .dcnv3_triton import TritonSample      # Triton is optional; CUDA devices only
        out = TritonSample.apply(value, offset, weight, query_yx, groups, kernel_size, offset_scale)
    return out.reshape(out_shape)

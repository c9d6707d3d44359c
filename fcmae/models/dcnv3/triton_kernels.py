"""DCNv3 sampling as fused Triton kernels (forward and backward), for CUDA devices.

One program handles ``BLOCK_ROWS`` (query, group) rows × all Cg channels of the
channels-last value table (B·H·W·G, Cg): for each of the P points (a loop, not unrolled) it
computes the sampling position in fp32, reads the 4 bilinear corners and accumulates —
nothing of size (B, Q, G, P, Cg) is formed. Backward recomputes the positions, scatters the
value gradient with fp32 atomics and writes the offset and modulation gradients directly.

Launch configurations are autotuned from :data:`CONFIGS`, keeping those whose
(BLOCK_ROWS, BLOCK_C) tile gives every thread :data:`ELEMENTS_PER_THREAD` elements (at
InternImage's group widths of 16 and 32 channels): compiled
for sm_90 every such variant uses no local memory and few enough registers for at least two
blocks per SM (tests/test_dcnv3_triton.py checks it with ptxas, BENCHMARKS.md has the numbers).

Same arguments and numbers as the other implementations in :mod:`.sampling`. Tests run
these kernels on CPU through Triton's interpreter: ``TRITON_INTERPRET=1`` must be set
before this module is imported (``triton.jit`` picks the mode then). Imported only when
``impl="triton"`` is asked for, so Triton stays optional.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# (rows per program, warps) tried by the autotuner; a config runs only where each thread holds
# ELEMENTS_PER_THREAD elements of the (rows, padded channels) tile: more spill registers, fewer
# leave local-memory stack frames (measured with tools/triton_resources.py, Triton 3.6 and 3.8)
CONFIGS = [triton.Config({"BLOCK_ROWS": rows}, num_warps=warps) for rows, warps in ((8, 4), (16, 4), (16, 8), (32, 8))]
ELEMENTS_PER_THREAD = 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _corner(x, y, corner: tl.constexpr, width, height, row_ok):
    """Bilinear weights along x and y of corner 0–3 (dx = corner % 2, dy = corner // 2) of the
    cell holding (x, y), the corner's (cx, cy), and whether it lies on the map."""
    left, top = tl.floor(x), tl.floor(y)
    frac_x, frac_y = x - left, y - top
    weight_x = frac_x * (corner % 2) + (1.0 - frac_x) * (1 - corner % 2)
    weight_y = frac_y * (corner // 2) + (1.0 - frac_y) * (1 - corner // 2)
    corner_x = left.to(tl.int64) + corner % 2
    corner_y = top.to(tl.int64) + corner // 2
    inside = row_ok & (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
    return weight_x, weight_y, corner_x, corner_y, inside


@triton.jit
def _position(offset_ptr, rows, row_ok, query_x, query_y, point, KERNEL: tl.constexpr,
              offset_scale, width, height):
    """fp32 sampling position of ``point`` for each row, clamped so far-off points stay finite."""
    offset_at = rows * (KERNEL * KERNEL * 2) + point * 2
    offset_x = tl.load(offset_ptr + offset_at, mask=row_ok, other=0.0).to(tl.float32)
    offset_y = tl.load(offset_ptr + offset_at + 1, mask=row_ok, other=0.0).to(tl.float32)
    x = query_x + ((point // KERNEL - KERNEL // 2) + offset_x) * offset_scale
    y = query_y + ((point % KERNEL - KERNEL // 2) + offset_y) * offset_scale
    return tl.minimum(tl.maximum(x, -2.0), width + 1.0), tl.minimum(tl.maximum(y, -2.0), height + 1.0)


@triton.jit
def _row_setup(query_ptr, num_rows, queries, groups, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)   # (b·Q + q)·G + g
    row_ok = rows < num_rows
    query = rows // groups
    query_y = tl.load(query_ptr + query * 2, mask=row_ok, other=0).to(tl.float32)
    query_x = tl.load(query_ptr + query * 2 + 1, mask=row_ok, other=0).to(tl.float32)
    return rows, row_ok, rows % groups, query // queries, query_x, query_y


@triton.jit
def _forward_kernel(value_ptr, offset_ptr, weight_ptr, query_ptr, out_ptr, num_rows, queries,
                    height, width, groups, group_channels, offset_scale,
                    KERNEL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, row_ok, group, image, query_x, query_y = _row_setup(query_ptr, num_rows, queries, groups, BLOCK_ROWS)
    channels = tl.arange(0, BLOCK_C)
    channel_ok = channels < group_channels
    acc = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    for point in range(KERNEL * KERNEL):      # a loop, not unrolled: registers stay low
        x, y = _position(offset_ptr, rows, row_ok, query_x, query_y, point, KERNEL, offset_scale, width, height)
        modulation = tl.load(weight_ptr + rows * (KERNEL * KERNEL) + point, mask=row_ok, other=0.0).to(tl.float32)
        for corner in tl.static_range(4):
            weight_x, weight_y, corner_x, corner_y, inside = _corner(x, y, corner, width, height, row_ok)
            table_row = ((image * height + corner_y) * width + corner_x) * groups + group
            sampled = tl.load(value_ptr + table_row[:, None] * group_channels + channels[None, :],
                              mask=inside[:, None] & channel_ok[None, :], other=0.0).to(tl.float32)
            acc += (weight_x * weight_y * modulation)[:, None] * sampled
    tl.store(out_ptr + rows[:, None] * group_channels + channels[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & channel_ok[None, :])


@triton.jit
def _backward_kernel(value_ptr, offset_ptr, weight_ptr, query_ptr, grad_out_ptr, grad_value_ptr,
                     grad_offset_ptr, grad_weight_ptr, num_rows, queries, height, width, groups,
                     group_channels, offset_scale,
                     KERNEL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, row_ok, group, image, query_x, query_y = _row_setup(query_ptr, num_rows, queries, groups, BLOCK_ROWS)
    channels = tl.arange(0, BLOCK_C)
    channel_ok = channels < group_channels
    grad_out = tl.load(grad_out_ptr + rows[:, None] * group_channels + channels[None, :],
                       mask=row_ok[:, None] & channel_ok[None, :], other=0.0).to(tl.float32)
    for point in range(KERNEL * KERNEL):      # a loop, not unrolled: registers stay low
        x, y = _position(offset_ptr, rows, row_ok, query_x, query_y, point, KERNEL, offset_scale, width, height)
        modulation = tl.load(weight_ptr + rows * (KERNEL * KERNEL) + point, mask=row_ok, other=0.0).to(tl.float32)
        grad_modulation = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        grad_x = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        grad_y = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for corner in tl.static_range(4):
            weight_x, weight_y, corner_x, corner_y, inside = _corner(x, y, corner, width, height, row_ok)
            table_row = ((image * height + corner_y) * width + corner_x) * groups + group
            at = table_row[:, None] * group_channels + channels[None, :]
            both_ok = inside[:, None] & channel_ok[None, :]
            sampled = tl.load(value_ptr + at, mask=both_ok, other=0.0).to(tl.float32)
            dot = tl.sum(sampled * grad_out, axis=1)                        # <value[corner], grad_out>
            grad_modulation += weight_x * weight_y * dot
            grad_x += modulation * (2.0 * (corner % 2) - 1.0) * weight_y * dot     # d weight_x / dx = ±1
            grad_y += modulation * weight_x * (2.0 * (corner // 2) - 1.0) * dot
            tl.atomic_add(grad_value_ptr + at, (weight_x * weight_y * modulation)[:, None] * grad_out, mask=both_ok)
        tl.store(grad_weight_ptr + rows * (KERNEL * KERNEL) + point, grad_modulation, mask=row_ok)
        offset_at = rows * (KERNEL * KERNEL * 2) + point * 2
        tl.store(grad_offset_ptr + offset_at, grad_x * offset_scale, mask=row_ok)
        tl.store(grad_offset_ptr + offset_at + 1, grad_y * offset_scale, mask=row_ok)


def fitting_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The configs whose (BLOCK_ROWS, BLOCK_C) tile gives each of its ``32 · num_warps``
    threads the most elements up to ``ELEMENTS_PER_THREAD`` (exactly two for group widths of
    16 and 32 channels, InternImage's); the smallest tiles where every config exceeds it."""
    block_c = {**named_args, **kwargs}["BLOCK_C"]
    per_thread = {id(config): config.kwargs["BLOCK_ROWS"] * block_c / (32 * config.num_warps) for config in configs}
    within = [value for value in per_thread.values() if value <= ELEMENTS_PER_THREAD]
    chosen = max(within) if within else min(per_thread.values())
    return [config for config in configs if per_thread[id(config)] == chosen]


_tuned_forward = triton.autotune(CONFIGS, key=["num_rows", "group_channels"],
                                 prune_configs_by={"early_config_prune": fitting_configs})(_forward_kernel)
_tuned_backward = triton.autotune(CONFIGS, key=["num_rows", "group_channels"], reset_to_zero=["grad_value_ptr"],
                                  prune_configs_by={"early_config_prune": fitting_configs})(_backward_kernel)


def check_device(value: Tensor) -> None:
    if not (value.is_cuda or interpreting()):
        raise ValueError("the 'triton' DCNv3 implementation needs a CUDA device (on CPU use 'grid_sample')")


def _launch(tuned, rows: int, group_channels: int, kernel_size: int, *args) -> None:
    """One program per ``BLOCK_ROWS`` (query, group) rows; channels padded to a power of 2.
    On CUDA the autotuned ``tuned`` picks the config; the interpreter (which cannot time)
    runs its kernel (``tuned.fn``) with the first fitting one."""
    block_c = triton.next_power_of_2(group_channels)
    if interpreting():
        rows_per_program = fitting_configs(CONFIGS, {}, BLOCK_C=block_c)[0].kwargs["BLOCK_ROWS"]
        tuned.fn[(triton.cdiv(rows, rows_per_program),)](*args, KERNEL=kernel_size, BLOCK_ROWS=rows_per_program,
                                                         BLOCK_C=block_c)
        return
    tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)](*args, KERNEL=kernel_size, BLOCK_C=block_c)


class TritonSample(torch.autograd.Function):
    """(value (B, H, W, C), offset (B, Q, G·P·2), weight (B, Q, G·P), query_yx (B, Q, 2))
    → (B·Q·G, Cg). Saves its inputs only."""

    @staticmethod
    def forward(ctx, value: Tensor, offset: Tensor, weight: Tensor, query_yx: Tensor,
                groups: int, kernel_size: int, offset_scale: float) -> Tensor:
        check_device(value)
        value, offset, weight, query_yx = (t.contiguous() for t in (value, offset, weight, query_yx))
        ctx.save_for_backward(value, offset, weight, query_yx)
        ctx.options = (groups, kernel_size, offset_scale)
        batch, height, width, channels = value.shape
        rows, group_channels = batch * query_yx.shape[1] * groups, channels // groups
        out = value.new_empty(rows, group_channels)
        _launch(_tuned_forward, rows, group_channels, kernel_size, value, offset, weight,
                query_yx, out, rows, query_yx.shape[1], height, width, groups, group_channels, float(offset_scale))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, offset, weight, query_yx = ctx.saved_tensors
        groups, kernel_size, offset_scale = ctx.options
        batch, height, width, channels = value.shape
        rows, group_channels = grad_out.shape
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_offset = torch.empty(offset.shape, dtype=torch.float32, device=value.device)
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=value.device)
        _launch(_tuned_backward, rows, group_channels, kernel_size, value, offset, weight, query_yx,
                grad_out.contiguous(), grad_value, grad_offset, grad_weight, rows, query_yx.shape[1], height,
                width, groups, group_channels, float(offset_scale))
        return (grad_value.to(value.dtype), grad_offset.to(offset.dtype), grad_weight.to(weight.dtype),
                None, None, None, None)

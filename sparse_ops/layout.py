"""Kernel layouts: the sparse (MinkowskiEngine / official FCMAE) layout ↔ dense ``nn.Conv2d``.

Sparse kernels keep one row per kernel offset. Row ``r`` holds the offset
``(dy, dx)`` with ``r = dx * k + dy``: the first spatial coordinate (rows, y) varies fastest.
This is the order MinkowskiEngine 0.5.4 uses for 2-D kernels and the one the official
ConvNeXt-V2 sparse→dense conversion assumes.
"""
from __future__ import annotations

import math

from torch import Tensor


def kernel_side(kernel_volume: int) -> int:
    """k of a k×k kernel with ``kernel_volume`` = k·k rows (a ValueError if not square)."""
    side = math.isqrt(kernel_volume)
    if side * side != kernel_volume:
        raise ValueError(f"kernel volume {kernel_volume} is not a square k*k")
    return side


def depthwise_kernel_to_weight(kernel: Tensor) -> Tensor:
    """(k·k, C) sparse depthwise kernel → (C, 1, k, k) ``Conv2d(groups=C)`` weight."""
    side = kernel_side(kernel.shape[0])
    return kernel.t().reshape(kernel.shape[1], 1, side, side).transpose(2, 3)


def conv_kernel_to_weight(kernel: Tensor) -> Tensor:
    """(k·k, C_in, C_out) sparse kernel → (C_out, C_in, k, k) ``Conv2d`` weight."""
    side = kernel_side(kernel.shape[0])
    return kernel.permute(2, 1, 0).reshape(kernel.shape[2], kernel.shape[1], side, side).transpose(2, 3)


def sparse_to_dense_state_dict(sparse: dict[str, Tensor]) -> dict[str, Tensor]:
    """State dict of :mod:`sparse_ops.nn` layers → the keys and kernel layouts of their
    ``torch.nn`` counterparts (the official FCMAE sparse → dense conversion rules):

    * ``*.kernel`` (k·k, C) → depthwise ``*.weight`` (C, 1, k, k);
      (k·k, C_in, C_out) → ``*.weight`` (C_out, C_in, k, k)
    * the ``.ln.`` / ``.linear.`` wrapper components of ``LayerNorm`` / ``Linear`` drop out.

    Other tensors keep their shapes ((1, C) biases, GRN parameters): a model's checkpoint
    filter reshapes them to its dense layers."""
    dense: dict[str, Tensor] = {}
    for key, value in sparse.items():
        key = key.replace(".ln.", ".").replace(".linear.", ".")
        if key.endswith(".kernel"):
            key = key[: -len("kernel")] + "weight"
            value = depthwise_kernel_to_weight(value) if value.ndim == 2 else conv_kernel_to_weight(value)
        dense[key] = value
    return dense

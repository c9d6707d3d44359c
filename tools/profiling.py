"""Memory accounting for the benchmarks here and the tests (imported as ``profiling`` by the
scripts in this folder, as ``tools.profiling`` by the tests)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def saved_activation_bytes(forward: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """Run ``forward()`` and count the bytes autograd keeps for backward (saved-tensor hooks).

    Deterministic and device-independent: it is the activation memory a training step holds
    between forward and backward. Returns (bytes, forward's output).
    """
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return total, out

"""What every sparse backend implements (registered by name in :mod:`sparse_ops.backends`)."""
from __future__ import annotations

from torch import Tensor

from ..tensor import SparseImage


class Backend:
    """Spatial ops every backend implements. Kernels use the layouts of :mod:`sparse_ops.layout`."""

    name: str = ""

    def is_available(self) -> bool:
        return True

    def depthwise_conv2d(self, x: SparseImage, kernel: Tensor, bias: Tensor | None) -> SparseImage:
        """Submanifold depthwise conv: ``kernel`` (k·k, C), ``bias`` (1, C); output on x's sites."""
        raise NotImplementedError

    def strided_conv2d(self, x: SparseImage, kernel: Tensor, bias: Tensor | None,
                       stride: int) -> SparseImage:
        """Conv with kernel size == stride: ``kernel`` (s·s, C_in, C_out), ``bias`` (1, C_out).

        An output site is active when any input site in its s×s cell is active; missing
        inputs count as zero.
        """
        raise NotImplementedError

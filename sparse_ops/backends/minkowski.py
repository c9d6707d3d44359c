"""MinkowskiEngine backend: the spatial ops run on ``MinkowskiEngine`` 0.5.4 primitives.

Depthwise conv uses ``MinkowskiChannelwiseConvolution`` (kernel (k·k, C)) and the strided
conv ``MinkowskiConvolution`` (kernel (k·k, C_in, C_out)); both share their kernel layout
with :mod:`sparse_ops.layout`, so the model's own parameters are passed straight in and the
same checkpoint runs on either backend. Pointwise ops stay backend-neutral.

MinkowskiEngine keeps coordinates in hash-map order; per :class:`ActiveSites` we cache the
coordinate manager, key and the permutation between its row order and our raster order.
Install it with ``tools/install_minkowski.sh``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layout import kernel_side
from ..tensor import ActiveSites, SparseImage, flat_site_index
from .base import Backend


def _import_me():
    import MinkowskiEngine as ME  # noqa: N812  (the library's own spelling)
    return ME


class MinkowskiBackend(Backend):
    name = "minkowski"

    def __init__(self) -> None:
        self._layers: dict[tuple, nn.Module] = {}

    def is_available(self) -> bool:
        try:
            _import_me()
        except ImportError:
            return False
        return True

    def _layer(self, kind: str, in_channels: int, out_channels: int, kernel_size: int,
               stride: int) -> nn.Module:
        """A parameter-free ME layer; the caller's kernel and bias are set before each call."""
        key = (kind, in_channels, out_channels, kernel_size, stride)
        if key not in self._layers:
            ME = _import_me()
            # ME draws a random kernel that we drop: keep the global RNG stream as it was, so
            # drop path and exact resume do not depend on when layers were first built
            with torch.random.fork_rng(devices=[]):
                layer = self._new_layer(ME, kind, in_channels, out_channels, kernel_size, stride)
            del layer.kernel  # use the model's parameters instead
            self._layers[key] = layer
        return self._layers[key]

    @staticmethod
    def _new_layer(ME, kind: str, in_channels: int, out_channels: int, kernel_size: int,
                   stride: int) -> nn.Module:
        if kind == "depthwise":
            return ME.MinkowskiChannelwiseConvolution(in_channels, kernel_size, stride=stride,
                                                      bias=False, dimension=2)
        return ME.MinkowskiConvolution(in_channels, out_channels, kernel_size, stride=stride,
                                       bias=False, dimension=2)

    def _run(self, layer: nn.Module, x: SparseImage, kernel: Tensor):
        """``layer`` applied with ``kernel`` to x (features in ME's row order); an ME SparseTensor."""
        ME = _import_me()
        manager, key, me_rows = _coordinate_map(x.sites)
        inputs = ME.SparseTensor(x.features[me_rows], coordinate_map_key=key,
                                 coordinate_manager=manager)
        layer.kernel = kernel
        try:
            return layer(inputs)
        finally:
            del layer.kernel

    def depthwise_conv2d(self, x: SparseImage, kernel: Tensor, bias: Tensor | None) -> SparseImage:
        side = kernel_side(kernel.shape[0])
        layer = self._layer("depthwise", kernel.shape[1], kernel.shape[1], side, 1)
        out = self._run(layer, x, kernel)
        _, _, me_rows = _coordinate_map(x.sites)
        features = torch.empty_like(out.F).index_copy(0, me_rows, out.F)     # back to raster order
        return x.replace(features if bias is None else features + bias)

    def strided_conv2d(self, x: SparseImage, kernel: Tensor, bias: Tensor | None,
                       stride: int) -> SparseImage:
        layer = self._layer("conv", kernel.shape[1], kernel.shape[2], stride, stride)
        out = self._run(layer, x, kernel)
        out_sites, _ = x.sites.downsample(stride)
        image, row, column = out.C.long().unbind(1)           # (N_out,) each, in cells of the input grid
        flat = flat_site_index(image, row // stride, column // stride, out_sites.spatial_shape)
        rows = torch.searchsorted(out_sites.flat_index, flat)                # ME row -> our row
        features = torch.empty_like(out.F).index_copy(0, rows, out.F)
        return SparseImage(features if bias is None else features + bias, out_sites, x.backend)


def _coordinate_map(sites: ActiveSites):
    """(coordinate manager, key, me_rows) for ``sites``; ``me_rows[i]`` is our row of ME's row i."""
    cached = sites.cache.get("minkowski")
    if cached is None:
        ME = _import_me()
        coords = sites.coords.int().contiguous()           # ME wants contiguous int32 (b, y, x)
        if sites.device.type != "cpu":
            coords = coords.to(sites.device)
        tensor = ME.SparseTensor(torch.zeros(len(sites), 1, device=sites.device), coordinates=coords)
        flat = flat_site_index(*tensor.C.long().unbind(1), sites.spatial_shape)
        me_rows = torch.searchsorted(sites.flat_index, flat)
        cached = (tensor.coordinate_manager, tensor.coordinate_map_key, me_rows)
        sites.cache["minkowski"] = cached
    return cached

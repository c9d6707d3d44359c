"""DCNv3 (deformable convolution v3): the operator module, its sampling implementations
(``grid_sample`` everywhere, fused Triton kernels on CUDA) and the grids it runs on."""
from .module import DCNv3, DenseGrid, Grid, PackedGrid, layer_norm
from .sampling import DCNV3_IMPLS, DEFAULT_DCNV3_IMPL, available_impls, check_impl, dcnv3_sample

__all__ = ["DCNv3", "DenseGrid", "Grid", "PackedGrid", "layer_norm", "DCNV3_IMPLS", "DEFAULT_DCNV3_IMPL",
           "available_impls", "check_impl", "dcnv3_sample"]

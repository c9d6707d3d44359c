"""Backend-neutral sparse tensors and layers for batches of images.

>>> import sparse_ops
>>> x = sparse_ops.SparseImage.from_dense(dense, active_mask)   # (B,C,H,W), (B,H,W)
>>> y = sparse_ops.nn.DepthwiseConv2d(C, 7)(x)
>>> y.dense()                                                  # (B,C,H,W), zeros where inactive
"""
from . import functional, layout, nn
from .backends import Backend, available_backends, get_backend, list_backends, register_backend
from .tensor import ActiveSites, SparseImage

__all__ = ["ActiveSites", "SparseImage", "Backend", "available_backends", "get_backend",
           "list_backends", "register_backend", "functional", "layout", "nn"]

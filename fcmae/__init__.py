"""fcmae: FCMAE self-supervised pretraining on sparse convolution."""
from __future__ import annotations

from torch import nn

import sparse_ops

from .autoencoder import FCMAE
from .masking import check_mask_ratio
from .models import get_model_entry, list_models

__version__ = "0.1.0"


def create_model(name: str, **kwargs) -> nn.Module:
    """Dense classifier ``name`` (e.g. ``"convnextv2_atto"``); kwargs go to its constructor."""
    return get_model_entry(name).build_dense(**kwargs)


def create_encoder(name: str, backend: str = "torch", **kwargs) -> nn.Module:
    """The sparse FCMAE encoder of model ``name`` on ``backend``."""
    sparse_ops.get_backend(backend)
    return get_model_entry(name).build_encoder(backend=backend, **kwargs)


def create_fcmae(name: str, mask_ratio: float = 0.6, decoder_dim: int = 512,
                 decoder_depth: int = 1, norm_pix_loss: bool = True, backend: str = "torch",
                 **kwargs) -> FCMAE:
    """FCMAE with the sparse encoder of ``name``; kwargs go to the encoder constructor."""
    check_mask_ratio(mask_ratio)
    encoder = create_encoder(name, backend=backend, **kwargs)
    return FCMAE(encoder, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                 mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
                 in_chans=kwargs.get("in_chans", 3))


__all__ = ["FCMAE", "create_model", "create_encoder", "create_fcmae", "list_models", "__version__"]

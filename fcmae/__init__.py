"""fcmae: FCMAE self-supervised pretraining on sparse convolution.

The factories live beside what they build (``models.registry``: dense models and sparse
encoders; ``autoencoder``: FCMAE) and are re-exported here.
"""
from __future__ import annotations

from .autoencoder import FCMAE, create_fcmae
from .models import create_encoder, create_model, list_models
from .timm_hub import register_with_timm

register_with_timm()   # timm.create_model knows InternImage and RevCol from here on

__version__ = "0.1.0"

__all__ = ["FCMAE", "create_model", "create_encoder", "create_fcmae", "list_models", "__version__"]

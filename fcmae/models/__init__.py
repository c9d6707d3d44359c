"""Architectures. Importing this package registers every family (one model file each)."""
from . import convnext, convnextv2, internimage, revcol  # noqa: F401  (registers every family)
from .registry import (
    DenseModel,
    EncoderFamily,
    FamilyOption,
    FCMAEEncoder,
    ModelEntry,
    TransformersLayout,
    create_encoder,
    create_model,
    get_model_entry,
    list_families,
    list_models,
    register_family,
)

__all__ = ["DenseModel", "EncoderFamily", "FamilyOption", "FCMAEEncoder", "ModelEntry", "TransformersLayout",
           "create_encoder", "create_model", "get_model_entry", "list_families", "list_models", "register_family"]

"""Architectures. Importing this package registers every model."""
from . import convnextv2, internimage, revcol  # noqa: F401  (registers every model)
from .registry import ModelEntry, get_model_entry, list_models, register_model

__all__ = ["ModelEntry", "get_model_entry", "list_models", "register_model"]

"""One registry for every architecture: name → dense classifier and FCMAE encoder builders."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """How to build one named model.

    ``build_dense(**kw)`` returns the dense classifier used for fine-tuning;
    ``build_encoder(backend=..., **kw)`` returns the FCMAE encoder, a module called as
    ``encoder(imgs, mask) -> (B, C, h, w)`` with attributes ``patch_size`` and ``num_features``.
    """

    name: str
    build_dense: Callable[..., nn.Module]
    build_encoder: Callable[..., nn.Module]


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, build_dense: Callable[..., nn.Module],
                   build_encoder: Callable[..., nn.Module]) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = ModelEntry(name, build_dense, build_encoder)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def get_model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[name]


def masked_dense_encoder(model_class: Callable[..., nn.Module], backend: str = "torch",
                         **kwargs) -> nn.Module:
    """FCMAE encoder for architectures that run masked-dense (re-masking after every spatial
    op) rather than through ``sparse_ops``: the classifier without its head, called as
    ``encoder(imgs, mask)``. They never use a sparse backend, so any ``backend`` but the
    default ``torch`` is refused rather than silently ignored."""
    if backend != "torch":
        raise ValueError(f"{model_class.__name__} has no sparse encoder (it runs masked-dense in PyTorch); "
                         f"--backend {backend} does not apply: use --backend torch")
    return model_class(num_classes=0, **kwargs)

"""Backend registry: a backend runs the spatial ops (convolutions) on a :class:`SparseImage`.

Pointwise ops (Linear, LayerNorm, GELU, GRN, DropPath) act on ``features`` alone and are
shared by all backends. A backend subclasses :class:`Backend` and is registered by name;
model code never names a backend beyond passing the string through.
"""
from __future__ import annotations

from collections.abc import Callable

from .base import Backend

_REGISTRY: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register ``factory`` (called lazily, once) under ``name``."""
    _REGISTRY[name] = factory


def list_backends() -> list[str]:
    """All registered backend names, importable or not."""
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """Registered backends whose libraries import on this machine."""
    return [name for name in list_backends() if _instance(name).is_available()]


def _instance(name: str) -> Backend:
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a clear ``ValueError`` if unknown or not installed."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown sparse backend {name!r}; choose one of {list_backends()}")
    backend = _instance(name)
    if not backend.is_available():
        raise ValueError(f"sparse backend {name!r} is not installed here; "
                         f"available: {available_backends()}")
    return backend


def _torch_backend() -> Backend:
    from .torch_backend import TorchBackend
    return TorchBackend()


register_backend("torch", _torch_backend)


def _minkowski_backend() -> Backend:
    from .minkowski import MinkowskiBackend
    return MinkowskiBackend()


register_backend("minkowski", _minkowski_backend)

"""The kit for writing a cache layer: the contract, a base class and a wrapper base.

Applications import the built-in layers from :mod:`cachechain` (``MemoryLayer``,
``MemcachedLayer``); this package holds what a layer author needs: the
:class:`CacheLayer` contract and its optional capabilities (:class:`SupportsTimeout`,
:class:`SupportsStats`, :class:`SupportsClear`), :class:`BaseLayer` to write a layer,
:class:`LayerProxy` to wrap one, and :func:`check_ttl`. The conformance tests a layer
should pass are :class:`cachechain.testing.CacheLayerTests`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ._base import (
    BaseLayer,
    CacheLayer,
    Entry,
    SupportsClear,
    SupportsStats,
    SupportsTimeout,
    check_ttl,
)
from ._proxy import LayerProxy

__all__ = [
    "BaseLayer",
    "CacheLayer",
    "Entry",
    "LayerProxy",
    "SupportsClear",
    "SupportsStats",
    "SupportsTimeout",
    "check_ttl",
]

# Names this package exported before 0.2 (deprecated, removed in 0.3).
_MOVED = {
    "MISSING": ("cachechain.layers._base", "cachechain"),
    "MemoryLayer": ("cachechain.layers._memory", "cachechain"),
    "MemoryLayerStats": ("cachechain.layers._memory", None),
    "MemcachedLayer": ("cachechain.layers._memcached", "cachechain"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, home = _MOVED[name]
        hint = f"import it from {home}" if home else "it is internal"
        warnings.warn(
            f"cachechain.layers.{name} is deprecated since cachechain 0.2 and goes in 0.3: {hint}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

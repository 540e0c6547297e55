"""The kit for writing a cache layer: the contract, a base class and a wrapper base.

Applications import the built-in layers from :mod:`cachechain` (``MemoryLayer``,
``MemcachedLayer``); this package holds what a layer author needs: the
:class:`CacheLayer` contract and its optional capabilities (:class:`SupportsTimeout`,
:class:`SupportsStats`, :class:`SupportsClear`, and the atomic operations
:class:`SupportsAdd`, :class:`SupportsCounters`, :class:`SupportsTouch`),
:class:`BaseLayer` to write a layer, :class:`LayerProxy` to wrap one, and
:func:`check_ttl`. The conformance tests a layer
should pass are :class:`cachechain.testing.CacheLayerTests`.
"""

from __future__ import annotations

from .._compat import package_getattr
from ._base import (
    BaseLayer,
    CacheLayer,
    Entry,
    SupportsAdd,
    SupportsClear,
    SupportsCounters,
    SupportsStats,
    SupportsTimeout,
    SupportsTouch,
    check_ttl,
)
from ._proxy import LayerProxy

__all__ = [
    "BaseLayer",
    "CacheLayer",
    "Entry",
    "LayerProxy",
    "SupportsAdd",
    "SupportsClear",
    "SupportsCounters",
    "SupportsStats",
    "SupportsTimeout",
    "SupportsTouch",
    "check_ttl",
]

# Names this package exported in 0.1 (deprecated, removed in 0.3).
__getattr__ = package_getattr(
    "cachechain.layers",
    {
        "MISSING": "cachechain.layers._base",
        "MemoryLayer": "cachechain.layers._memory",
        "MemoryLayerStats": "cachechain.layers._memory",
        "MemcachedLayer": "cachechain.layers._memcached",
    },
    stubs=("base", "memcached", "memory"),
)

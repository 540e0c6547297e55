"""Cache layers: the contract and the built-in layers.

``MemcachedLayer`` is imported lazily, so that importing the in-process layer does not
load pymemcache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import MISSING, BaseLayer, CacheLayer, Entry, check_ttl
from .memory import MemoryLayer, MemoryLayerStats

if TYPE_CHECKING:
    from .memcached import MemcachedLayer

__all__ = [
    "MISSING",
    "BaseLayer",
    "CacheLayer",
    "Entry",
    "MemcachedLayer",
    "MemoryLayer",
    "MemoryLayerStats",
    "check_ttl",
]


def __getattr__(name: str) -> Any:
    if name == "MemcachedLayer":
        from .memcached import MemcachedLayer

        return MemcachedLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

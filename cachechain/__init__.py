"""cachechain: layered caching for threaded Python apps.

A :class:`Chain` puts an in-process layer (:class:`MemoryLayer`) in front of shared
remote layers (:class:`MemcachedLayer`), with backfill, single flight, circuit breakers,
timeouts, bounded write-behind and metrics. A cache failure never becomes an error for
the caller: it is a miss, counted and logged once.

    >>> from cachechain import Chain, MemoryLayer
    >>> chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")])
    >>> chain.set("greeting", "hello", ttl=60)
    True
    >>> chain.get("greeting")
    'hello'
    >>> chain.close()
    0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .chain import Chain
from .config import BreakerConfig, ChainConfig, LayerConfig, WriterConfig
from .errors import (
    CacheError,
    ChainClosedError,
    CircuitOpenError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
    PoolExhaustedError,
)
from .layers import MISSING, BaseLayer, CacheLayer, MemoryLayer
from .metrics import MetricsCollector, NoOpCollector
from .resilience import CircuitBreaker, ResilientLayer, State
from .singleflight import LoadTimeoutError
from .writer import AsyncWriter

if TYPE_CHECKING:
    from .layers.memcached import MemcachedLayer

__version__ = "0.1.0"

__all__ = [
    "MISSING",
    "AsyncWriter",
    "BaseLayer",
    "BreakerConfig",
    "CacheError",
    "CacheLayer",
    "Chain",
    "ChainClosedError",
    "ChainConfig",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "InvalidKeyError",
    "InvalidValueError",
    "LayerConfig",
    "LayerError",
    "LayerTimeoutError",
    "LayerUnavailableError",
    "LoadTimeoutError",
    "MemcachedLayer",
    "MemoryLayer",
    "MetricsCollector",
    "NoOpCollector",
    "PoolExhaustedError",
    "ResilientLayer",
    "State",
    "WriterConfig",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "MemcachedLayer":
        from .layers.memcached import MemcachedLayer

        return MemcachedLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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

The public surface, one import path per name:

- :mod:`cachechain` (this package): what applications write: the chain, the built-in
  layers, configs, codecs, collectors, errors and the settings loaders.
- :mod:`cachechain.layers`: the kit for writing a layer (the contract, a base class, a
  forwarding proxy, optional capabilities).
- :mod:`cachechain.metrics`: the kit for writing a collector (the contract, the metrics
  catalogue, snapshot types).
- :mod:`cachechain.exporters`: the pluggy hooks an exporter plugin implements.
- :mod:`cachechain.testing`: fakes and conformance suites for tests.
- :mod:`cachechain.contrib.django`, :mod:`cachechain.contrib.flask`: framework backends.

Everything else (modules whose names start with ``_``) is internal.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._breaker import CircuitBreaker, CircuitState
from ._chain import Chain
from ._codecs import Codec, JsonCodec, SignedPickleCodec
from ._config import BreakerConfig, ChainConfig, LayerConfig, WriterConfig
from ._errors import (
    CacheError,
    ChainClosedError,
    CircuitOpenError,
    ConfigError,
    CorruptValueError,
    InvalidKeyError,
    InvalidValueError,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
    PoolExhaustedError,
)
from ._settings import chain_config_from_file, chain_config_from_mapping
from ._singleflight import LoadTimeoutError
from .layers._base import MISSING
from .layers._memory import MemoryLayer
from .metrics._fanout import FanoutCollector
from .metrics._memory import MemoryCollector

if TYPE_CHECKING:
    from .layers._memcached import MemcachedLayer
    from .metrics._prometheus import PrometheusCollector, serve_metrics

__version__ = "0.1.0"

__all__ = [
    "MISSING",
    "BreakerConfig",
    "CacheError",
    "Chain",
    "ChainClosedError",
    "ChainConfig",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Codec",
    "ConfigError",
    "CorruptValueError",
    "FanoutCollector",
    "InvalidKeyError",
    "InvalidValueError",
    "JsonCodec",
    "LayerConfig",
    "LayerError",
    "LayerTimeoutError",
    "LayerUnavailableError",
    "LoadTimeoutError",
    "MemcachedLayer",
    "MemoryCollector",
    "MemoryLayer",
    "PoolExhaustedError",
    "PrometheusCollector",
    "SignedPickleCodec",
    "WriterConfig",
    "__version__",
    "chain_config_from_file",
    "chain_config_from_mapping",
    "serve_metrics",
]

# Loaded on first use: pymemcache and prometheus-client are not imported with cachechain.
_LAZY = {
    "MemcachedLayer": "cachechain.layers._memcached",
    "PrometheusCollector": "cachechain.metrics._prometheus",
    "serve_metrics": "cachechain.metrics._prometheus",
}

# Names that were top-level before 0.2: (module, attribute, where to import it now).
_DEPRECATED = {
    "AsyncWriter": ("cachechain._writer", "AsyncWriter", "it is internal"),
    "ResilientLayer": ("cachechain._resilience", "ResilientLayer", "it is internal"),
    "State": ("cachechain._breaker", "CircuitState", "use cachechain.CircuitState"),
    "BaseLayer": ("cachechain.layers._base", "BaseLayer", "import it from cachechain.layers"),
    "CacheLayer": ("cachechain.layers._base", "CacheLayer", "import it from cachechain.layers"),
    "MetricsCollector": (
        "cachechain.metrics._base",
        "MetricsCollector",
        "import it from cachechain.metrics",
    ),
    "NoOpCollector": (
        "cachechain.metrics._base",
        "NoOpCollector",
        "import it from cachechain.metrics",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _DEPRECATED:
        module, attr, hint = _DEPRECATED[name]
        warnings.warn(
            f"cachechain.{name} is deprecated since cachechain 0.2 and goes in 0.3: {hint}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

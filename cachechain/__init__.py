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

from typing import TYPE_CHECKING

from ._breaker import CircuitBreaker, CircuitState
from ._chain import Chain
from ._chain_atomic import UnconfirmedError
from ._codecs import Codec, JsonCodec, SignedPickleCodec, TaggedJsonCodec
from ._compat import package_getattr
from ._config import (
    BreakerConfig,
    ChainConfig,
    CoherenceConfig,
    LayerConfig,
    LeaseConfig,
    LoadConfig,
    WriterConfig,
)
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
    WriteInDoubtError,
)
from ._health import ChainHealth, LayerFailure, LayerHealth
from ._settings import chain_config_from_file, chain_config_from_mapping
from ._singleflight import LoadTimeoutError, ReentrantLoadError
from .layers._base import MISSING
from .layers._memory import MemoryLayer
from .metrics._fanout import FanoutCollector
from .metrics._memory import MemoryCollector

if TYPE_CHECKING:
    from .layers._memcached import MemcachedLayer
    from .metrics._prometheus import PrometheusCollector as PrometheusCollector
    from .metrics._prometheus import multiprocess_registry as multiprocess_registry
    from .metrics._prometheus import serve_metrics as serve_metrics

__version__ = "0.2.0.dev0"

# Public, but loaded on first use and left out of ``__all__`` so that
# ``from cachechain import *`` does not need prometheus-client (the ``prometheus`` extra).
_LAZY_EXPORTS = ("PrometheusCollector", "multiprocess_registry", "serve_metrics")

__all__ = [
    "MISSING",
    "BreakerConfig",
    "CacheError",
    "Chain",
    "ChainClosedError",
    "ChainConfig",
    "ChainHealth",
    "CoherenceConfig",
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
    "LayerFailure",
    "LayerHealth",
    "LayerTimeoutError",
    "LayerUnavailableError",
    "LeaseConfig",
    "LoadConfig",
    "LoadTimeoutError",
    "ReentrantLoadError",
    "MemcachedLayer",
    "MemoryCollector",
    "MemoryLayer",
    "PoolExhaustedError",
    "WriteInDoubtError",
    "SignedPickleCodec",
    "TaggedJsonCodec",
    "UnconfirmedError",
    "WriterConfig",
    "__version__",
    "chain_config_from_file",
    "chain_config_from_mapping",
]

__getattr__ = package_getattr(
    "cachechain",
    # Names that were top-level in 0.1.
    {
        "AsyncWriter": "cachechain._writer",
        "ResilientLayer": "cachechain._resilience",
        "State": "cachechain._breaker:CircuitState",
        "BaseLayer": "cachechain.layers._base",
        "CacheLayer": "cachechain.layers._base",
        "MetricsCollector": "cachechain.metrics._base",
        "NoOpCollector": "cachechain.metrics._base",
    },
    # Loaded on first use: pymemcache and prometheus-client are not imported with
    # cachechain.
    lazy={
        "MemcachedLayer": "cachechain.layers._memcached",
        "PrometheusCollector": "cachechain.metrics._prometheus",
        "serve_metrics": "cachechain.metrics._prometheus",
        "multiprocess_registry": "cachechain.metrics._prometheus",
    },
    stubs=(
        "breaker",
        "chain",
        "cli",
        "codecs",
        "config",
        "demo",
        "errors",
        "resilience",
        "settings",
        "singleflight",
        "writer",
    ),
)

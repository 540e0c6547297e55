"""The kit for writing a metrics collector: the contract and the snapshot types.

Applications import the built-in collectors from :mod:`cachechain` (``MemoryCollector``,
``FanoutCollector``, ``PrometheusCollector``); this package holds what a collector
author needs.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ._base import CollectorGuard, MetricsCollector, NoOpCollector, adapt, never_raises
from ._types import CacheMetrics, ChainMetrics, LatencyStats, MetricsSnapshot

__all__ = [
    "CacheMetrics",
    "ChainMetrics",
    "CollectorGuard",
    "LatencyStats",
    "MetricsCollector",
    "MetricsSnapshot",
    "NoOpCollector",
    "adapt",
    "never_raises",
]

# Names this package exported before 0.2 (deprecated, removed in 0.3).
_MOVED = {
    "MemoryCollector": "cachechain.metrics._memory",
    "FanoutCollector": "cachechain.metrics._fanout",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"cachechain.metrics.{name} is deprecated since cachechain 0.2 and goes in 0.3: "
            "import it from cachechain",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

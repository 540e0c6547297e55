"""Metrics: the collector contract and the built-in collectors.

``MetricsCollector``, ``NoOpCollector``, ``MemoryCollector`` and ``FanoutCollector``
are importable from here; the Prometheus collector is in
``cachechain.metrics.prometheus`` (it needs prometheus-client, so it is not imported
here).
"""

from __future__ import annotations

from .base import CollectorGuard, MetricsCollector, NoOpCollector, adapt, never_raises
from .fanout import FanoutCollector
from .memory import MemoryCollector
from .types import CacheMetrics, ChainMetrics, LatencyStats, MetricsSnapshot

__all__ = [
    "CacheMetrics",
    "ChainMetrics",
    "CollectorGuard",
    "FanoutCollector",
    "LatencyStats",
    "MemoryCollector",
    "MetricsCollector",
    "MetricsSnapshot",
    "NoOpCollector",
    "adapt",
    "never_raises",
]

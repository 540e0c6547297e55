"""Metrics: the collector contract and the built-in collectors.

``MetricsCollector`` and ``NoOpCollector`` live here; the in-memory collector is in
``cachechain.metrics.memory`` and the Prometheus one in ``cachechain.metrics.prometheus``
(which needs prometheus-client).
"""

from __future__ import annotations

from .base import CollectorGuard, MetricsCollector, NoOpCollector, adapt

__all__ = ["CollectorGuard", "MetricsCollector", "NoOpCollector", "adapt"]

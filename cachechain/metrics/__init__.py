"""The kit for writing a metrics collector: the contract, the catalogue and the
snapshot types.

Applications import the built-in collectors from :mod:`cachechain` (``MemoryCollector``,
``FanoutCollector``, ``PrometheusCollector``); this package holds what a collector
author needs: :class:`MetricsCollector` (the ``record_*`` methods), and the catalogue
those methods feed, :data:`RECORDS` and :data:`METRICS` (every metric's name, kind,
labels, help, unit, buckets and the calls that feed it), from which an exporter can
derive its names and series instead of restating them.
"""

from __future__ import annotations

from .._compat import package_getattr
from .._fork import at_fork
from .._fork import track as track_fork
from .._logonce import LogOnce
from ._base import (
    DEFAULT_SAMPLE_HITS,
    CollectorGuard,
    HitSampler,
    MetricsCollector,
    NoOpCollector,
    adapt,
    forward_records,
    never_raises,
    stand_in,
)
from ._catalogue import (
    BACKFILL_SKIP_REASONS,
    BACKGROUND_OUTCOMES,
    CIRCUIT_STATES,
    COUNTER,
    DEFAULT_BUCKETS,
    DROP_REASONS,
    FAIL_SAFE_REASONS,
    GAUGE,
    HISTOGRAM,
    HIT_MISS,
    LEASE_OUTCOMES,
    LOST_REASONS,
    METRICS,
    OPERATIONS,
    RECORD_METHODS,
    RECORDS,
    RESULTS,
    SEED_METHODS,
    Arg,
    Feed,
    Field,
    Metric,
    Param,
    Record,
    feeds_of,
    find_metric,
    find_record,
    series_params,
)
from ._hooks import RefreshHooks
from ._types import CacheMetrics, ChainMetrics, LatencyStats, MetricsSnapshot

__all__ = [
    "BACKFILL_SKIP_REASONS",
    "CIRCUIT_STATES",
    "COUNTER",
    "DEFAULT_BUCKETS",
    "DEFAULT_SAMPLE_HITS",
    "DROP_REASONS",
    "BACKGROUND_OUTCOMES",
    "FAIL_SAFE_REASONS",
    "LEASE_OUTCOMES",
    "LOST_REASONS",
    "GAUGE",
    "HISTOGRAM",
    "HIT_MISS",
    "METRICS",
    "OPERATIONS",
    "RECORDS",
    "RECORD_METHODS",
    "RESULTS",
    "SEED_METHODS",
    "Arg",
    "CacheMetrics",
    "ChainMetrics",
    "CollectorGuard",
    "Feed",
    "Field",
    "HitSampler",
    "LatencyStats",
    "LogOnce",
    "Metric",
    "MetricsCollector",
    "MetricsSnapshot",
    "NoOpCollector",
    "Param",
    "Record",
    "RefreshHooks",
    "adapt",
    "at_fork",
    "feeds_of",
    "find_metric",
    "find_record",
    "forward_records",
    "never_raises",
    "series_params",
    "stand_in",
    "track_fork",
]

# Names this package exported in 0.1 (deprecated, removed in 0.3).
__getattr__ = package_getattr(
    "cachechain.metrics",
    {
        "MemoryCollector": "cachechain.metrics._memory",
        "FanoutCollector": "cachechain.metrics._fanout",
    },
    stubs=("base", "fanout", "memory", "prometheus", "types"),
)

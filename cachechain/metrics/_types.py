"""The seed's metric types, and the bounded latency histogram behind them.

:class:`LatencyStats` and :class:`CacheMetrics` are plain frozen snapshots. They are
produced by :class:`LatencyHistogram`, which keeps counts in fixed log-spaced buckets
(1 microsecond to about 100 seconds, 16 buckets per decade): memory stays constant
whatever the traffic, and percentiles are accurate to within one bucket (about 15%).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "BUCKET_BOUNDS",
    "CacheMetrics",
    "ChainMetrics",
    "LatencyHistogram",
    "LatencyStats",
    "MetricsSnapshot",
]

#: Upper bounds (seconds) of the latency buckets: 1 us to 100 s, 16 per decade.
BUCKET_BOUNDS: tuple[float, ...] = tuple(10 ** (-6 + i / 16) for i in range(8 * 16 + 1))


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles of one operation, in seconds; all 0.0 when ``count`` is 0."""

    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    count: int = 0


@dataclass(frozen=True)
class CacheMetrics:
    """Everything recorded about one layer (the seed's ``CacheMetrics``).

    Counts since creation or the last reset: ``sets`` and ``deletes`` count every
    synchronous call (failed ones included; their failures are in ``errors``),
    ``async_writes`` every write the layer's async writer made (``failed_writes`` of
    them failed). ``queue_depth``, ``queue_capacity``, ``entries`` and
    ``circuit_state`` (0 closed, 1 open, 2 half-open) are the latest values reported;
    ``circuit_opens`` counts transitions to open. ``repairs_pending`` (keys whose
    repair delete waits for a retry), ``nodes_down`` and ``connections`` (a memcached
    layer's servers marked down and open connections) are the latest values polled;
    ``backfills_skipped`` counts backfills into the layer not made (by reason in
    ``backfills_skipped_by_reason``), ``pool_exhausted`` and ``corrupt_values`` a
    memcached layer's calls refused for want of a free connection and undecodable
    values read. Latencies are in seconds.
    """

    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    queue_capacity: int = 0
    dropped_writes: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    async_writes: int = 0
    failed_writes: int = 0
    circuit_state: int = 0
    circuit_opens: int = 0
    circuit_rejected: int = 0
    evictions: int = 0
    entries: int = 0
    repairs_pending: int = 0
    backfills_skipped: int = 0
    backfills_skipped_by_reason: dict[str, int] = field(default_factory=dict)
    nodes_down: int = 0
    connections: int = 0
    pool_exhausted: int = 0
    corrupt_values: int = 0
    get_latency: LatencyStats = field(default_factory=LatencyStats)
    set_latency: LatencyStats = field(default_factory=LatencyStats)

    @property
    def hit_ratio(self) -> float:
        """hits / (hits + misses), 0.0 before any get."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class ChainMetrics:
    """Chain-level figures: one count per logical get, by the layer that served it.

    ``hits_by_layer`` maps a layer's position (0 = the first) to the gets it served;
    ``latency`` covers every logical get, ``load_latency`` every loader call.
    ``invalidations_published`` and ``invalidations_applied`` count the keys this
    process told the others it changed, and those it dropped for them;
    ``invalidation_lag`` is the seconds from another process's publication to its
    application here; ``coherence_lost`` counts the times every in-process entry was
    dropped because track was lost (by reason in ``coherence_lost_by_reason``);
    ``fail_safe_served`` counts the expired copies ``get_or_load`` served instead of a
    load (by reason in ``fail_safe_by_reason``), ``background_loads`` the loads run on
    background threads (by outcome in ``background_loads_by_outcome``),
    ``eager_refreshes`` the reloads started by eager refresh;
    ``leases`` counts the leases ``get_or_load`` asked of the shared layer (by outcome
    in ``leases_by_outcome``), ``lease_wait_latency`` its waits for other processes.
    """

    total_hits: int = 0
    total_misses: int = 0
    hits_by_layer: dict[int, int] = field(default_factory=dict)
    loads: int = 0
    load_failures: int = 0
    singleflight_shared: int = 0
    latency: LatencyStats = field(default_factory=LatencyStats)
    load_latency: LatencyStats = field(default_factory=LatencyStats)
    invalidations_published: int = 0
    invalidations_applied: int = 0
    invalidation_lag: LatencyStats = field(default_factory=LatencyStats)
    coherence_lost: int = 0
    coherence_lost_by_reason: dict[str, int] = field(default_factory=dict)
    fail_safe_served: int = 0
    fail_safe_by_reason: dict[str, int] = field(default_factory=dict)
    background_loads: int = 0
    background_loads_by_outcome: dict[str, int] = field(default_factory=dict)
    eager_refreshes: int = 0
    leases: int = 0
    leases_by_outcome: dict[str, int] = field(default_factory=dict)
    lease_wait_latency: LatencyStats = field(default_factory=LatencyStats)

    @property
    def hit_ratio(self) -> float:
        """total_hits / (total_hits + total_misses), 0.0 before any get."""
        total = self.total_hits + self.total_misses
        return self.total_hits / total if total else 0.0


@dataclass(frozen=True)
class MetricsSnapshot:
    """A copy of a collector's figures: per layer (by name) and for the chain."""

    layer_metrics: dict[str, CacheMetrics]
    chain_metrics: ChainMetrics


class LatencyHistogram:
    """Counts durations (seconds) in fixed buckets: ``bounds`` are the buckets' upper
    bounds, ascending (default :data:`BUCKET_BOUNDS`), plus one bucket above the last.
    Memory is constant whatever is counted. Not thread-safe: the owner serializes
    access (the collectors keep one per thread and merge them on read)."""

    __slots__ = ("bounds", "count", "counts", "max", "total")

    def __init__(self, bounds: Sequence[float] = BUCKET_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    @classmethod
    def from_counts(
        cls,
        counts: Sequence[int],
        total: float,
        max_seen: float,
        bounds: Sequence[float] = BUCKET_BOUNDS,
    ) -> LatencyHistogram:
        """Build a histogram from per-bucket counts (``len(bounds) + 1`` of them, not
        cumulative), the sum of the durations and the largest one (seconds). Raises
        ``ValueError`` when the number of counts does not match ``bounds``."""
        hist = cls(bounds)
        if len(counts) != len(hist.counts):
            raise ValueError(f"expected {len(hist.counts)} bucket counts, got {len(counts)}")
        hist.counts = [int(n) for n in counts]
        hist.count = sum(hist.counts)
        hist.total = float(total)
        hist.max = float(max_seen)
        return hist

    def add(self, seconds: float) -> None:
        """Count one duration (seconds)."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def quantile(self, q: float) -> float:
        """Return the upper bound of the bucket holding quantile ``q`` (0 to 1),
        never more than the largest duration seen; 0.0 when nothing was counted."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        bounds = self.bounds
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                bound = bounds[index] if index < len(bounds) else self.max
                return min(bound, self.max)
        return self.max  # pragma: no cover - the loop always reaches the last count

    def stats(self) -> LatencyStats:
        """Return the p50, p95, p99, max and count."""
        return LatencyStats(
            p50=self.quantile(0.50),
            p95=self.quantile(0.95),
            p99=self.quantile(0.99),
            max=self.max,
            count=self.count,
        )

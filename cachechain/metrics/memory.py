"""MemoryCollector: keeps every metric in memory, for tests, demos and dashboards.

Thread-safe (one lock), bounded memory whatever the traffic (counters and fixed
latency buckets per layer; layer names come from configuration, never from keys), and
:meth:`MemoryCollector.snapshot` returns a consistent copy to assert on.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from .base import MetricsCollector
from .types import (
    CacheMetrics,
    ChainMetrics,
    LatencyHistogram,
    MetricsSnapshot,
)

__all__ = ["MemoryCollector"]


@dataclass
class _Layer:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    queue_depth: int = 0
    queue_capacity: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    async_writes: int = 0
    failed_writes: int = 0
    circuit_state: int = 0
    circuit_opens: int = 0
    circuit_rejected: int = 0
    evictions: int = 0
    entries: int = 0
    get_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    set_latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def freeze(self) -> CacheMetrics:
        return CacheMetrics(
            hits=self.hits,
            misses=self.misses,
            sets=self.sets,
            deletes=self.deletes,
            errors=sum(self.errors.values()),
            errors_by_type=dict(self.errors),
            queue_depth=self.queue_depth,
            queue_capacity=self.queue_capacity,
            dropped_writes=sum(self.dropped.values()),
            dropped_by_reason=dict(self.dropped),
            async_writes=self.async_writes,
            failed_writes=self.failed_writes,
            circuit_state=self.circuit_state,
            circuit_opens=self.circuit_opens,
            circuit_rejected=self.circuit_rejected,
            evictions=self.evictions,
            entries=self.entries,
            get_latency=self.get_latency.stats(),
            set_latency=self.set_latency.stats(),
        )


class _Chain:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.hits_by_layer: Counter[int] = Counter()
        self.loads = 0
        self.load_failures = 0
        self.shared = 0
        self.latency = LatencyHistogram()
        self.load_latency = LatencyHistogram()


class MemoryCollector(MetricsCollector):
    """Collects every metric in memory; :meth:`snapshot` for a copy, :meth:`reset` to
    start over. One collector may serve several chains: their figures add up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[str, _Layer] = {}
        self._chain = _Chain()

    def _layer(self, name: str) -> _Layer:
        layer = self._layers.get(name)
        if layer is None:
            layer = self._layers[name] = _Layer()
        return layer

    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        """Count a hit or a miss of ``layer`` and its latency (seconds)."""
        with self._lock:
            lm = self._layers.get(layer) or self._layer(layer)
            if hit:
                lm.hits += 1
            else:
                lm.misses += 1
            lm.get_latency.add(duration)

    def record_set(self, layer: str, success: bool, duration: float) -> None:
        """Count a set (errors are counted by :meth:`record_error`) and its latency."""
        with self._lock:
            lm = self._layer(layer)
            lm.sets += 1
            lm.set_latency.add(duration)

    def record_delete(self, layer: str, success: bool, duration: float) -> None:
        """Count a delete."""
        with self._lock:
            self._layer(layer).deletes += 1

    def record_circuit_state(self, layer: str, state: int) -> None:
        """Keep the breaker state; count transitions to open (1)."""
        with self._lock:
            lm = self._layer(layer)
            if state == 1 and lm.circuit_state != 1:
                lm.circuit_opens += 1
            lm.circuit_state = int(state)

    def record_queue_depth(self, layer: str, depth: int) -> None:
        """Keep the latest queue depth."""
        with self._lock:
            self._layer(layer).queue_depth = depth

    def record_queue_capacity(self, layer: str, capacity: int) -> None:
        """Keep the queue capacity."""
        with self._lock:
            self._layer(layer).queue_capacity = capacity

    def record_write_dropped(self, layer: str, reason: str = "queue_full") -> None:
        """Count a dropped write by reason."""
        with self._lock:
            self._layer(layer).dropped[reason] += 1

    def record_async_write(self, layer: str, success: bool, duration: float) -> None:
        """Count an async write and whether it failed."""
        with self._lock:
            lm = self._layer(layer)
            lm.async_writes += 1
            if not success:
                lm.failed_writes += 1

    def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None:
        """Count one logical get of the chain."""
        with self._lock:
            ch = self._chain
            if hit:
                ch.hits += 1
                ch.hits_by_layer[layer_index] += 1
            else:
                ch.misses += 1
            ch.latency.add(total_duration)

    def record_error(self, layer: str, operation: str, error_type: str) -> None:
        """Count a layer error by type."""
        with self._lock:
            self._layer(layer).errors[error_type] += 1

    def record_circuit_rejected(self, layer: str) -> None:
        """Count a call refused by an open breaker."""
        with self._lock:
            self._layer(layer).circuit_rejected += 1

    def record_load(self, success: bool, duration: float) -> None:
        """Count a loader call."""
        with self._lock:
            ch = self._chain
            ch.loads += 1
            if not success:
                ch.load_failures += 1
            ch.load_latency.add(duration)

    def record_singleflight_shared(self) -> None:
        """Count a caller that joined a load in flight."""
        with self._lock:
            self._chain.shared += 1

    def record_evictions(self, layer: str, count: int) -> None:
        """Add evictions of an in-process layer."""
        with self._lock:
            self._layer(layer).evictions += count

    def record_entries(self, layer: str, entries: int) -> None:
        """Keep the entry count of an in-process layer."""
        with self._lock:
            self._layer(layer).entries = entries

    def snapshot(self) -> MetricsSnapshot:
        """Return a consistent copy of every figure."""
        with self._lock:
            ch = self._chain
            return MetricsSnapshot(
                layer_metrics={name: lm.freeze() for name, lm in self._layers.items()},
                chain_metrics=ChainMetrics(
                    total_hits=ch.hits,
                    total_misses=ch.misses,
                    hits_by_layer=dict(ch.hits_by_layer),
                    loads=ch.loads,
                    load_failures=ch.load_failures,
                    singleflight_shared=ch.shared,
                    latency=ch.latency.stats(),
                    load_latency=ch.load_latency.stats(),
                ),
            )

    def reset(self) -> None:
        """Forget every figure."""
        with self._lock:
            self._layers = {}
            self._chain = _Chain()

"""What a chain reports about its layers: failures, writer events, polled figures.

:class:`Reporter` counts a layer failure by error type in the chain's metrics collector
and logs the first one of each (layer, operation, error type) at WARNING, the rest at
DEBUG (again at WARNING once the layer's breaker closes). :func:`watch` connects a
collector to a chain's writers and breakers, and :class:`PolledFigures` reports the
values collectors poll rather than receive (queue depths, entries, evictions) from the
refresh hook it registers.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from . import _fork
from ._breaker import CircuitBreaker, CircuitState
from ._errors import CircuitOpenError, classify_error
from ._logonce import LogOnce
from ._writer import AsyncWriter
from .layers._base import CacheLayer, SupportsStats
from .metrics._base import CollectorGuard

__all__ = [
    "PolledFigures",
    "Reporter",
    "Source",
    "Watched",
    "WriterMetrics",
    "record_batch",
    "watch",
]

log = logging.getLogger("cachechain")

#: What a layer of a chain gives its collector: ``(layer name, its async writer or
#: None, its ``stats`` method or None)``.
Source = tuple[str, "AsyncWriter | None", "Callable[[], Any] | None"]


class Watched(Protocol):
    """What :func:`watch` reads of each layer of a chain (a tier)."""

    name: str
    layer: CacheLayer
    breaker: CircuitBreaker | None
    writer: AsyncWriter | None


class Reporter:
    """Counts and logs what goes wrong in the layers of one chain (``m``: the chain's
    collector guard, or None for no metrics). Never raises."""

    __slots__ = ("__weakref__", "_log", "m")

    def __init__(self, m: CollectorGuard | None) -> None:
        self.m = m
        self._log = LogOnce(log)
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: warn again about every kind of failure."""
        self._log = LogOnce(log)

    def failed(self, layer: str, operation: str, exc: Exception) -> None:
        """Layer ``layer`` raised ``exc`` on ``operation``: count it (a refusal of an
        open breaker as such) and log the first of its kind."""
        m = self.m
        if isinstance(exc, CircuitOpenError):
            if m is not None:
                m.record_circuit_rejected(layer)
            return
        kind = classify_error(exc)
        if m is not None:
            m.record_error(layer, operation, kind)
        if self._log.first((layer, operation, kind)):
            log.warning(
                "cache layer %r failed on %s (%s: %s); skipped as a miss. Further %s "
                "errors of this layer are counted, logged at DEBUG",
                layer,
                operation,
                type(exc).__name__,
                exc,
                kind,
            )
        else:
            log.debug("cache layer %r failed on %s: %r", layer, operation, exc)

    def circuit_changed(self, layer: str, old: CircuitState, new: CircuitState) -> None:
        """A breaker listener: log the change and report the new state; a layer whose
        breaker closed gets its failures logged at WARNING again."""
        if new is CircuitState.CLOSED:
            self._log.forget(lambda seen: isinstance(seen, tuple) and seen[0] == layer)
        log.warning("circuit breaker of cache layer %r: %s -> %s", layer, old.name, new.name)
        if self.m is not None:
            self.m.record_circuit_state(layer, int(new))


class WriterMetrics:
    """Forwards one async writer's events to the chain's metrics collector."""

    __slots__ = ("layer", "m")

    def __init__(self, m: CollectorGuard, layer: str) -> None:
        self.m = m
        self.layer = layer

    def dropped(self, reason: str, count: int) -> None:
        """``count`` writes were dropped for ``reason``: one event each."""
        for _ in range(count):
            self.m.record_write_dropped(self.layer, reason)

    def written(self, success: bool, duration: float) -> None:
        """One queued write was made (``success``) in ``duration`` seconds."""
        self.m.record_async_write(self.layer, success, duration)

    def depth(self, depth: int) -> None:
        """The writer's queue now holds ``depth`` operations."""
        self.m.record_queue_depth(self.layer, depth)


class PolledFigures:
    """The figures a chain's collector polls: the queue depth of each writer (repairs
    waiting included), and the ``entries`` and ``evictions`` of layers whose ``stats()``
    has them (``int`` attributes). Evictions are reported as increments, each once,
    however many refreshes run at once. Thread-safe."""

    __slots__ = ("__weakref__", "_lock", "_m", "_seen", "_sources", "stopped")

    def __init__(self, m: CollectorGuard, sources: Sequence[Source]) -> None:
        self._m = m
        self._sources = tuple(sources)
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()  # refreshes may run in several threads
        #: Set when the chain closes: the refresh hook then unregisters itself.
        self.stopped = False
        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Report the current figures to the collector."""
        m = self._m
        for name, writer, stats in self._sources:
            if writer is not None:
                queued = writer.stats()
                m.record_queue_depth(name, queued.depth + queued.repairing)
            figures = stats() if stats is not None else None
            entries = getattr(figures, "entries", None)
            evictions = getattr(figures, "evictions", None)
            if isinstance(entries, int):
                m.record_entries(name, entries)
            if isinstance(evictions, int):
                self._evicted(name, evictions)

    def _evicted(self, name: str, evictions: int) -> None:
        with self._lock:
            seen = self._seen.get(name, 0)
            self._seen[name] = max(seen, evictions)
        if evictions > seen:
            self._m.record_evictions(name, evictions - seen)

    def hook(self) -> Callable[[], bool]:
        """A refresh hook for the collector that does not keep these figures (nor the
        chain's layers) alive: collectors outlive chains. It returns False, which makes
        the collector drop it, once the chain is closed or gone."""
        ref = weakref.ref(self)

        def refresh() -> bool:
            alive = ref()
            if alive is None or alive.stopped:
                return False
            alive.refresh()
            return True

        return refresh


def record_batch(
    m: CollectorGuard, keys: Iterable[str], served: Mapping[str, int], duration: float
) -> None:
    """Record a batch read of ``keys`` that took ``duration`` seconds in all, as one
    chain get of each key, a hit of the layer ``served`` gives (by index) or a miss."""
    for key in keys:
        index = served.get(key, -1)
        m.record_chain_get(index >= 0, index, duration)


def watch(m: CollectorGuard, tiers: Sequence[Watched]) -> PolledFigures:
    """Connect a chain's collector to its ``tiers``: report each writer's capacity and
    observe its events, report each breaker's state (by the name of the layer it
    guards), and register the refresh hook of the returned :class:`PolledFigures` (a
    collector that cannot take it is counted as failed)."""
    for tier in tiers:
        if tier.writer is not None:
            m.record_queue_capacity(tier.name, tier.writer.stats().capacity)
            tier.writer.observer = WriterMetrics(m, tier.name)
    for tier in tiers:
        if tier.breaker is not None:
            m.record_circuit_state(tier.name, int(tier.breaker.state))
    figures = PolledFigures(m, [(t.name, t.writer, _stats_of(t.layer)) for t in tiers])
    add_hook = getattr(m.collector, "add_refresh_hook", None)
    if add_hook is not None:
        try:
            add_hook(figures.hook())
        except Exception as exc:  # the chain works without polled figures
            m.failed(exc)
    return figures


def _stats_of(layer: CacheLayer) -> Callable[[], Any] | None:
    """The layer's ``stats`` method, if it reports figures."""
    return layer.stats if isinstance(layer, SupportsStats) else None

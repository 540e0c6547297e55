"""What a chain reports about its layers: failures, writer events, polled figures.

:class:`Reporter` counts a layer failure by error type in the chain's metrics collector
and logs the first one of each (layer, operation, error type) at WARNING, the rest at
DEBUG (again at WARNING once the layer's breaker closes), and keeps each layer's last
failure for :meth:`Chain.health`. :func:`watch` connects a collector to a chain's
writers and breakers and reports the chain's info series, and :class:`PolledFigures`
reports the values collectors poll rather than receive (queue depths, repairs pending,
entries, evictions, a memcached layer's connections and nodes down) from the refresh
hook it registers. :func:`hit_sampler` asks the collector to count first-layer hits
itself (:class:`~cachechain.metrics.HitSampler`).
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from . import _fork
from ._breaker import CircuitBreaker, CircuitState
from ._errors import CircuitOpenError, classify_error
from ._logonce import LogOnce
from ._resilience import unwrapped
from ._writer import AsyncWriter
from .layers._base import CacheLayer, SupportsStats
from .layers._proxy import LayerProxy
from .metrics._base import CollectorGuard

__all__ = [
    "LastError",
    "PolledFigures",
    "Reporter",
    "Sampling",
    "Source",
    "Watched",
    "WriterMetrics",
    "hit_sampler",
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


#: A layer's last failure: ``(exception type name, message, time.time() of it)``.
LastError = tuple[str, str, float]

#: The longest exception message kept as a layer's last error (characters).
MAX_MESSAGE = 200


class Reporter:
    """Counts and logs what goes wrong in the layers of one chain (``m``: the chain's
    collector guard, or None for no metrics), and keeps each layer's last failure
    (:attr:`last_errors`; refusals of an open breaker are not failures). Never raises."""

    __slots__ = ("__weakref__", "_log", "last_errors", "m")

    def __init__(self, m: CollectorGuard | None) -> None:
        self.m = m
        self._log = LogOnce(log)
        #: The last failure of each layer that failed, by layer name.
        self.last_errors: dict[str, LastError] = {}
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
        self.last_errors[layer] = (type(exc).__name__, str(exc)[:MAX_MESSAGE], time.time())
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


#: Counters of a layer's ``stats()`` reported as increments: attribute, record method.
_POLLED_COUNTS = (
    ("evictions", "record_evictions"),
    ("pool_exhausted", "record_pool_exhausted"),
    ("corrupt_values", "record_corrupt_values"),
)
#: Gauges of a layer's ``stats()``: attribute, record method.
_POLLED_GAUGES = (
    ("entries", "record_entries"),
    ("nodes_down", "record_nodes_down"),
    ("connections_open", "record_connections"),
)


class PolledFigures:
    """The figures a chain's collector polls: the queue depth and the repairs pending of
    each writer (apart), and the figures of layers whose ``stats()`` (of the layer
    itself, unwrapped from its breaker) has them as ``int`` attributes: ``entries``,
    ``nodes_down`` and ``connections_open`` as gauges, ``evictions``,
    ``pool_exhausted`` and ``corrupt_values`` as increments, each reported once however
    many refreshes run at once. Thread-safe."""

    __slots__ = ("__weakref__", "_lock", "_m", "_seen", "_sources", "stopped")

    def __init__(self, m: CollectorGuard, sources: Sequence[Source]) -> None:
        self._m = m
        self._sources = tuple(sources)
        self._seen: dict[tuple[str, str], int] = {}
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
                m.record_queue_depth(name, queued.depth)
                m.record_repairs_pending(name, queued.repairing)
            if stats is None:
                continue
            figures = stats()
            for attr, method in _POLLED_GAUGES:
                value = getattr(figures, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    getattr(m, method)(name, value)
            for attr, method in _POLLED_COUNTS:
                value = getattr(figures, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    self._increment(name, attr, method, value)

    def _increment(self, name: str, attr: str, method: str, total: int) -> None:
        """Report the growth of the counter ``attr`` of layer ``name`` to ``total``."""
        with self._lock:
            seen = self._seen.get((name, attr), 0)
            self._seen[(name, attr)] = max(seen, total)
        if total > seen:
            getattr(self._m, method)(name, total - seen)

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


class Sampling(NamedTuple):
    """A collector's :class:`~cachechain.metrics.HitSampler` as ``Chain.get`` uses it:
    ``hits`` is an iterator whose ``next()`` is the sampler's ``count()`` (the
    ``itertools.count`` itself where it is one: ``next()`` on it costs ~15 ns less than
    a call of its bound ``__next__``)."""

    hits: Iterator[int]
    every: int
    timed: Callable[[float, int], None]


def hit_sampler(m: CollectorGuard | None, first: Watched) -> Sampling | None:
    """The collector's sampler of the first layer's hits (see
    :meth:`MetricsCollector.hit_sampler <cachechain.metrics.MetricsCollector.hit_sampler>`),
    asked only for an in-process first layer: ``Chain.get`` reads a first-layer miss
    again under the clock, which costs nothing next to the layers below it but would
    cost a round trip on a remote one."""
    if m is None or not getattr(first.layer, "local", False):
        return None
    sampler = m.hit_sampler(first.name)
    if sampler is None:
        return None
    counter = getattr(sampler.count, "__self__", None)
    if not isinstance(counter, itertools.count):
        counter = iter(sampler.count, _NEVER)  # calls count() on each next()
    return Sampling(counter, sampler.every, sampler.timed)


#: What no ``count()`` returns: ends nothing.
_NEVER = object()


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
    add_info = getattr(m.collector, "add_info", None)
    if add_info is not None:
        try:
            for metric, labels in info_series(tiers):
                add_info(metric, labels)
        except Exception as exc:  # the chain works without its info series
            m.failed(exc)
    figures = PolledFigures(m, [(t.name, t.writer, _stats_of(t.layer)) for t in tiers])
    add_hook = getattr(m.collector, "add_refresh_hook", None)
    if add_hook is not None:
        try:
            add_hook(figures.hook())
        except Exception as exc:  # the chain works without polled figures
            m.failed(exc)
    return figures


def innermost(layer: CacheLayer) -> CacheLayer:
    """The layer itself: ``layer`` unwrapped from its breaker, its namespace and any
    :class:`~cachechain.layers.LayerProxy` (a proxy of the application's, say)."""
    seen = 0
    layer = unwrapped(layer)
    while isinstance(layer, LayerProxy) and seen < 16:
        layer, seen = unwrapped(layer.layer), seen + 1
    return layer


def _stats_of(layer: CacheLayer) -> Callable[[], Any] | None:
    """The ``stats`` method that reports the layer's figures: the first one inward from
    ``layer`` after its breaker (whose ``stats`` are the breaker's), through any proxy
    that has none of its own; None if no layer reports figures."""
    inner = unwrapped(layer)
    for _ in range(16):
        if isinstance(inner, SupportsStats):
            return inner.stats
        if not isinstance(inner, LayerProxy):
            break
        inner = unwrapped(inner.layer)
    return layer.stats if isinstance(layer, SupportsStats) else None


def stats_of(layer: CacheLayer) -> Callable[[], Any] | None:
    """The ``stats`` method that reports ``layer``'s own figures (see
    :func:`_stats_of`), or None."""
    return _stats_of(layer)


def layer_type(layer: CacheLayer) -> str:
    """The class name of the layer itself (see :func:`innermost`)."""
    return type(innermost(layer)).__name__


def _seconds(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "none"
    return f"{float(value):g}"


def info_series(tiers: Sequence[Watched]) -> list[tuple[str, tuple[str, ...]]]:
    """The info series of a chain of ``tiers``: ``("info", (version, layer types))``
    then ``("layer_info", (layer, type, timeout, max_failures, reset_timeout))`` per
    layer (``none`` for a setting the layer does not have)."""
    version = str(getattr(sys.modules.get("cachechain"), "__version__", "unknown"))
    types = [layer_type(t.layer) for t in tiers]
    out: list[tuple[str, tuple[str, ...]]] = [("info", (version, ",".join(types)))]
    for tier, kind in zip(tiers, types, strict=True):
        breaker = tier.breaker
        out.append(
            (
                "layer_info",
                (
                    tier.name,
                    kind,
                    _seconds(getattr(innermost(tier.layer), "timeout", None)),
                    "none" if breaker is None else str(breaker.max_failures),
                    "none" if breaker is None else _seconds(breaker.reset_timeout),
                ),
            )
        )
    return out

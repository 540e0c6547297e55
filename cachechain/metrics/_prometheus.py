"""PrometheusCollector: cachechain's metrics for Prometheus (needs prometheus-client).

Nothing from prometheus-client runs on the request path: a chain records into the
lock-free per-thread accumulators of :mod:`cachechain.metrics._engine` (about a tenth of
the cost of one ``Counter.inc()``), and a scrape turns them into metric families.

Single process: ``PrometheusCollector(registry=registry)`` (or :meth:`register`) adds
the metrics to a ``CollectorRegistry``. Collectors with the same namespace on one
registry share one registration, so two collectors on a registry, one collector on two
registries and several chains on one collector never raise "Duplicated timeseries"
(series with equal labels add up).

Several processes (gunicorn, uWSGI; ``PROMETHEUS_MULTIPROC_DIR`` set): custom collectors
are not read by prometheus-client's ``MultiProcessCollector``, so the collector writes
its figures into the per-process files instead, from a daemon thread every
``flush_interval`` seconds, at exit, and on :meth:`PrometheusCollector.flush`. Counters
and histograms are summed over processes (dead ones included: a counter never goes
back); gauges use ``livesum`` (queue depth and capacity, entries, repairs, connections)
or ``livemax`` (breaker states, nodes down, info series), so call
``prometheus_client.multiprocess.mark_process_dead(pid)`` from gunicorn's ``child_exit``
hook. A process that forks (gunicorn's master with ``--preload``, which built a chain
at import time) writes its gauges as 0 from the fork on, so that only the workers count
(``live_after_fork=True`` keeps them). Serve ``/metrics`` from
:func:`multiprocess_registry`: prometheus-client's ``MultiProcessCollector`` plus every
family no process has written yet, described without samples.

The metric names, types and labels are the catalogue's
(:mod:`cachechain.metrics._catalogue`; the table is in ``docs/metrics.md``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO, cast

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import Metric as Family
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _go_float

from .. import _fork
from .._errors import ConfigError
from .._logonce import LogOnce
from ._base import DEFAULT_SAMPLE_HITS
from ._catalogue import COUNTER, DEFAULT_BUCKETS, GAUGE, HISTOGRAM, METRICS, Metric
from ._engine import AccumulatingCollector, ChainView
from ._series import ViewData, series

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_SAMPLE_HITS",
    "FAMILIES",
    "MetricsServer",
    "MultiprocessFamilies",
    "PrometheusCollector",
    "multiprocess_registry",
    "serve_metrics",
    "start_demo_exporter",
]

log = logging.getLogger("cachechain.metrics")
_log_once = LogOnce(log)
_TOKENS = itertools.count()

#: Formats a bucket bound as prometheus-client does (``le`` label values).
float_to_go: Callable[[float], str] = cast(Callable[[float], str], _go_float)

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


#: Seconds between two warnings of a multiprocess flush that keeps failing.
WARN_EVERY = 60.0

#: Every family the collector exports, in exposition order: the catalogue's metrics.
FAMILIES: tuple[Metric, ...] = METRICS
_MAXIMUM = {m.name for m in METRICS if m.merge == "max"}

Labels = tuple[str, ...]
Table = dict[str, dict[Labels, Any]]  # family name -> label values -> number or Hist


def _new_table() -> Table:
    return {m.name: {} for m in METRICS}


def _put(table: Table, name: str, labels: Labels, value: Any) -> None:
    """Add one series to ``table``: equal series add up (or keep the larger, for a
    metric merged by ``max``)."""
    target = table[name]
    old = target.get(labels)
    if old is None:
        target[labels] = value
    elif name in _MAXIMUM:
        target[labels] = max(old, value)
    else:
        target[labels] = old + value


def view_series(d: ViewData, table: Table) -> None:
    """Add the series of one chain's figures that are shown to ``table`` (see
    :func:`cachechain.metrics._series.series`)."""
    for s in series(d):
        if s.shown:
            _put(table, s.metric.name, s.labels(d), s.value)


def engine_series(engine: AccumulatingCollector) -> Table:
    """Read ``engine`` (refresh hooks first) and return its series."""
    table = _new_table()
    for data in engine.read():
        view_series(data, table)
    return table


def merge_tables(tables: Iterable[Table]) -> Table:
    """Combine the series of several collectors: equal series add up (gauges merged
    ``max`` take the largest)."""
    out = _new_table()
    for table in tables:
        for name, values in table.items():
            for labels, value in values.items():
                _put(out, name, labels, value)
    return out


def build_families(table: Table, namespace: str, bounds: Sequence[float]) -> list[Family]:
    """Turn series into prometheus-client metric families (every family, even with no
    series; series sorted by labels)."""
    le = [float_to_go(b) for b in bounds] + ["+Inf"]
    families: list[Family] = []
    for fam in FAMILIES:
        name = f"{namespace}_{fam.name}"
        metric: Any
        if fam.kind == COUNTER:
            metric = CounterMetricFamily(name, fam.help, labels=fam.labels)
        elif fam.kind == GAUGE:
            metric = GaugeMetricFamily(name, fam.help, labels=fam.labels)
        else:
            metric = HistogramMetricFamily(name, fam.help, labels=fam.labels)
        for labels, value in sorted(table[fam.name].items()):
            if fam.kind == HISTOGRAM:
                cumulative, running = [], 0
                for bound, n in zip(le, value.counts, strict=True):
                    running += n
                    cumulative.append((bound, float(running)))
                metric.add_metric(list(labels), cumulative, float(value.total))
            else:
                metric.add_metric(list(labels), float(value))
        families.append(metric)
    return families


class _Hub(Collector):
    """The one registration of a namespace in one registry, shared by every
    collector registered there with that namespace."""

    def __init__(self, namespace: str, bounds: tuple[float, ...]) -> None:
        self.namespace = namespace
        self.bounds = bounds
        self.members: list[PrometheusCollector] = []

    def describe(self) -> list[Family]:
        return build_families(_new_table(), self.namespace, self.bounds)

    def collect(self) -> list[Family]:
        tables = []
        for member in list(self.members):
            try:
                tables.append(engine_series(member))
            except Exception:  # a scrape shows what can be shown
                log.exception("reading metrics collector %r failed", member)
        return build_families(merge_tables(tables), self.namespace, self.bounds)


_HUBS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Hub]] = weakref.WeakKeyDictionary()
_HUBS_LOCK = threading.Lock()

# Multiprocess mode: collectors to flush at exit, value classes by directory.
_MP_COLLECTORS: weakref.WeakSet[PrometheusCollector] = weakref.WeakSet()
_MP_CLASSES: dict[str, Any] = {}


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _value_class() -> Any:
    """prometheus-client's per-process file value class: its own when it is in
    multiprocess mode (one writer per file), else one per directory."""
    from prometheus_client import values

    directory = _multiprocess_dir()
    if not directory or not os.path.isdir(directory):
        raise ConfigError(
            "multiprocess mode needs PROMETHEUS_MULTIPROC_DIR set to an existing "
            f"directory, got {directory!r}"
        )
    if getattr(values.ValueClass, "_multiprocess", False):
        return values.ValueClass
    with _HUBS_LOCK:
        cls = _MP_CLASSES.get(directory)
        if cls is None:
            cls = _MP_CLASSES[directory] = cast(Any, values).MultiProcessValue()
        return cls


def _multiprocess_mode(m: Metric) -> str:
    """The ``multiprocess_mode`` of a gauge that matches its merge (live processes):
    ``livemax`` or ``livesum``; none for counters and histograms."""
    if m.kind != GAUGE:
        return ""
    return "livemax" if m.merge == "max" else "livesum"


class _FileWriter:
    """Writes a table into prometheus-client's per-process files (absolute values,
    only those that changed since the last write). ``live``: False in a process that
    forked (a pre-forking master), whose gauges of live processes are then written as
    0 (the neutral value of ``livesum`` and, gauges being >= 0, of ``livemax``)."""

    def __init__(self, namespace: str, bounds: Sequence[float]) -> None:
        self.namespace = namespace
        self.le = [float_to_go(b) for b in bounds] + ["+Inf"]
        self.cls = _value_class()
        self.directory = _multiprocess_dir()
        self.values: dict[tuple[str, Labels, str], tuple[Any, float]] = {}
        self.live = True

    def _set(
        self, fam: Metric, labels: Labels, sample: str, extra: tuple[str, ...], value: float
    ) -> None:
        key = (fam.name, labels, sample + "|".join(extra))
        held = self.values.get(key)
        if held is not None and held[1] == value:
            return
        if held is None:
            metric = f"{self.namespace}_{fam.name}"
            label_names = fam.labels
            if fam.kind == COUNTER:
                metric = metric[: -len("_total")]
            if extra:
                label_names = (*label_names, "le")
            obj = self.cls(
                fam.kind,
                metric,
                metric + sample,
                label_names,
                (*labels, *extra),
                fam.help,
                multiprocess_mode=_multiprocess_mode(fam),
            )
        else:
            obj = held[0]
        obj.set(float(value))
        self.values[key] = (obj, value)

    def write(self, table: Table) -> None:
        for fam in FAMILIES:
            for labels, value in table[fam.name].items():
                if fam.kind == COUNTER:
                    self._set(fam, labels, "_total", (), value)
                elif fam.kind == GAUGE:
                    self._set(fam, labels, "", (), value if self.live else 0)
                else:
                    for bound, n in zip(self.le, value.counts, strict=True):
                        self._set(fam, labels, "_bucket", (bound,), n)
                    self._set(fam, labels, "_sum", (), value.total)

    def forget(self) -> None:
        """Write everything again next time (a forked child has new files)."""
        self.values = {}


class PrometheusCollector(AccumulatingCollector):
    """Exports cachechain's metrics to Prometheus; see the module's notes and
    ``docs/metrics.md`` for the metric catalogue.

    ``namespace`` prefixes every name (default ``cache_chain``). ``buckets`` are the
    latency histograms' upper bounds in seconds (ascending; ``+Inf`` implied).
    ``registry``: register into it now (see :meth:`register`). ``multiprocess``:
    write prometheus-client's multiprocess files instead of registering (``None``:
    when ``PROMETHEUS_MULTIPROC_DIR`` is set); ``flush_interval`` is then the period of
    the background flush, seconds; ``live_after_fork``: whether a process that forked
    keeps writing its gauges (default False: from the fork on it writes them as 0, so
    that gunicorn's master with ``--preload``, which serves no request, does not count
    among the live processes of ``livesum`` and ``livemax``). ``sample_hits``: a
    chain's ``get`` times one first-layer hit in this many (default
    :data:`DEFAULT_SAMPLE_HITS`) and counts that duration as many times in the latency
    histograms; the hit counters stay exact (1: time every hit).

    Recording is lock-free and never touches prometheus-client; it never raises.
    Raises :class:`~cachechain.ConfigError` (a ``ValueError``) for an invalid
    namespace, buckets, interval or ``sample_hits``, or multiprocess mode without a
    directory.
    """

    def __init__(
        self,
        namespace: str = "cache_chain",
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        registry: CollectorRegistry | None = None,
        multiprocess: bool | None = None,
        flush_interval: float = 1.0,
        live_after_fork: bool = False,
        sample_hits: int = DEFAULT_SAMPLE_HITS,
    ) -> None:
        if not isinstance(namespace, str) or not _NAME_RE.match(namespace):
            raise ConfigError(f"namespace must be a Prometheus metric name, got {namespace!r}")
        if isinstance(flush_interval, bool) or not (
            isinstance(flush_interval, (int, float)) and 0 < flush_interval < float("inf")
        ):
            raise ConfigError(f"flush_interval must be seconds > 0, got {flush_interval!r}")
        if type(sample_hits) is not int or sample_hits < 1:
            raise ConfigError(f"sample_hits must be an int of at least 1, got {sample_hits!r}")
        try:
            super().__init__(buckets, track_max=False, track_sum=True, sample_hits=sample_hits)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"buckets: {exc}") from None
        self.namespace = namespace
        self.flush_interval = float(flush_interval)
        self.multiprocess = (
            _multiprocess_dir() is not None if multiprocess is None else multiprocess
        )
        self._closed = False
        self._key_flush = ("flush", next(_TOKENS))
        self.live_after_fork = bool(live_after_fork)
        #: Multiprocess flushes that failed (each logged at WARNING, at most once per
        #: :data:`WARN_EVERY` seconds while they keep failing).
        self.flush_failures = 0
        self._warned_at: float | None = None
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._writer: _FileWriter | None = None
        if self.multiprocess:
            self._writer = _FileWriter(namespace, self.bounds)
            _MP_COLLECTORS.add(self)
            self._start_flusher()
        if registry is not None:
            self.register(registry)

    # -- single process: registries ------------------------------------------------------
    def register(self, registry: CollectorRegistry) -> None:
        """Add this collector's metrics to ``registry``. Idempotent; collectors with the
        same namespace share one registration there (their equal series add up). In
        multiprocess mode this does nothing: scrape with ``MultiProcessCollector``.

        Raises :class:`~cachechain.ConfigError` when a collector with other
        buckets already uses the namespace in ``registry``, and ``ValueError`` (from
        prometheus-client) when other metrics there already use these names.
        """
        if self.multiprocess:
            log.debug("%r: multiprocess mode, not registering into %r", self, registry)
            return
        with _HUBS_LOCK:
            hubs = _HUBS.setdefault(registry, {})
            hub = hubs.get(self.namespace)
            if hub is None:
                hub = _Hub(self.namespace, self.bounds)
                registry.register(hub)
                hubs[self.namespace] = hub
            elif hub.bounds != self.bounds:
                raise ConfigError(
                    f"namespace {self.namespace!r} is registered in this registry with "
                    f"buckets {hub.bounds}; this collector has {self.bounds}"
                )
            if self not in hub.members:
                hub.members.append(self)

    def unregister(self, registry: CollectorRegistry) -> None:
        """Remove this collector's metrics from ``registry`` (the namespace goes when
        no collector uses it any more). Does nothing if it was not registered."""
        with _HUBS_LOCK:
            hubs = _HUBS.get(registry, {})
            hub = hubs.get(self.namespace)
            if hub is None or self not in hub.members:
                return
            hub.members.remove(self)
            if not hub.members:
                del hubs[self.namespace]
                registry.unregister(hub)

    def collect(self) -> list[Family]:
        """This collector's metric families alone (refresh hooks run first): what a
        registry shows for it. For prometheus-client's collector protocol."""
        return build_families(engine_series(self), self.namespace, self.bounds)

    def describe(self) -> list[Family]:
        """The metric families without samples (prometheus-client's protocol)."""
        return build_families(_new_table(), self.namespace, self.bounds)

    # -- multiprocess: files -------------------------------------------------------------
    def _start_flusher(self) -> None:
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._flush_loop,
            args=(self._stop,),
            name=f"cachechain-metrics-flush-{self.namespace}",
            daemon=True,
        )
        self._flusher = thread
        thread.start()

    def _flush_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.flush_interval):
            self.flush()

    def flush(self) -> bool:
        """Multiprocess mode: write the current figures into this process's files now
        (refresh hooks first). Returns True when written, False in single-process mode
        or when writing failed (logged once; never raises)."""
        writer = self._writer
        if writer is None:
            return False
        try:
            if writer.directory is not None and not os.path.isdir(writer.directory):
                raise FileNotFoundError(
                    f"PROMETHEUS_MULTIPROC_DIR {writer.directory!r} is not a directory "
                    "(any more): these figures reach no scrape"
                )
            with self._flush_lock:  # read and write in one go: never older over newer
                writer.write(engine_series(self))
        except Exception as exc:
            self._flush_failed(exc)
            return False
        self._warned_at = None
        return True

    def _flush_failed(self, exc: Exception) -> None:
        """Count a failed flush; warn at once, then every :data:`WARN_EVERY` seconds
        while flushes keep failing (the figures of a process that cannot write its
        files are not exported at all)."""
        self.flush_failures += 1
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            log.debug("writing metrics for %r failed again: %r", self, exc)
            return
        self._warned_at = now
        log.warning(
            "writing metrics for %r failed: %r; this process's metrics are not exported "
            "until it succeeds (%d failed flushes so far; warned again every %g s)",
            self,
            exc,
            self.flush_failures,
            WARN_EVERY,
        )

    def close(self) -> None:
        """Stop the background flush and flush a last time (multiprocess mode); in one
        process, leave every registry it was registered in (a closed chain's last
        gauges would otherwise add to those of the chains built after it). Recording
        still works; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(5)
        self.flush()
        with _HUBS_LOCK:
            registries = list(_HUBS.keys())
        for registry in registries:
            self.unregister(registry)

    def _after_fork(self) -> None:
        """In a forked child: figures from zero, a new flush lock, and (multiprocess
        mode) the child's own files and flusher. In one-process mode, warn once: each
        forked worker exports only its own figures."""
        super()._after_fork()
        self._flush_lock = threading.Lock()
        self._warned_at = None
        if self._writer is not None:
            self._writer.forget()
            self._writer.live = True
            if not self._closed:
                self._start_flusher()
        elif not self._closed:
            _log_once(
                ("forked single process", id(type(self))),
                "%r was forked (gunicorn or uWSGI workers?) in one-process mode: each "
                "process exports only its own figures, to whichever process a scrape "
                "reaches. Set PROMETHEUS_MULTIPROC_DIR to an empty directory before "
                "the server starts (see docs/metrics.md)",
                self,
            )

    def _forked_a_child(self) -> None:
        """In the parent after a fork (a pre-forking master): write gauges as 0 from
        now on, unless ``live_after_fork``."""
        writer = self._writer
        if writer is not None and not self.live_after_fork:
            writer.live = False

    def __repr__(self) -> str:
        mode = "multiprocess" if self.multiprocess else "single process"
        return f"<PrometheusCollector {self.namespace!r} {mode}>"


@atexit.register
def _flush_at_exit() -> None:
    for collector in list(_MP_COLLECTORS):
        collector.close()


def _after_fork_in_parent() -> None:
    for collector in list(_MP_COLLECTORS):
        collector._forked_a_child()


_fork.at_fork(after_in_parent=_after_fork_in_parent)


# -- multiprocess: scraping ----------------------------------------------------------------
class MultiprocessFamilies(Collector):
    """What a ``/metrics`` view serves in multiprocess mode: prometheus-client's
    ``MultiProcessCollector`` over ``path`` (default ``PROMETHEUS_MULTIPROC_DIR``), plus
    every family of the catalogue (in ``namespace``) that no process has written yet,
    with its ``# HELP`` and ``# TYPE`` and no samples, so every family is always
    described. Raises ``ValueError`` (prometheus-client's) when ``path`` is not a
    directory."""

    def __init__(
        self,
        path: str | None = None,
        namespace: str = "cache_chain",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        from prometheus_client import multiprocess

        files: Any = cast(Any, multiprocess).MultiProcessCollector(None, path)
        self._files = files
        self.namespace = namespace
        self.bounds = tuple(buckets)

    def collect(self) -> list[Family]:
        families: list[Family] = list(self._files.collect())
        present = {f.name for f in families}
        for fam in build_families(_new_table(), self.namespace, self.bounds):
            if fam.name not in present:
                families.append(fam)
        return families

    def describe(self) -> list[Family]:
        return []  # like MultiProcessCollector: other collectors may share the names


def multiprocess_registry(
    path: str | None = None,
    namespace: str = "cache_chain",
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> CollectorRegistry:
    """A new ``CollectorRegistry`` holding :class:`MultiprocessFamilies`: serve it (with
    ``generate_latest``) from ``/metrics`` in multiprocess mode. Build one per scrape or
    keep one (it reads the files at each collect). Raises ``ValueError`` when ``path``
    (default ``PROMETHEUS_MULTIPROC_DIR``) is not a directory."""
    registry = CollectorRegistry()
    registry.register(MultiprocessFamilies(path, namespace, buckets))
    return registry


# -- serving /metrics ----------------------------------------------------------------------
class MetricsServer:
    """A ``/metrics`` HTTP server running in a daemon thread (prometheus-client's
    ``start_http_server``). ``port`` is the port it listens on; :meth:`shutdown` stops
    it."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host: str = httpd.server_address[0]
        self.port: int = httpd.server_address[1]

    @property
    def url(self) -> str:
        """The address to scrape, ``http://HOST:PORT/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self) -> None:
        """Stop serving and close the socket; waits up to 5 s for the thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve_metrics(
    registry: CollectorRegistry, port: int = 0, addr: str = "127.0.0.1"
) -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` (``port`` 0: a free port) from
    a daemon thread. Raises ``OSError`` when the port cannot be bound."""
    httpd, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(httpd, thread)


class _EngineExporter(Collector):
    """Exports any accumulating collector (a MemoryCollector, say) to a registry."""

    def __init__(self, engine: AccumulatingCollector, namespace: str) -> None:
        self.engine = engine
        self.namespace = namespace

    def describe(self) -> list[Family]:
        return build_families(_new_table(), self.namespace, self.engine.bounds)

    def collect(self) -> list[Family]:
        return build_families(engine_series(self.engine), self.namespace, self.engine.bounds)


def _engines_of(collector: Any) -> Iterator[AccumulatingCollector]:
    """The accumulating collectors behind a chain's collector (a guard, a view, a
    fan-out), outermost first."""
    seen = 0
    stack = [collector]
    while stack and seen < 64:
        seen += 1
        c = stack.pop(0)
        if isinstance(c, AccumulatingCollector):
            yield c
        elif isinstance(c, ChainView):
            yield c.engine
        inner = getattr(c, "collector", None)  # CollectorGuard
        if inner is not None:
            stack.append(inner)
        stack.extend(getattr(c, "collectors", ()))  # FanoutCollector


def start_demo_exporter(
    chain: Any,
    port: int,
    out: TextIO,
    *,
    collector: AccumulatingCollector | None = None,
    addr: str = "127.0.0.1",
) -> MetricsServer:
    """Serve the metrics of ``chain`` at ``/metrics`` on ``port`` (0: a free one) and
    print the URL to ``out``; return the server (call ``.shutdown()`` when done).

    The collector is ``collector`` when given, else the one the chain reports to: a
    :class:`PrometheusCollector` (also inside a ``FanoutCollector``) if there is one,
    else a :class:`~cachechain.MemoryCollector`, exported as is (its
    histograms then have its finer buckets). Raises
    :class:`~cachechain.ConfigError` when the chain has no such collector, and
    ``OSError`` when the port cannot be bound.
    """
    engine = collector
    if engine is None:
        found = list(_engines_of(getattr(chain, "_m", None)))
        prom = [e for e in found if isinstance(e, PrometheusCollector)]
        engine = prom[0] if prom else (found[0] if found else None)
    if engine is None:
        raise ConfigError(
            "the chain has no collector to export: build it with metrics=PrometheusCollector()"
            " (or a FanoutCollector holding one)"
        )
    registry = CollectorRegistry()
    if isinstance(engine, PrometheusCollector) and not engine.multiprocess:
        engine.register(registry)
    else:
        namespace = engine.namespace if isinstance(engine, PrometheusCollector) else "cache_chain"
        registry.register(_EngineExporter(engine, namespace))
    server = serve_metrics(registry, port, addr)
    out.write(f"Prometheus metrics at {server.url}\n")
    out.flush()
    return server

"""PrometheusCollector: cachechain's metrics for Prometheus (needs prometheus-client).

Nothing from prometheus-client runs on the request path: a chain records into the
lock-free per-thread accumulators of :mod:`cachechain.metrics.memory` (about a tenth of
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
back); gauges use ``livesum`` (queue depth and capacity, entries) or ``livemax``
(breaker state), so call ``prometheus_client.multiprocess.mark_process_dead(pid)`` from
gunicorn's ``child_exit`` hook.

The metric names, types and labels are in ``docs/metrics.md``.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, cast

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _go_float

from .._errors import ERROR_TYPES, ConfigError
from ._memory import (
    C_LOAD_FAIL,
    C_LOAD_OK,
    C_MISS,
    C_SHARED,
    CIRCUIT_STATES,
    DROP_REASONS,
    L_ASYNC_FAIL,
    L_ASYNC_OK,
    L_DEL_FAIL,
    L_DEL_OK,
    L_DROPPED,
    L_ERRORS,
    L_EVICTIONS,
    L_HITS,
    L_MISSES,
    L_REJECTED,
    L_SET_FAIL,
    L_SET_OK,
    OPERATIONS,
    AccumulatingCollector,
    ChainView,
    ViewData,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "FAMILIES",
    "MetricsServer",
    "PrometheusCollector",
    "serve_metrics",
    "start_demo_exporter",
]

log = logging.getLogger("cachechain.metrics")

#: Latency buckets (seconds): an in-process hit (a few us) up to a remote call at its
#: timeout (1 s); one more bucket, ``+Inf``, is implied.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

#: Formats a bucket bound as prometheus-client does (``le`` label values).
float_to_go: Callable[[float], str] = cast(Callable[[float], str], _go_float)

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@dataclass(frozen=True)
class Family:
    """One metric family: ``name`` follows the namespace (``hits_total`` gives
    ``cache_chain_hits_total``); ``kind`` is ``counter``, ``gauge`` or ``histogram``;
    ``merge`` says how equal series of several collectors (or processes) combine:
    ``sum`` or ``max``."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str
    merge: str = "sum"

    @property
    def multiprocess_mode(self) -> str:
        """The gauge ``multiprocess_mode`` that matches ``merge`` (live processes)."""
        return "livemax" if self.merge == "max" else "livesum"


_CL = ("chain", "layer")
#: Every family the collector exports, in exposition order.
FAMILIES: tuple[Family, ...] = (
    Family("hits_total", "counter", _CL, "Gets of one key that found it in the layer."),
    Family("misses_total", "counter", _CL, "Gets of one key the layer did not have (clean)."),
    Family(
        "errors_total",
        "counter",
        (*_CL, "operation", "error_type"),
        "Calls to the layer that failed, by operation and error type (not misses).",
    ),
    Family(
        "operation_duration_seconds",
        "histogram",
        (*_CL, "operation"),
        "Duration of calls to the layer (get: per key; set, delete: per call).",
    ),
    Family(
        "operations_total",
        "counter",
        (*_CL, "operation", "result"),
        "Synchronous sets and deletes of the layer, by result.",
    ),
    Family(
        "requests_total",
        "counter",
        ("chain", "result", "served_by"),
        "Logical gets of the chain, by result and the layer that served them.",
    ),
    Family(
        "request_duration_seconds",
        "histogram",
        ("chain", "result"),
        "Duration of logical gets of the chain, through every layer asked.",
    ),
    Family("loads_total", "counter", ("chain", "result"), "Loader calls, by result."),
    Family("load_duration_seconds", "histogram", ("chain",), "Duration of loader calls."),
    Family(
        "singleflight_shared_total",
        "counter",
        ("chain",),
        "Callers that joined a load already in flight instead of running the loader.",
    ),
    Family("queue_depth", "gauge", _CL, "Writes queued in the layer's async writer."),
    Family("queue_capacity", "gauge", _CL, "Bound of the layer's async writer queue."),
    Family(
        "writes_dropped_total",
        "counter",
        (*_CL, "reason"),
        "Writes the layer's async writer dropped, by reason.",
    ),
    Family(
        "async_writes_total",
        "counter",
        (*_CL, "result"),
        "Writes made by the layer's async writer, by result.",
    ),
    Family(
        "async_write_duration_seconds",
        "histogram",
        _CL,
        "Duration of writes made by the layer's async writer.",
    ),
    Family(
        "circuit_state",
        "gauge",
        _CL,
        "CircuitState of the layer's circuit breaker: 0 closed, 1 open, 2 half-open.",
        merge="max",
    ),
    Family(
        "circuit_transitions_total",
        "counter",
        (*_CL, "to"),
        "Transitions of the layer's circuit breaker, by the state entered.",
    ),
    Family(
        "circuit_rejected_total",
        "counter",
        _CL,
        "Calls the layer's open circuit breaker refused without any I/O.",
    ),
    Family("evictions_total", "counter", _CL, "Entries the in-process layer evicted."),
    Family("entries", "gauge", _CL, "Entries held by the in-process layer."),
)
_BY_NAME = {f.name: f for f in FAMILIES}

Labels = tuple[str, ...]
Table = dict[str, dict[Labels, Any]]  # family name -> label values -> number or Hist


def _new_table() -> Table:
    return {f.name: {} for f in FAMILIES}


def view_series(d: ViewData, table: Table) -> None:
    """Add the series of one chain's figures to ``table``.

    The layers a chain was built with always have their hits, misses and get
    durations, and the chain its requests, request durations and shared loads (zeros
    included, so that rates exist from the start); any other series appears once it is
    non-zero or reported.
    """
    t = d.totals
    chain = d.chain
    bound = set(d.layers[: d.bound])

    def put(name: str, labels: Labels, value: Any) -> None:
        series = table[name]
        old = series.get(labels)
        if old is None:
            series[labels] = value
        elif _BY_NAME[name].merge == "max":
            series[labels] = max(old, value)
        else:
            series[labels] = old + value

    for layer in d.layers:
        base = d.offsets[layer]
        always = layer in bound
        lv = (chain, layer)
        hits, misses = d.layer_value(layer, L_HITS), t[base + L_MISSES]
        if always or hits or misses:
            put("hits_total", lv, hits)
            put("misses_total", lv, misses)
        for op in ("get", "set", "delete"):
            h = d.layer_hist(layer, op)
            if h.count or (always and op == "get"):
                put("operation_duration_seconds", (*lv, op), h)
        for op, ok, fail in (("set", L_SET_OK, L_SET_FAIL), ("delete", L_DEL_OK, L_DEL_FAIL)):
            for result, slot in (("success", ok), ("failure", fail)):
                if t[base + slot]:
                    put("operations_total", (*lv, op, result), t[base + slot])
        n_err = len(ERROR_TYPES)
        for o, op in enumerate(OPERATIONS):
            for e, error_type in enumerate(ERROR_TYPES):
                n = t[base + L_ERRORS + o * n_err + e]
                if n:
                    put("errors_total", (*lv, op, error_type), n)
        for r, reason in enumerate(DROP_REASONS):
            if t[base + L_DROPPED + r]:
                put("writes_dropped_total", (*lv, reason), t[base + L_DROPPED + r])
        for result, slot in (("success", L_ASYNC_OK), ("failure", L_ASYNC_FAIL)):
            if t[base + slot]:
                put("async_writes_total", (*lv, result), t[base + slot])
        h = d.layer_hist(layer, "async")
        if h.count:
            put("async_write_duration_seconds", lv, h)
        if t[base + L_REJECTED] or layer in d.circuit_state:
            put("circuit_rejected_total", lv, t[base + L_REJECTED])
        if t[base + L_EVICTIONS] or layer in d.entries:
            put("evictions_total", lv, t[base + L_EVICTIONS])
        for gauge, values in (
            ("queue_depth", d.queue_depth),
            ("queue_capacity", d.queue_capacity),
            ("circuit_state", d.circuit_state),
            ("entries", d.entries),
        ):
            if layer in values:
                put(gauge, lv, values[layer])
    for (layer, state), n in d.transitions.items():
        put("circuit_transitions_total", (chain, layer, CIRCUIT_STATES[state]), n)

    for index, n in enumerate(d.hits_by_index()):
        declared = index < d.bound
        if n or declared:
            served_by = d.layers[index] if declared else "unknown"
            put("requests_total", (chain, "hit", served_by), n)
    if t[C_MISS] or d.bound:
        put("requests_total", (chain, "miss", "none"), t[C_MISS])
    for result, hit in (("hit", True), ("miss", False)):
        h = d.request_hist(hit)
        if h.count or d.bound:
            put("request_duration_seconds", (chain, result), h)
    for result, slot in (("success", C_LOAD_OK), ("failure", C_LOAD_FAIL)):
        if t[slot]:
            put("loads_total", (chain, result), t[slot])
    h = d.hist(d.load)
    if h.count:
        put("load_duration_seconds", (chain,), h)
    if t[C_SHARED] or d.bound:
        put("singleflight_shared_total", (chain,), t[C_SHARED])


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
        for name, series in table.items():
            target = out[name]
            maximum = _BY_NAME[name].merge == "max"
            for labels, value in series.items():
                old = target.get(labels)
                if old is None:
                    target[labels] = value
                else:
                    target[labels] = max(old, value) if maximum else old + value
    return out


def build_families(table: Table, namespace: str, bounds: Sequence[float]) -> list[Metric]:
    """Turn series into prometheus-client metric families (every family, even with no
    series; series sorted by labels)."""
    le = [float_to_go(b) for b in bounds] + ["+Inf"]
    families: list[Metric] = []
    for fam in FAMILIES:
        name = f"{namespace}_{fam.name}"
        metric: Any
        if fam.kind == "counter":
            metric = CounterMetricFamily(name, fam.help, labels=fam.labels)
        elif fam.kind == "gauge":
            metric = GaugeMetricFamily(name, fam.help, labels=fam.labels)
        else:
            metric = HistogramMetricFamily(name, fam.help, labels=fam.labels)
        for labels, value in sorted(table[fam.name].items()):
            if fam.kind == "histogram":
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

    def describe(self) -> list[Metric]:
        return build_families(_new_table(), self.namespace, self.bounds)

    def collect(self) -> list[Metric]:
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

    if getattr(values.ValueClass, "_multiprocess", False):
        return values.ValueClass
    directory = _multiprocess_dir()
    if not directory or not os.path.isdir(directory):
        raise ConfigError(
            "multiprocess mode needs PROMETHEUS_MULTIPROC_DIR set to an existing "
            f"directory, got {directory!r}"
        )
    with _HUBS_LOCK:
        cls = _MP_CLASSES.get(directory)
        if cls is None:
            cls = _MP_CLASSES[directory] = cast(Any, values).MultiProcessValue()
        return cls


class _FileWriter:
    """Writes a table into prometheus-client's per-process files (absolute values,
    only those that changed since the last write)."""

    def __init__(self, namespace: str, bounds: Sequence[float]) -> None:
        self.namespace = namespace
        self.le = [float_to_go(b) for b in bounds] + ["+Inf"]
        self.cls = _value_class()
        self.values: dict[tuple[str, Labels, str], tuple[Any, float]] = {}

    def _set(
        self, fam: Family, labels: Labels, sample: str, extra: tuple[str, ...], value: float
    ) -> None:
        key = (fam.name, labels, sample + "|".join(extra))
        held = self.values.get(key)
        if held is not None and held[1] == value:
            return
        if held is None:
            metric = f"{self.namespace}_{fam.name}"
            label_names = fam.labels
            if fam.kind == "counter":
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
                multiprocess_mode=fam.multiprocess_mode if fam.kind == "gauge" else "",
            )
        else:
            obj = held[0]
        obj.set(float(value))
        self.values[key] = (obj, value)

    def write(self, table: Table) -> None:
        for fam in FAMILIES:
            for labels, value in table[fam.name].items():
                if fam.kind == "counter":
                    self._set(fam, labels, "_total", (), value)
                elif fam.kind == "gauge":
                    self._set(fam, labels, "", (), value)
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
    the background flush, seconds.

    Recording is lock-free and never touches prometheus-client; it never raises.
    Raises :class:`~cachechain.errors.ConfigError` (a ``ValueError``) for an invalid
    namespace, buckets or interval, or multiprocess mode without a directory.
    """

    def __init__(
        self,
        namespace: str = "cache_chain",
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        registry: CollectorRegistry | None = None,
        multiprocess: bool | None = None,
        flush_interval: float = 1.0,
    ) -> None:
        if not isinstance(namespace, str) or not _NAME_RE.match(namespace):
            raise ConfigError(f"namespace must be a Prometheus metric name, got {namespace!r}")
        if isinstance(flush_interval, bool) or not (
            isinstance(flush_interval, (int, float)) and 0 < flush_interval < float("inf")
        ):
            raise ConfigError(f"flush_interval must be seconds > 0, got {flush_interval!r}")
        try:
            super().__init__(buckets, track_max=False, track_sum=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"buckets: {exc}") from None
        self.namespace = namespace
        self.flush_interval = float(flush_interval)
        self.multiprocess = (
            _multiprocess_dir() is not None if multiprocess is None else multiprocess
        )
        self._closed = False
        self._flush_lock = threading.Lock()
        self._flush_failures = 0
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

        Raises :class:`~cachechain.errors.ConfigError` when a collector with other
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

    def collect(self) -> list[Metric]:
        """This collector's metric families alone (refresh hooks run first): what a
        registry shows for it. For prometheus-client's collector protocol."""
        return build_families(engine_series(self), self.namespace, self.bounds)

    def describe(self) -> list[Metric]:
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
            with self._flush_lock:  # read and write in one go: never older over newer
                writer.write(engine_series(self))
        except Exception as exc:
            self._flush_failures += 1
            if self._flush_failures == 1:
                log.warning("writing metrics for %r failed: %r (logged once)", self, exc)
            return False
        return True

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

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        self._flush_lock = threading.Lock()
        if self._writer is not None:
            self._writer.forget()
            if not self._closed:
                self._start_flusher()

    def __repr__(self) -> str:
        mode = "multiprocess" if self.multiprocess else "single process"
        return f"<PrometheusCollector {self.namespace!r} {mode}>"


@atexit.register
def _flush_at_exit() -> None:
    for collector in list(_MP_COLLECTORS):
        collector.close()


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

    def describe(self) -> list[Metric]:
        return build_families(_new_table(), self.namespace, self.engine.bounds)

    def collect(self) -> list[Metric]:
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
    else a :class:`~cachechain.metrics.memory.MemoryCollector`, exported as is (its
    histograms then have its finer buckets). Raises
    :class:`~cachechain.errors.ConfigError` when the chain has no such collector, and
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

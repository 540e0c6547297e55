"""The metrics catalogue: every event a collector receives and every metric it exports,
declared once.

A :class:`Record` is one ``record_*`` method of
:class:`~cachechain.metrics.MetricsCollector` (its parameters, in order). A
:class:`Metric` is one metric family: its name after the namespace (as Prometheus shows
it), kind, labels, help text, unit, default buckets, how equal series combine, which
``record_*`` calls feed it and how their arguments become label values (its
:class:`Feed` entries), and the snapshot fields it fills (its :class:`Field` entries).

Everything else is derived from these two tuples, :data:`RECORDS` and :data:`METRICS`:
the method lists of :class:`~cachechain.metrics.CollectorGuard` and of the fan-out, the
forwarders of a collector's own ``record_*`` methods, the slots of the lock-free
accumulators, the Prometheus families, the StatsD names and the fields of
:class:`~cachechain.metrics.MetricsSnapshot`. Adding a metric fed by an existing event
is one :class:`Metric` entry; a new kind of event adds its :class:`Record`, its
``MetricsCollector`` method and the call that reports it.

Label values: ``chain`` is the chain's name and ``layer`` a layer's; every other label
takes the values listed in :attr:`Metric.values` (a label listed in
:attr:`Metric.positions` takes layer positions, shown as the layer's name). Collectors
that keep fixed slots count a value outside the list as ``other`` when the list has
it, and drop the call otherwise; the StatsD exporter sends values as they come.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import ERROR_TYPES

__all__ = [
    "CIRCUIT_STATES",
    "COUNTER",
    "DEFAULT_BUCKETS",
    "BACKGROUND_OUTCOMES",
    "BACKFILL_SKIP_REASONS",
    "DROP_REASONS",
    "FAIL_SAFE_REASONS",
    "GAUGE",
    "HISTOGRAM",
    "HIT_MISS",
    "LAG_BUCKETS",
    "LEASE_OUTCOMES",
    "LOST_REASONS",
    "METRICS",
    "OPERATIONS",
    "RECORDS",
    "RECORD_METHODS",
    "RESULTS",
    "SEED_METHODS",
    "Arg",
    "Feed",
    "Field",
    "Metric",
    "Param",
    "Record",
    "feeds_of",
    "find_metric",
    "find_record",
    "series_params",
]

#: The kinds of metric.
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

#: ``operation`` label values of errors; anything else is counted as ``other``.
OPERATIONS: tuple[str, ...] = (
    "get",
    "set",
    "delete",
    "get_many",
    "set_many",
    "delete_many",
    "add",
    "incr",
    "decr",
    "touch",
    "lease",
    "clear",
    "close",
    "other",
)
#: ``reason`` label values of dropped writes; anything else is counted as ``other``.
DROP_REASONS: tuple[str, ...] = ("queue_full", "circuit_open", "closed", "other")
#: Why a backfill (the copy of a value found in a lower layer into a layer above it) was
#: not made: the layer's breaker refused calls; a write of the key began meanwhile (the
#: value may be stale).
BACKFILL_SKIP_REASONS: tuple[str, ...] = ("circuit_open", "mutated", "other")
#: Breaker states by value (0, 1, 2): the ``to`` label of circuit transitions.
CIRCUIT_STATES: tuple[str, ...] = ("closed", "open", "half_open")
#: ``result`` of writes and loads: a true ``success`` argument is the first.
RESULTS: tuple[str, ...] = ("success", "failure")
#: ``result`` of logical gets: a true ``hit`` argument is the first.
HIT_MISS: tuple[str, ...] = ("hit", "miss")

#: Why a process lost track of other processes' invalidations (and dropped every
#: in-process entry): see :data:`cachechain._backplane.LOST_REASONS`.
LOST_REASONS: tuple[str, ...] = ("overrun", "gap", "unreachable", "reset", "overflow", "other")

#: Why ``get_or_load`` served a fail-safe value (an expired copy) instead of a loaded one:
#: the loader raised; the caller's soft timeout passed; its hard timeout (or its own
#: ``wait_timeout``) passed; the loader failed less than ``fail_safe_throttle`` ago; the
#: wait for another process's load (its lease) ended without a value.
FAIL_SAFE_REASONS: tuple[str, ...] = (
    "loader_error",
    "soft_timeout",
    "hard_timeout",
    "throttled",
    "lease_wait",
    "other",
)

#: How a load run on a background thread (a timed load, an eager refresh) ended: its
#: value stored; loaded but not stored (the key was set or deleted meanwhile); the loader
#: raised; not started (``max_background_loads`` were running); still running when the
#: chain closed (nothing stored).
BACKGROUND_OUTCOMES: tuple[str, ...] = (
    "stored",
    "discarded",
    "failed",
    "rejected",
    "abandoned",
    "other",
)

#: How a lease of ``get_or_load`` on the shared layer ended (see ``cachechain._lease``):
#: ``won`` (this process ran the loader), ``hit`` (the value was there), ``waited`` (another
#: process's value arrived), ``timed_out`` (the wait ended without one), ``unavailable``
#: (the shared layer failed or refused: loaded here at once).
LEASE_OUTCOMES: tuple[str, ...] = ("won", "hit", "waited", "timed_out", "unavailable", "other")

#: Latency buckets (seconds) of every histogram unless a collector is given others: from
#: an in-process hit (0.5 us; an L1 hit takes about 1 us) up to a remote call at its
#: timeout and a slow loader (10 s), in 1-2.5-5 steps; one more bucket, ``+Inf``, is
#: implied.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0000005,
    0.000001,
    0.0000025,
    0.000005,
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
    2.5,
    5.0,
    10.0,
)

#: Buckets (seconds) of the invalidation lag: a poll interval is 0.04 s, the bound 0.1 s.
LAG_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 5.0)


# -- events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of a ``record_*`` method: its name, its type (``str``, ``bool``,
    ``int`` or ``float``; durations are ``float`` seconds) and its default (``None``:
    required)."""

    name: str
    type: type
    default: str | None = None


@dataclass(frozen=True)
class Arg:
    """Stands for the argument ``name`` of a record call: a label value taken from it
    (a ``bool`` gives the label's first value when true, its second when false; an
    ``int`` gives the value at that index), or the arguments a fused record passes on."""

    name: str


@dataclass(frozen=True)
class Record:
    """One ``record_*`` method of :class:`~cachechain.metrics.MetricsCollector`.

    ``seed``: one of the seed's eight methods, which every collector must have.
    ``stands_for``: a fused call, the same as the calls listed (record name, and its
    arguments: literals, or :class:`Arg` of this record's own); the collectors record
    it in one step.
    """

    name: str
    params: tuple[Param, ...]
    seed: bool = False
    stands_for: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters' names, in order."""
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        """The parameter called ``name``; raises ``KeyError`` when there is none."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}")


_LAYER = Param("layer", str)
_DURATION = Param("duration", float)

#: Every ``record_*`` method, the seed's eight first.
RECORDS: tuple[Record, ...] = (
    Record("record_get", (_LAYER, Param("hit", bool), _DURATION), seed=True),
    Record("record_set", (_LAYER, Param("success", bool), _DURATION), seed=True),
    Record("record_delete", (_LAYER, Param("success", bool), _DURATION), seed=True),
    Record("record_circuit_state", (_LAYER, Param("state", int)), seed=True),
    Record("record_queue_depth", (_LAYER, Param("depth", int)), seed=True),
    Record("record_write_dropped", (_LAYER, Param("reason", str, "queue_full")), seed=True),
    Record("record_async_write", (_LAYER, Param("success", bool), _DURATION), seed=True),
    Record(
        "record_chain_get",
        (Param("hit", bool), Param("layer_index", int), Param("total_duration", float)),
        seed=True,
    ),
    Record("record_error", (_LAYER, Param("operation", str), Param("error_type", str))),
    Record("record_circuit_rejected", (_LAYER,)),
    Record("record_queue_capacity", (_LAYER, Param("capacity", int))),
    Record("record_load", (Param("success", bool), _DURATION)),
    Record("record_singleflight_shared", ()),
    Record("record_evictions", (_LAYER, Param("count", int))),
    Record("record_entries", (_LAYER, Param("entries", int))),
    Record("record_invalidations_published", (Param("count", int),)),
    Record("record_invalidations_applied", (Param("count", int), Param("lag", float))),
    Record("record_coherence_lost", (Param("reason", str),)),
    Record("record_fail_safe", (Param("reason", str),)),
    Record("record_background_load", (Param("outcome", str),)),
    Record("record_eager_refresh", ()),
    Record("record_lease", (Param("outcome", str),)),
    Record("record_lease_wait", (_DURATION,)),
    Record("record_backfill_skipped", (_LAYER, Param("reason", str))),
    Record("record_repairs_pending", (_LAYER, Param("repairs", int))),
    Record("record_nodes_down", (_LAYER, Param("nodes", int))),
    Record("record_connections", (_LAYER, Param("connections", int))),
    Record("record_pool_exhausted", (_LAYER, Param("count", int))),
    Record("record_corrupt_values", (_LAYER, Param("count", int))),
    Record(
        "record_first_layer_hit",
        (_LAYER, _DURATION),
        stands_for=(
            ("record_get", {"layer": Arg("layer"), "hit": True, "duration": Arg("duration")}),
            (
                "record_chain_get",
                {"hit": True, "layer_index": 0, "total_duration": Arg("duration")},
            ),
        ),
    ),
)

#: The seed's eight methods: every collector must have them.
SEED_METHODS: tuple[str, ...] = tuple(r.name for r in RECORDS if r.seed)
#: Every ``record_*`` method, in catalogue order.
RECORD_METHODS: tuple[str, ...] = tuple(r.name for r in RECORDS)
_RECORDS = {r.name: r for r in RECORDS}


def find_record(name: str) -> Record:
    """The :class:`Record` of the method ``name``; raises ``KeyError`` for another name."""
    return _RECORDS[name]


# -- metrics --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Feed:
    """How calls of one ``record_*`` method feed a metric.

    ``labels`` gives each label but ``chain`` and ``layer`` (taken from the chain and
    the ``layer`` argument): a literal value, or an :class:`Arg`. ``when``: only calls
    whose bool argument (first) has that value (second). ``value``: the argument a
    counter adds (an amount below one adds nothing; without ``value`` each call counts
    one), a histogram observes (seconds) or a gauge keeps. ``on_change``: only calls
    that change the gauge the same call sets (a transition; the first value reported
    may count as a change from 0 or not at all, as a collector keeps it).
    """

    record: str
    labels: Mapping[str, str | Arg] = field(default_factory=dict)
    when: tuple[str, bool] | None = None
    value: str | None = None
    on_change: bool = False

    def applies(self, args: Mapping[str, Any]) -> bool:
        """Whether a call with ``args`` (by parameter name) feeds the metric."""
        return self.when is None or bool(args[self.when[0]]) is self.when[1]


@dataclass(frozen=True)
class Field:
    """A field of the snapshot a metric fills: of
    :class:`~cachechain.metrics.CacheMetrics` for a metric labelled by layer, else of
    :class:`~cachechain.metrics.ChainMetrics`. ``where``: only the series with these
    label values; ``by``: a dict by that label's value (non-zero entries) instead of a
    total. A histogram fills a :class:`~cachechain.metrics.LatencyStats`."""

    name: str
    where: Mapping[str, str] = field(default_factory=dict)
    by: str | None = None


@dataclass(frozen=True)
class Metric:
    """One metric family.

    ``name`` follows the namespace (``hits_total`` is ``cache_chain_hits_total``);
    ``kind`` is :data:`COUNTER`, :data:`GAUGE` or :data:`HISTOGRAM`; ``labels`` start
    with ``chain`` (then ``layer`` for a metric of layers); ``values`` lists the values
    of the other labels, and ``positions`` names the label that holds a layer's
    position (shown as its name; ``unknown`` past the layers a chain declared).
    ``unit`` is ``seconds`` for durations; ``buckets`` are a histogram's default bucket
    bounds (seconds). ``merge``: how equal series of several chains, collectors or
    processes combine, ``sum`` or ``max``. ``always``: label values (patterns) of the
    series exported with zeros for the layers and positions a chain declared (``{}``:
    all of them); ``shown_with``: a gauge whose being reported for a layer shows this
    metric's zeros too (a metric of async writers or breakers is exported for the
    layers that have one). Any other series is exported once it is non-zero or
    reported.

    Two kinds of gauge are fed by no ``record_*`` call (``feeds`` is empty):
    ``one_hot_of`` names the gauge (of the same labels but the last) this one shows as
    one series per value of its last label, 1 for the value the gauge holds (its index
    in :attr:`values`) and 0 for the others; ``info`` marks a constant 1 whose labels
    describe the chain or a layer, reported once when a chain is built (see
    :meth:`~cachechain.metrics.MetricsCollector.add_info`).
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str
    feeds: tuple[Feed, ...]
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    positions: str | None = None
    unit: str = ""
    buckets: tuple[float, ...] = ()
    merge: str = "sum"
    always: tuple[Mapping[str, str], ...] = ()
    shown_with: str | None = None
    fields: tuple[Field, ...] = ()
    one_hot_of: str | None = None
    info: bool = False

    @property
    def per_layer(self) -> bool:
        """Whether the metric has a series per layer (a ``layer`` label)."""
        return "layer" in self.labels

    @property
    def extra_labels(self) -> tuple[str, ...]:
        """The labels after ``chain`` and ``layer``, in order."""
        return tuple(n for n in self.labels if n not in ("chain", "layer"))

    @property
    def statsd(self) -> str:
        """The StatsD name: ``name`` without ``_total`` and without its unit."""
        base = self.name.removesuffix("_total")
        return base.removesuffix(f"_{self.unit}") if self.unit else base

    def cells(self, positions: int = 0) -> tuple[tuple[Any, ...], ...]:
        """Every combination of the values of :attr:`extra_labels` that the feeds can
        produce, in a fixed order; a position label takes ``0`` to ``positions`` (the
        last standing for every position past it)."""
        seen: dict[tuple[Any, ...], None] = {}
        for feed in self.feeds:
            choices = [self._choices(feed, name, positions) for name in self.extra_labels]
            for cell in itertools.product(*choices):
                seen[cell] = None
        return tuple(seen)

    def _choices(self, feed: Feed, label: str, positions: int) -> tuple[Any, ...]:
        source = feed.labels[label]
        if not isinstance(source, Arg):
            return (source,)
        if label == self.positions:
            return tuple(range(positions + 1))
        return self.values[label]

    def cell(self, feed: Feed, args: Mapping[str, Any]) -> tuple[Any, ...]:
        """The label values (after ``chain`` and ``layer``) a call with ``args`` feeds,
        as they come: a value may lie outside :attr:`values` (a position is an int)."""
        return tuple(self._value(feed, name, args) for name in self.extra_labels)

    def _value(self, feed: Feed, label: str, args: Mapping[str, Any]) -> Any:
        source = feed.labels[label]
        if not isinstance(source, Arg):
            return source
        value = args[source.name]
        if label == self.positions or isinstance(value, str):
            return value
        values = self.values[label]
        if isinstance(value, bool):
            return values[0] if value else values[1]
        return values[value] if 0 <= value < len(values) else value


_CL = ("chain", "layer")
_SUCCESS = {"result": Arg("success")}

#: Every metric family, in exposition order.
METRICS: tuple[Metric, ...] = (
    Metric(
        "hits_total",
        COUNTER,
        _CL,
        "Gets of one key that found it in the layer.",
        feeds=(Feed("record_get", when=("hit", True)),),
        always=({},),
        fields=(Field("hits"),),
    ),
    Metric(
        "misses_total",
        COUNTER,
        _CL,
        "Gets of one key the layer did not have (clean).",
        feeds=(Feed("record_get", when=("hit", False)),),
        always=({},),
        fields=(Field("misses"),),
    ),
    Metric(
        "errors_total",
        COUNTER,
        (*_CL, "operation", "error_type"),
        "Calls to the layer that failed, by operation and error type (not misses).",
        feeds=(
            Feed(
                "record_error",
                {"operation": Arg("operation"), "error_type": Arg("error_type")},
            ),
        ),
        values={"operation": OPERATIONS, "error_type": ERROR_TYPES},
        always=({},),
        fields=(Field("errors"), Field("errors_by_type", by="error_type")),
    ),
    Metric(
        "operation_duration_seconds",
        HISTOGRAM,
        (*_CL, "operation"),
        "Duration of calls to the layer (get: per key; set, delete: per call).",
        feeds=tuple(
            Feed(f"record_{op}", {"operation": op}, value="duration")
            for op in ("get", "set", "delete")
        ),
        values={"operation": ("get", "set", "delete")},
        always=({},),
        fields=(
            Field("get_latency", where={"operation": "get"}),
            Field("set_latency", where={"operation": "set"}),
        ),
        unit="seconds",
        buckets=DEFAULT_BUCKETS,
    ),
    Metric(
        "operations_total",
        COUNTER,
        (*_CL, "operation", "result"),
        "Synchronous sets and deletes of the layer, by result.",
        feeds=tuple(
            Feed(f"record_{op}", {"operation": op, **_SUCCESS}) for op in ("set", "delete")
        ),
        values={"operation": ("set", "delete"), "result": RESULTS},
        always=({},),
        fields=(
            Field("sets", where={"operation": "set"}),
            Field("deletes", where={"operation": "delete"}),
        ),
    ),
    Metric(
        "requests_total",
        COUNTER,
        ("chain", "result", "served_by"),
        "Logical gets of the chain, by result and the layer that served them.",
        feeds=(
            Feed(
                "record_chain_get",
                {"result": "hit", "served_by": Arg("layer_index")},
                when=("hit", True),
            ),
            Feed("record_chain_get", {"result": "miss", "served_by": "none"}, when=("hit", False)),
        ),
        values={"result": HIT_MISS},
        positions="served_by",
        always=({},),
        fields=(
            Field("total_hits", where={"result": "hit"}),
            Field("total_misses", where={"result": "miss"}),
            Field("hits_by_layer", where={"result": "hit"}, by="served_by"),
        ),
    ),
    Metric(
        "request_duration_seconds",
        HISTOGRAM,
        ("chain", "result"),
        "Duration of logical gets of the chain, through every layer asked.",
        feeds=(Feed("record_chain_get", {"result": Arg("hit")}, value="total_duration"),),
        values={"result": HIT_MISS},
        always=({},),
        fields=(Field("latency"),),
        unit="seconds",
        buckets=DEFAULT_BUCKETS,
    ),
    Metric(
        "loads_total",
        COUNTER,
        ("chain", "result"),
        "Loader calls, by result.",
        feeds=(Feed("record_load", _SUCCESS),),
        values={"result": RESULTS},
        always=({},),
        fields=(Field("loads"), Field("load_failures", where={"result": "failure"})),
    ),
    Metric(
        "load_duration_seconds",
        HISTOGRAM,
        ("chain",),
        "Duration of loader calls.",
        feeds=(Feed("record_load", value="duration"),),
        always=({},),
        fields=(Field("load_latency"),),
        unit="seconds",
        buckets=DEFAULT_BUCKETS,
    ),
    Metric(
        "singleflight_shared_total",
        COUNTER,
        ("chain",),
        "Callers that joined a load already in flight instead of running the loader.",
        feeds=(Feed("record_singleflight_shared"),),
        always=({},),
        fields=(Field("singleflight_shared"),),
    ),
    Metric(
        "queue_depth",
        GAUGE,
        _CL,
        "Writes queued in the layer's async writer.",
        feeds=(Feed("record_queue_depth", value="depth"),),
        fields=(Field("queue_depth"),),
    ),
    Metric(
        "queue_capacity",
        GAUGE,
        _CL,
        "Bound of the layer's async writer queue.",
        feeds=(Feed("record_queue_capacity", value="capacity"),),
        fields=(Field("queue_capacity"),),
    ),
    Metric(
        "repairs_pending",
        GAUGE,
        _CL,
        "Keys whose repair delete waits for a retry in the layer's async writer (the "
        "layer may hold an older value of each).",
        feeds=(Feed("record_repairs_pending", value="repairs"),),
        fields=(Field("repairs_pending"),),
    ),
    Metric(
        "writes_dropped_total",
        COUNTER,
        (*_CL, "reason"),
        "Writes the layer's async writer dropped, by reason.",
        feeds=(Feed("record_write_dropped", {"reason": Arg("reason")}),),
        values={"reason": DROP_REASONS},
        shown_with="queue_capacity",
        fields=(Field("dropped_writes"), Field("dropped_by_reason", by="reason")),
    ),
    Metric(
        "async_writes_total",
        COUNTER,
        (*_CL, "result"),
        "Writes made by the layer's async writer, by result.",
        feeds=(Feed("record_async_write", _SUCCESS),),
        values={"result": RESULTS},
        shown_with="queue_capacity",
        fields=(Field("async_writes"), Field("failed_writes", where={"result": "failure"})),
    ),
    Metric(
        "async_write_duration_seconds",
        HISTOGRAM,
        _CL,
        "Duration of writes made by the layer's async writer.",
        feeds=(Feed("record_async_write", value="duration"),),
        shown_with="queue_capacity",
        unit="seconds",
        buckets=DEFAULT_BUCKETS,
    ),
    Metric(
        "circuit_state",
        GAUGE,
        _CL,
        "State of the layer's circuit breaker: 0 closed, 1 open, 2 half-open.",
        feeds=(Feed("record_circuit_state", value="state"),),
        merge="max",
        fields=(Field("circuit_state"),),
    ),
    Metric(
        "circuit_breaker_state",
        GAUGE,
        (*_CL, "state"),
        "State of the layer's circuit breaker: 1 for the current state, 0 for the others.",
        feeds=(),
        values={"state": CIRCUIT_STATES},
        merge="max",
        one_hot_of="circuit_state",
    ),
    Metric(
        "circuit_transitions_total",
        COUNTER,
        (*_CL, "to"),
        "Transitions of the layer's circuit breaker, by the state entered.",
        feeds=(Feed("record_circuit_state", {"to": Arg("state")}, on_change=True),),
        values={"to": CIRCUIT_STATES},
        shown_with="circuit_state",
        fields=(Field("circuit_opens", where={"to": "open"}),),
    ),
    Metric(
        "circuit_rejected_total",
        COUNTER,
        _CL,
        "Calls the layer's open circuit breaker refused without any I/O.",
        feeds=(Feed("record_circuit_rejected"),),
        shown_with="circuit_state",
        fields=(Field("circuit_rejected"),),
    ),
    Metric(
        "evictions_total",
        COUNTER,
        _CL,
        "Entries the in-process layer evicted.",
        feeds=(Feed("record_evictions", value="count"),),
        shown_with="entries",
        fields=(Field("evictions"),),
    ),
    Metric(
        "entries",
        GAUGE,
        _CL,
        "Entries held by the in-process layer.",
        feeds=(Feed("record_entries", value="entries"),),
        fields=(Field("entries"),),
    ),
    Metric(
        "backfills_skipped_total",
        COUNTER,
        (*_CL, "reason"),
        "Backfills into the layer (copies of a value a lower layer had) not made, by reason.",
        feeds=(Feed("record_backfill_skipped", {"reason": Arg("reason")}),),
        values={"reason": BACKFILL_SKIP_REASONS},
        always=({},),
        fields=(
            Field("backfills_skipped"),
            Field("backfills_skipped_by_reason", by="reason"),
        ),
    ),
    Metric(
        "layer_nodes_down",
        GAUGE,
        _CL,
        "Servers of the remote layer marked down (memcached).",
        feeds=(Feed("record_nodes_down", value="nodes"),),
        merge="max",
        fields=(Field("nodes_down"),),
    ),
    Metric(
        "layer_connections",
        GAUGE,
        _CL,
        "Connections of the remote layer open now (memcached).",
        feeds=(Feed("record_connections", value="connections"),),
        fields=(Field("connections"),),
    ),
    Metric(
        "layer_pool_exhausted_total",
        COUNTER,
        _CL,
        "Calls to the remote layer refused because no pooled connection became free in "
        "time (memcached).",
        feeds=(Feed("record_pool_exhausted", value="count"),),
        shown_with="layer_connections",
        fields=(Field("pool_exhausted"),),
    ),
    Metric(
        "layer_corrupt_values_total",
        COUNTER,
        _CL,
        "Values read from the remote layer that could not be decoded (memcached).",
        feeds=(Feed("record_corrupt_values", value="count"),),
        shown_with="layer_connections",
        fields=(Field("corrupt_values"),),
    ),
    Metric(
        "invalidations_published_total",
        COUNTER,
        ("chain",),
        "Keys this process changed and told the other processes to drop.",
        feeds=(Feed("record_invalidations_published", value="count"),),
        always=({},),
        fields=(Field("invalidations_published"),),
    ),
    Metric(
        "invalidations_applied_total",
        COUNTER,
        ("chain",),
        "Keys other processes changed that this process dropped from its in-process layers.",
        feeds=(Feed("record_invalidations_applied", value="count"),),
        always=({},),
        fields=(Field("invalidations_applied"),),
    ),
    Metric(
        "invalidation_lag_seconds",
        HISTOGRAM,
        ("chain",),
        "Seconds from another process's publication of a change to its application here.",
        feeds=(Feed("record_invalidations_applied", value="lag"),),
        always=({},),
        fields=(Field("invalidation_lag"),),
        unit="seconds",
        buckets=LAG_BUCKETS,
    ),
    Metric(
        "coherence_lost_total",
        COUNTER,
        ("chain", "reason"),
        "Times this process lost track of other processes' changes and dropped every "
        "in-process entry, by reason.",
        feeds=(Feed("record_coherence_lost", {"reason": Arg("reason")}),),
        values={"reason": LOST_REASONS},
        always=({},),
        fields=(Field("coherence_lost"), Field("coherence_lost_by_reason", by="reason")),
    ),
    Metric(
        "fail_safe_served_total",
        COUNTER,
        ("chain", "reason"),
        "Fail-safe values (expired copies) get_or_load served instead of a loaded value, "
        "by reason.",
        feeds=(Feed("record_fail_safe", {"reason": Arg("reason")}),),
        values={"reason": FAIL_SAFE_REASONS},
        always=({},),
        fields=(Field("fail_safe_served"), Field("fail_safe_by_reason", by="reason")),
    ),
    Metric(
        "background_loads_total",
        COUNTER,
        ("chain", "outcome"),
        "Loads run on a background thread (loader timeouts, eager refreshes), by outcome.",
        feeds=(Feed("record_background_load", {"outcome": Arg("outcome")}),),
        values={"outcome": BACKGROUND_OUTCOMES},
        always=({},),
        fields=(
            Field("background_loads"),
            Field("background_loads_by_outcome", by="outcome"),
        ),
    ),
    Metric(
        "eager_refreshes_total",
        COUNTER,
        ("chain",),
        "Background reloads started by a hit past the eager-refresh share of its TTL.",
        feeds=(Feed("record_eager_refresh"),),
        always=({},),
        fields=(Field("eager_refreshes"),),
    ),
    Metric(
        "leases_total",
        COUNTER,
        ("chain", "outcome"),
        "Leases asked of the shared layer by get_or_load on a miss, by outcome.",
        feeds=(Feed("record_lease", {"outcome": Arg("outcome")}),),
        values={"outcome": LEASE_OUTCOMES},
        always=({},),
        fields=(Field("leases"), Field("leases_by_outcome", by="outcome")),
    ),
    Metric(
        "lease_wait_duration_seconds",
        HISTOGRAM,
        ("chain",),
        "Seconds a get_or_load waited for another process's load (its lease).",
        feeds=(Feed("record_lease_wait", value="duration"),),
        always=({},),
        fields=(Field("lease_wait_latency"),),
        unit="seconds",
        buckets=DEFAULT_BUCKETS,
    ),
    Metric(
        "info",
        GAUGE,
        ("chain", "version", "layers"),
        "The chain: cachechain's version and the types of its layers, fastest first (always 1).",
        feeds=(),
        merge="max",
        info=True,
    ),
    Metric(
        "layer_info",
        GAUGE,
        (
            *_CL,
            "type",
            "timeout_seconds",
            "breaker_max_failures",
            "breaker_reset_timeout_seconds",
        ),
        "A layer of the chain: its type, call timeout and breaker settings ('none' when "
        "it has none; always 1).",
        feeds=(),
        merge="max",
        info=True,
    ),
)
_METRICS = {m.name: m for m in METRICS}


def find_metric(name: str) -> Metric:
    """The :class:`Metric` called ``name`` (without the namespace); raises ``KeyError``
    for another name."""
    return _METRICS[name]


def series_params(name: str) -> tuple[str, ...]:
    """The parameters of the ``record_*`` method ``name`` that choose the series a call
    feeds, in order: ``layer``, and those that give a label value or decide whether a
    feed applies (the others are amounts, durations and gauge values)."""
    used = {"layer"}
    for _, feed in feeds_of(name):
        used |= {s.name for s in feed.labels.values() if isinstance(s, Arg)}
        if feed.when is not None:
            used.add(feed.when[0])
    return tuple(n for n in find_record(name).param_names if n in used)


def feeds_of(name: str) -> Iterator[tuple[Metric, Feed]]:
    """Every (metric, feed) pair fed by the ``record_*`` method ``name``, in catalogue
    order (none for a fused record: see :attr:`Record.stands_for`)."""
    for m in METRICS:
        for feed in m.feeds:
            if feed.record == name:
                yield m, feed

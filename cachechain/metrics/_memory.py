"""MemoryCollector, and the lock-free accumulating engine it shares with the Prometheus
collector.

Recording must cost little next to an in-process cache hit (a few hundred ns), so no
lock and no shared counter is touched on the request path. Each thread records into
its own flat list of numbers (held in a ``threading.local``); the slots of every
series are resolved once, when a chain binds to the collector
(:meth:`AccumulatingCollector.bind_chain`), so a hit is one thread-local read, one
bucket search and two list increments. Only the owning thread writes its list, so every
count is exact however many threads record at once. Readers (a snapshot, a scrape, a
flush) add the lists up under a lock; the lists of threads that ended are folded into
a per-chain total and dropped, so memory follows the number of live threads, never the
traffic. Keys are never recorded: memory is a fixed set of numbers per chain and layer.

A read sees each thread's list at one instant; figures recorded by other threads
during the read may or may not be included, and each is exact once they stop.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import ERROR_TYPES
from ._base import RECORD_METHODS, MetricsCollector, never_raises
from ._types import (
    BUCKET_BOUNDS,
    CacheMetrics,
    ChainMetrics,
    LatencyHistogram,
    MetricsSnapshot,
)

__all__ = [
    "CIRCUIT_STATES",
    "DROP_REASONS",
    "MAX_LAYERS",
    "OPERATIONS",
    "AccumulatingCollector",
    "ChainView",
    "MemoryCollector",
    "ViewData",
]

log = logging.getLogger("cachechain.metrics")

#: ``operation`` label values of errors; anything else is counted as ``other``.
OPERATIONS: tuple[str, ...] = (
    "get",
    "set",
    "delete",
    "get_many",
    "set_many",
    "delete_many",
    "close",
    "other",
)
#: ``reason`` label values of dropped writes; anything else is counted as ``other``.
DROP_REASONS: tuple[str, ...] = ("queue_full", "circuit_open", "closed", "other")
#: Breaker states by value (0, 1, 2): the ``to`` label of circuit transitions.
CIRCUIT_STATES: tuple[str, ...] = ("closed", "open", "half_open")
#: Distinct layer names one chain may report; names past it are ignored (logged once).
MAX_LAYERS = 64
_MIN_INDEX_SLOTS = 8

_OP_INDEX = {name: i for i, name in enumerate(OPERATIONS)}
_ERR_INDEX = {name: i for i, name in enumerate(ERROR_TYPES)}
_REASON_INDEX = {name: i for i, name in enumerate(DROP_REASONS)}
_OTHER_OP = _OP_INDEX["other"]
_OTHER_ERR = _ERR_INDEX["other"]
_OTHER_REASON = _REASON_INDEX["other"]

# Slots of a layer's block (relative to the block's start).
L_HITS, L_MISSES, L_REJECTED, L_EVICTIONS = 0, 1, 2, 3
L_SET_OK, L_SET_FAIL, L_DEL_OK, L_DEL_FAIL, L_ASYNC_OK, L_ASYNC_FAIL = 4, 5, 6, 7, 8, 9
L_DROPPED = 10
L_ERRORS = L_DROPPED + len(DROP_REASONS)
_L_HISTS = L_ERRORS + len(OPERATIONS) * len(ERROR_TYPES)
# Slots of a chain's block (at the start of its list).
C_MISS, C_LOAD_OK, C_LOAD_FAIL, C_SHARED, C_HIT = 0, 1, 2, 3, 4


Acc = list[Any]  # one thread's numbers for one chain: ints, and floats for sums and maxima


def _alive(thread: threading.Thread) -> bool:
    try:
        return thread.is_alive()
    except Exception:  # a _DummyThread after fork asserts
        return False


@dataclass(frozen=True)
class Hist:
    """One histogram read from the accumulators: per-bucket counts (not cumulative,
    the last one above every bound), the sum and the largest value (seconds)."""

    counts: list[int]
    total: float
    max: float

    @property
    def count(self) -> int:
        """How many durations were counted."""
        return sum(self.counts)

    def __add__(self, other: Hist) -> Hist:
        return Hist(
            list(map(operator.add, self.counts, other.counts)),
            self.total + other.total,
            max(self.max, other.max),
        )


@dataclass
class ViewData:
    """What one chain recorded, read at one point: the merged numbers and the gauges.

    ``layers`` lists the layer names in order (bound first), ``offsets`` where each
    layer's block starts in ``totals``; ``bound`` is how many of them the chain was
    built with. Gauges are the latest values reported, by layer name.
    """

    chain: str
    layers: list[str]
    bound: int
    offsets: dict[str, int]
    totals: list[Any]
    index_slots: int
    layout: Layout
    fh: int
    req_hit: int
    req_miss: int
    load: int
    queue_depth: dict[str, int] = field(default_factory=dict)
    queue_capacity: dict[str, int] = field(default_factory=dict)
    circuit_state: dict[str, int] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)
    transitions: dict[tuple[str, int], int] = field(default_factory=dict)

    def hist(self, offset: int) -> Hist:
        """The histogram whose block starts at ``offset``."""
        nb = self.layout.nb
        t = self.totals
        return Hist(list(t[offset : offset + nb]), t[offset + nb], t[offset + nb + 1])

    def layer_hist(self, layer: str, which: str) -> Hist:
        """``which`` (``get``, ``set``, ``delete`` or ``async``) histogram of ``layer``,
        first-layer hits included in the first layer's ``get``."""
        h = self.hist(self.offsets[layer] + self.layout.histograms[which])
        if which == "get" and self.bound and layer == self.layers[0]:
            h = h + self.hist(self.fh)
        return h

    def layer_value(self, layer: str, slot: int) -> Any:
        """The counter at ``slot`` (an ``L_*`` constant) of ``layer``; first-layer hits
        included in the first layer's hits."""
        value = self.totals[self.offsets[layer] + slot]
        if slot == L_HITS and self.bound and layer == self.layers[0]:
            value += self.first_layer_hits()
        return value

    def first_layer_hits(self) -> int:
        """Gets served by the first layer through ``record_first_layer_hit``."""
        return sum(self.totals[self.fh : self.fh + self.layout.nb])

    def hits_by_index(self) -> list[int]:
        """Chain gets served by each layer position (the last slot counts positions
        past the others), first-layer hits included."""
        start = C_HIT
        hits = list(self.totals[start : start + self.index_slots + 1])
        if self.bound:
            hits[0] += self.first_layer_hits()
        return hits

    def request_hist(self, hit: bool) -> Hist:
        """Duration of logical gets that hit (first-layer hits included) or missed."""
        if not hit:
            return self.hist(self.req_miss)
        h = self.hist(self.req_hit)
        return h + self.hist(self.fh) if self.bound else h


class Layout:
    """Where each series sits in a thread's list, for histograms of ``bounds``.

    A histogram takes ``nb = len(bounds) + 1`` bucket slots, then its sum and its max.
    A chain's list is its chain block (``chain_size(k)`` slots, ``k`` layer positions)
    followed by one block of ``layer_size`` slots per layer.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.nb = len(self.bounds) + 1
        self.hsize = self.nb + 2
        self.get = _L_HISTS
        self.set = self.get + self.hsize
        self.delete = self.set + self.hsize
        self.async_ = self.delete + self.hsize
        self.layer_size = self.async_ + self.hsize
        #: Offset of each operation's histogram in a layer's block.
        self.histograms = {
            "get": self.get,
            "set": self.set,
            "delete": self.delete,
            "async": self.async_,
        }

    def chain_offsets(self, k: int) -> tuple[int, int, int, int, int]:
        """Offsets of the fused first-layer-hit, hit, miss and load histograms, and
        the chain block's size, for ``k`` layer positions."""
        fh = C_HIT + k + 1
        req_hit = fh + self.hsize
        req_miss = req_hit + self.hsize
        load = req_miss + self.hsize
        return fh, req_hit, req_miss, load, load + self.hsize


class ChainView(MetricsCollector):
    """What :meth:`AccumulatingCollector.bind_chain` returns: the collector as seen by
    one chain, with each series' slot resolved in advance.

    Its ``record_*`` methods are plain closures set on the instance (no lookups on the
    request path) and never raise for well-typed arguments. Layer names the chain was
    not built with are added on first use, up to :data:`MAX_LAYERS`.
    """

    def __init__(self, engine: AccumulatingCollector, chain: str, layers: Sequence[str]) -> None:
        self.engine = engine
        self.chain = chain
        lay = engine.layout
        self.layout = lay
        self.index_slots = max(len(layers), _MIN_INDEX_SLOTS)
        self.fh, self.req_hit, self.req_miss, self.load, chain_size = lay.chain_offsets(
            self.index_slots
        )
        self.layers: list[str] = []
        self.bound = len(layers)
        self.offsets: dict[str, int] = {}
        self.size = chain_size
        self.max_slots: list[int] = [
            h + lay.nb + 1 for h in (self.fh, self.req_hit, self.req_miss, self.load)
        ]
        self.accs: list[tuple[threading.Thread, Acc]] = []
        self.retired: Acc = [0] * chain_size
        self.baseline: Acc = [0] * chain_size
        self.tl = threading.local()
        self.queue_depth: dict[str, int] = {}
        self.queue_capacity: dict[str, int] = {}
        self.circuit_state: dict[str, int] = {}
        self.entries: dict[str, int] = {}
        self.transitions: dict[tuple[str, int], int] = {}
        self._warned = False
        for name in layers:
            self._add_layer_locked(str(name))
        self._install(engine.track_max, engine.track_sum)

    # -- layout ------------------------------------------------------------------------
    def add_layer(self, name: str) -> int | None:
        """Return the offset of ``name``'s block, adding it if new; ``None`` past
        :data:`MAX_LAYERS` names."""
        with self.engine._lock:
            return self._add_layer_locked(name)

    def _add_layer_locked(self, name: str) -> int | None:
        base = self.offsets.get(name)
        if base is not None:
            return base
        if len(self.layers) >= MAX_LAYERS:
            if not self._warned:
                self._warned = True
                log.warning(
                    "chain %r reported more than %d layer names; %r and later new names "
                    "are not recorded",
                    self.chain,
                    MAX_LAYERS,
                    name,
                )
            return None
        lay = self.layout
        base = self.size
        grow = [0] * lay.layer_size
        for _, acc in self.accs:
            acc.extend(grow)
        self.retired.extend(grow)
        self.baseline.extend(grow)
        self.size += lay.layer_size
        self.max_slots += [
            base + h + lay.nb + 1 for h in (lay.get, lay.set, lay.delete, lay.async_)
        ]
        self.layers.append(name)
        self.offsets[name] = base  # published last: the lists are already long enough
        return base

    def _register(self) -> Acc:
        """Create, register and return the calling thread's list."""
        engine = self.engine
        with engine._lock:
            engine._fold_dead_locked()
            acc: Acc = [0] * self.size
            self.accs.append((threading.current_thread(), acc))
        self.tl.a = acc
        return acc

    # -- reading (the engine's lock held) ----------------------------------------------
    def _fold(self, acc: Acc) -> None:
        old = self.retired
        merged = list(map(operator.add, old, acc))
        for p in self.max_slots:
            merged[p] = max(old[p], acc[p])
        self.retired = merged

    def _raw_locked(self) -> Acc:
        total = list(self.retired)
        accs = [a for _, a in self.accs]
        for acc in accs:
            total = list(map(operator.add, total, acc))
        for p in self.max_slots:
            total[p] = max([self.retired[p], *(a[p] for a in accs)])
        return total

    def _read_locked(self) -> ViewData:
        raw = self._raw_locked()
        totals = list(map(operator.sub, raw, self.baseline))
        for p in self.max_slots:
            totals[p] = raw[p]
        return ViewData(
            chain=self.chain,
            layers=list(self.layers),
            bound=self.bound,
            offsets=dict(self.offsets),
            totals=totals,
            index_slots=self.index_slots,
            layout=self.layout,
            fh=self.fh,
            req_hit=self.req_hit,
            req_miss=self.req_miss,
            load=self.load,
            queue_depth=dict(self.queue_depth),
            queue_capacity=dict(self.queue_capacity),
            circuit_state=dict(self.circuit_state),
            entries=dict(self.entries),
            transitions=dict(self.transitions),
        )

    def _rebase_locked(self) -> None:
        """Make every figure read zero from now on (reset, or a forked child)."""
        self.baseline = self._raw_locked()
        for p in self.max_slots:
            self.baseline[p] = 0
            self.retired[p] = 0
            for _, acc in self.accs:
                acc[p] = 0
        self.transitions = {}

    # -- the record methods ------------------------------------------------------------
    def _install(self, track_max: bool, track_sum: bool) -> None:
        lay = self.layout
        bounds = lay.bounds
        b0 = bounds[0] if bounds else float("inf")
        nb = lay.nb
        search = bisect.bisect_left
        tl = self.tl
        offsets = self.offsets
        add_layer = self.add_layer
        register = self._register
        k = self.index_slots
        fh, fh_sum, fh_max = self.fh, self.fh + nb, self.fh + nb + 1
        req_hit, req_miss, load = self.req_hit, self.req_miss, self.load
        l_get, l_set, l_del, l_async = lay.get, lay.set, lay.delete, lay.async_
        first = self.layers[0] if self.bound else None
        engine = self.engine

        def acc() -> Acc:
            try:
                return tl.a  # type: ignore[no-any-return]
            except AttributeError:
                return register()

        def slot(layer: str) -> int | None:
            base = offsets.get(layer)
            return add_layer(layer) if base is None else base

        def observe(a: Acc, h: int, duration: float) -> None:
            if duration <= b0:
                a[h] += 1
            else:
                a[h + search(bounds, duration)] += 1
            if track_sum:
                a[h + nb] += duration
            if track_max and duration > a[h + nb + 1]:
                a[h + nb + 1] = duration

        def record_get(layer: str, hit: bool, duration: float) -> None:
            try:
                a = tl.a
            except AttributeError:
                a = register()
            base = offsets.get(layer)
            if base is None:
                base = add_layer(layer)
                if base is None:
                    return
            if hit:
                a[base] += 1
            else:
                a[base + 1] += 1
            h = base + l_get
            if duration <= b0:
                a[h] += 1
            else:
                a[h + search(bounds, duration)] += 1
            if track_sum:
                a[h + nb] += duration
            if track_max and duration > a[h + nb + 1]:
                a[h + nb + 1] = duration

        def record_chain_get(hit: bool, layer_index: int, total_duration: float) -> None:
            try:
                a = tl.a
            except AttributeError:
                a = register()
            if hit:
                a[C_HIT + (layer_index if 0 <= layer_index < k else k)] += 1
                h = req_hit
            else:
                a[C_MISS] += 1
                h = req_miss
            if total_duration <= b0:
                a[h] += 1
            else:
                a[h + search(bounds, total_duration)] += 1
            if track_sum:
                a[h + nb] += total_duration
            if track_max and total_duration > a[h + nb + 1]:
                a[h + nb + 1] = total_duration

        def first_layer_fallback(layer: str, duration: float) -> None:
            record_get(layer, True, duration)
            record_chain_get(True, 0, duration)

        # The hottest call of all: one specialised closure per flavour, no flag tests.
        if track_max and not track_sum:

            def record_first_layer_hit(layer: str, duration: float) -> None:
                if layer is not first and layer != first:
                    return first_layer_fallback(layer, duration)
                try:
                    a = tl.a
                except AttributeError:
                    a = register()
                if duration <= b0:
                    a[fh] += 1
                else:
                    a[fh + search(bounds, duration)] += 1
                if duration > a[fh_max]:
                    a[fh_max] = duration
                return None

        elif track_sum and not track_max:

            def record_first_layer_hit(layer: str, duration: float) -> None:
                if layer is not first and layer != first:
                    return first_layer_fallback(layer, duration)
                try:
                    a = tl.a
                except AttributeError:
                    a = register()
                if duration <= b0:
                    a[fh] += 1
                else:
                    a[fh + search(bounds, duration)] += 1
                a[fh_sum] += duration
                return None

        else:

            def record_first_layer_hit(layer: str, duration: float) -> None:
                if layer is not first and layer != first:
                    return first_layer_fallback(layer, duration)
                try:
                    a = tl.a
                except AttributeError:
                    a = register()
                observe(a, fh, duration)
                return None

        def record_set(layer: str, success: bool, duration: float) -> None:
            base = slot(layer)
            if base is not None:
                a = acc()
                a[base + (L_SET_OK if success else L_SET_FAIL)] += 1
                observe(a, base + l_set, duration)

        def record_delete(layer: str, success: bool, duration: float) -> None:
            base = slot(layer)
            if base is not None:
                a = acc()
                a[base + (L_DEL_OK if success else L_DEL_FAIL)] += 1
                observe(a, base + l_del, duration)

        def record_async_write(layer: str, success: bool, duration: float) -> None:
            base = slot(layer)
            if base is not None:
                a = acc()
                a[base + (L_ASYNC_OK if success else L_ASYNC_FAIL)] += 1
                observe(a, base + l_async, duration)

        def record_error(layer: str, operation: str, error_type: str) -> None:
            base = slot(layer)
            if base is not None:
                op = _OP_INDEX.get(operation, _OTHER_OP)
                err = _ERR_INDEX.get(error_type, _OTHER_ERR)
                acc()[base + L_ERRORS + op * len(ERROR_TYPES) + err] += 1

        def record_circuit_rejected(layer: str) -> None:
            base = slot(layer)
            if base is not None:
                acc()[base + L_REJECTED] += 1

        def record_write_dropped(layer: str, reason: str = "queue_full") -> None:
            base = slot(layer)
            if base is not None:
                acc()[base + L_DROPPED + _REASON_INDEX.get(reason, _OTHER_REASON)] += 1

        def record_evictions(layer: str, count: int) -> None:
            base = slot(layer)
            if base is not None and count > 0:
                acc()[base + L_EVICTIONS] += int(count)

        def record_load(success: bool, duration: float) -> None:
            a = acc()
            a[C_LOAD_OK if success else C_LOAD_FAIL] += 1
            observe(a, load, duration)

        def record_singleflight_shared() -> None:
            acc()[C_SHARED] += 1

        def gauge(values: dict[str, int]) -> Callable[[str, int], None]:
            def record(layer: str, value: int) -> None:
                if layer in offsets or add_layer(layer) is not None:
                    values[layer] = int(value)

            return record

        def record_circuit_state(layer: str, state: int) -> None:
            state = int(state)
            if not 0 <= state < len(CIRCUIT_STATES) or slot(layer) is None:
                return
            with engine._lock:
                previous = self.circuit_state.get(layer, 0)
                self.circuit_state[layer] = state
                if state != previous:
                    key = (layer, state)
                    self.transitions[key] = self.transitions.get(key, 0) + 1

        methods: dict[str, Callable[..., None]] = {
            "record_get": record_get,
            "record_set": record_set,
            "record_delete": record_delete,
            "record_circuit_state": record_circuit_state,
            "record_queue_depth": gauge(self.queue_depth),
            "record_write_dropped": record_write_dropped,
            "record_async_write": record_async_write,
            "record_chain_get": record_chain_get,
            "record_first_layer_hit": record_first_layer_hit,
            "record_error": record_error,
            "record_circuit_rejected": record_circuit_rejected,
            "record_queue_capacity": gauge(self.queue_capacity),
            "record_load": record_load,
            "record_singleflight_shared": record_singleflight_shared,
            "record_evictions": record_evictions,
            "record_entries": gauge(self.entries),
        }
        for name, fn in methods.items():
            setattr(self, name, never_raises(fn))

    def _use_overrides(self, overridden: Iterable[str]) -> None:
        """Route the methods a subclass of the engine overrides to the subclass."""
        names = set(overridden)
        for name in names:
            setattr(self, name, getattr(self.engine, name))
        if "record_first_layer_hit" not in names and names & {"record_get", "record_chain_get"}:
            get, chain_get = self.record_get, self.record_chain_get

            def fused(layer: str, duration: float) -> None:
                get(layer, True, duration)
                chain_get(True, 0, duration)

            self.record_first_layer_hit = fused  # type: ignore[method-assign]

    # -- the rest of the collector interface -------------------------------------------
    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        """Bind the underlying collector to another chain (see
        :meth:`AccumulatingCollector.bind_chain`)."""
        return self.engine.bind_chain(chain, layers)

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Register ``fn`` with the underlying collector (see
        :meth:`AccumulatingCollector.add_refresh_hook`)."""
        self.engine.add_refresh_hook(fn)

    def __repr__(self) -> str:
        return f"<ChainView {self.chain!r} {self.layers} of {self.engine!r}>"


_ENGINES: weakref.WeakSet[AccumulatingCollector] = weakref.WeakSet()


class AccumulatingCollector(MetricsCollector):
    """The common engine of :class:`MemoryCollector` and
    :class:`~cachechain.metrics.prometheus.PrometheusCollector`: per-thread lock-free
    accumulators, merged on read.

    ``bounds`` are the latency histograms' bucket upper bounds (seconds, ascending);
    ``track_max`` keeps the largest duration of each histogram, ``track_sum`` the sum
    of the durations (each costs a little on every call; an untracked one reads 0). A
    chain reports to the view :meth:`bind_chain` returns; the ``record_*`` methods of the collector
    itself record for a chain named ``default``. Thread-safe; every method returns
    quickly and never raises for well-typed arguments. A subclass may override any
    ``record_*`` method: chains then call the override.

    After ``os.fork()`` the child's figures start at zero. Raises ``ValueError`` when
    ``bounds`` are not ascending, positive and finite.
    """

    def __init__(self, bounds: Sequence[float], *, track_max: bool, track_sum: bool) -> None:
        bounds = tuple(float(b) for b in bounds)
        if bounds and bounds[-1] == float("inf"):
            bounds = bounds[:-1]
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket bound")
        for low, high in itertools.pairwise(bounds):
            if not low < high:
                raise ValueError(f"bucket bounds must be strictly ascending, got {bounds}")
        if not (bounds[0] > 0 and bounds[-1] < float("inf")):
            raise ValueError(f"bucket bounds must be positive and finite, got {bounds}")
        self.layout = Layout(bounds)
        self.track_max = track_max
        self.track_sum = track_sum
        self._lock = threading.Lock()
        self._views: dict[tuple[str, tuple[str, ...]], ChainView] = {}
        self._hooks: list[Callable[[], Callable[[], object] | None]] = []
        self._hook_failures = 0
        self._default = ChainView(self, "default", ())
        cls = type(self)
        self._overridden = tuple(
            name
            for name in RECORD_METHODS
            if getattr(cls, name) is not getattr(AccumulatingCollector, name)
        )
        _ENGINES.add(self)

    @property
    def bounds(self) -> tuple[float, ...]:
        """The latency buckets' upper bounds, seconds (the last bucket has none)."""
        return self.layout.bounds

    # -- binding -----------------------------------------------------------------------
    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        """Return the view a chain named ``chain`` with ``layers`` (names, fastest
        first) records through. Binding the same name and layers again returns the same
        view, so rebuilding a chain adds no series."""
        key = (str(chain), tuple(str(n) for n in layers))
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = ChainView(self, key[0], key[1])
            if self._overridden:
                view._use_overrides(self._overridden)
            with self._lock:
                view = self._views.setdefault(key, view)
        return view

    def _all_views(self) -> list[ChainView]:
        return [self._default, *self._views.values()]

    # -- refresh hooks -----------------------------------------------------------------
    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` before each read (snapshot, scrape, flush), so that figures
        polled from elsewhere are current. A hook that returns ``False`` is dropped (a
        hook of a chain that is gone, say); a bound method is held weakly (it goes when
        its object goes); any other callable is held until it returns ``False``. What
        ``fn`` raises is swallowed (logged once)."""
        ref: Callable[[], Callable[[], object] | None]
        if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
            ref = weakref.WeakMethod(fn)
        else:

            def ref() -> Callable[[], object]:
                return fn

        with self._lock:
            self._hooks.append(ref)

    def refresh(self) -> None:
        """Run the refresh hooks now (readers do it themselves)."""
        with self._lock:
            refs = list(self._hooks)
        dead = []
        for ref in refs:
            fn = ref()
            if fn is None:
                dead.append(ref)
                continue
            try:
                if fn() is False:
                    dead.append(ref)
            except Exception as exc:
                with self._lock:
                    self._hook_failures += 1
                    first = self._hook_failures == 1
                if first:
                    log.warning(
                        "metrics refresh hook %r raised %r; further failures are not logged",
                        fn,
                        exc,
                    )
        if dead:
            with self._lock:
                self._hooks = [r for r in self._hooks if r not in dead]

    # -- reading -----------------------------------------------------------------------
    def _fold_dead_locked(self) -> None:
        for view in self._all_views():
            if any(not _alive(t) for t, _ in view.accs):
                live = []
                for thread, acc in view.accs:
                    if _alive(thread):
                        live.append((thread, acc))
                    else:
                        view._fold(acc)
                view.accs = live

    def read(self) -> list[ViewData]:
        """Run the refresh hooks, then return what every chain recorded, the collector's
        own ``default`` chain first. Views that recorded nothing are included."""
        self.refresh()
        with self._lock:
            self._fold_dead_locked()
            return [view._read_locked() for view in self._all_views()]

    def live_threads(self) -> int:
        """How many per-thread lists are held (threads that recorded and may record
        again); lists of ended threads are folded in on the next read or new thread."""
        with self._lock:
            return sum(len(v.accs) for v in self._all_views())

    def reset(self) -> None:
        """Make every figure zero again (gauges forgotten too)."""
        with self._lock:
            self._fold_dead_locked()
            for view in self._all_views():
                view._rebase_locked()
                view.queue_depth.clear()
                view.queue_capacity.clear()
                view.circuit_state.clear()
                view.entries.clear()

    def _after_fork_in_child(self) -> None:
        """Start the forked child's figures at zero (its parent reports its own)."""
        self._lock = threading.Lock()
        with self._lock:
            self._fold_dead_locked()
            for view in self._all_views():
                view._rebase_locked()

    # -- direct recording (chain "default") --------------------------------------------
    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        """Count a hit or a clean miss of ``layer`` and its duration (seconds)."""
        self._default.record_get(layer, hit, duration)

    def record_set(self, layer: str, success: bool, duration: float) -> None:
        """Count a synchronous set of ``layer`` and its duration (seconds)."""
        self._default.record_set(layer, success, duration)

    def record_delete(self, layer: str, success: bool, duration: float) -> None:
        """Count a synchronous delete of ``layer`` and its duration (seconds)."""
        self._default.record_delete(layer, success, duration)

    def record_circuit_state(self, layer: str, state: int) -> None:
        """Keep ``layer``'s breaker state (0 closed, 1 open, 2 half-open) and count the
        transition when it changed; other values are ignored."""
        self._default.record_circuit_state(layer, state)

    def record_queue_depth(self, layer: str, depth: int) -> None:
        """Keep the latest queue depth of ``layer``'s async writer."""
        self._default.record_queue_depth(layer, depth)

    def record_write_dropped(self, layer: str, reason: str = "queue_full") -> None:
        """Count a write ``layer``'s async writer dropped, by ``reason``."""
        self._default.record_write_dropped(layer, reason)

    def record_async_write(self, layer: str, success: bool, duration: float) -> None:
        """Count a write made by ``layer``'s async writer and its duration (seconds)."""
        self._default.record_async_write(layer, success, duration)

    def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None:
        """Count one logical get, served by layer ``layer_index`` (-1: none), and its
        duration (seconds)."""
        self._default.record_chain_get(hit, layer_index, total_duration)

    def record_first_layer_hit(self, layer: str, duration: float) -> None:
        """Count a logical get served by the first layer ``layer`` (a hit of ``layer``
        and a chain hit) and its duration (seconds)."""
        self._default.record_first_layer_hit(layer, duration)

    def record_error(self, layer: str, operation: str, error_type: str) -> None:
        """Count a failed call to ``layer`` by operation and error type (values outside
        :data:`OPERATIONS` and ``ERROR_TYPES`` count as ``other``)."""
        self._default.record_error(layer, operation, error_type)

    def record_circuit_rejected(self, layer: str) -> None:
        """Count a call ``layer``'s open breaker refused."""
        self._default.record_circuit_rejected(layer)

    def record_queue_capacity(self, layer: str, capacity: int) -> None:
        """Keep the queue capacity of ``layer``'s async writer."""
        self._default.record_queue_capacity(layer, capacity)

    def record_load(self, success: bool, duration: float) -> None:
        """Count a loader call and its duration (seconds)."""
        self._default.record_load(success, duration)

    def record_singleflight_shared(self) -> None:
        """Count a caller that joined a load already in flight."""
        self._default.record_singleflight_shared()

    def record_evictions(self, layer: str, count: int) -> None:
        """Add ``count`` evictions of the in-process ``layer`` (ignored unless > 0)."""
        self._default.record_evictions(layer, count)

    def record_entries(self, layer: str, entries: int) -> None:
        """Keep the entry count of the in-process ``layer``."""
        self._default.record_entries(layer, entries)


def _before_fork() -> None:
    for engine in list(_ENGINES):
        engine._lock.acquire()


def _after_fork_in_parent() -> None:
    for engine in list(_ENGINES):
        engine._lock.release()


def _after_fork_in_child() -> None:
    for engine in list(_ENGINES):
        engine._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


@dataclass
class _LayerSum:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    queue_capacity: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    async_writes: int = 0
    failed_writes: int = 0
    circuit_state: int = 0
    circuit_opens: int = 0
    circuit_rejected: int = 0
    evictions: int = 0
    entries: int = 0
    get: Hist | None = None
    set: Hist | None = None


class MemoryCollector(AccumulatingCollector):
    """Collects every metric in memory: :meth:`snapshot` for a copy to assert on or to
    display, :meth:`reset` to start over.

    Thread-safe and cheap on the request path (see the module's notes); memory is fixed
    per chain and layer whatever the traffic. One collector may serve several chains:
    figures of layers with the same name add up, and so do the chain figures. Latency
    percentiles are accurate to one bucket of
    :data:`~cachechain.metrics.types.BUCKET_BOUNDS` (about 15%); maxima are exact.
    ``hits_by_layer`` counts positions past the chain's layers (and past 8) together
    under that last position.
    """

    def __init__(self) -> None:
        super().__init__(BUCKET_BOUNDS, track_max=True, track_sum=False)

    def snapshot(self) -> MetricsSnapshot:
        """Run the refresh hooks and return every figure: per layer name (layers of
        every chain, first-layer hits included) and for the chains together."""
        layers: dict[str, _LayerSum] = {}
        hits_by_index: dict[int, int] = {}
        total_hits = total_misses = loads = load_failures = shared = 0
        bounds = self.bounds
        empty = Hist([0] * self.layout.nb, 0.0, 0.0)
        latency, load_latency = empty, empty
        for data in self.read():
            for name in data.layers:
                s = layers.setdefault(name, _LayerSum())
                self._add_layer(s, data, name)
            t = data.totals
            for index, n in enumerate(data.hits_by_index()):
                if n:
                    hits_by_index[index] = hits_by_index.get(index, 0) + n
                    total_hits += n
            total_misses += t[C_MISS]
            loads += t[C_LOAD_OK] + t[C_LOAD_FAIL]
            load_failures += t[C_LOAD_FAIL]
            shared += t[C_SHARED]
            latency = latency + data.request_hist(True) + data.request_hist(False)
            load_latency = load_latency + data.hist(data.load)

        def stats(h: Hist | None) -> Any:
            h = h or empty
            return LatencyHistogram.from_counts(h.counts, h.total, h.max, bounds).stats()

        return MetricsSnapshot(
            layer_metrics={
                name: CacheMetrics(
                    hits=s.hits,
                    misses=s.misses,
                    sets=s.sets,
                    deletes=s.deletes,
                    errors=sum(s.errors.values()),
                    errors_by_type=s.errors,
                    queue_depth=s.queue_depth,
                    queue_capacity=s.queue_capacity,
                    dropped_writes=sum(s.dropped.values()),
                    dropped_by_reason=s.dropped,
                    async_writes=s.async_writes,
                    failed_writes=s.failed_writes,
                    circuit_state=s.circuit_state,
                    circuit_opens=s.circuit_opens,
                    circuit_rejected=s.circuit_rejected,
                    evictions=s.evictions,
                    entries=s.entries,
                    get_latency=stats(s.get),
                    set_latency=stats(s.set),
                )
                for name, s in layers.items()
            },
            chain_metrics=ChainMetrics(
                total_hits=total_hits,
                total_misses=total_misses,
                hits_by_layer=hits_by_index,
                loads=loads,
                load_failures=load_failures,
                singleflight_shared=shared,
                latency=stats(latency),
                load_latency=stats(load_latency),
            ),
        )

    @staticmethod
    def _add_layer(s: _LayerSum, data: ViewData, name: str) -> None:
        t = data.totals
        base = data.offsets[name]
        s.hits += data.layer_value(name, L_HITS)
        s.misses += t[base + L_MISSES]
        s.sets += t[base + L_SET_OK] + t[base + L_SET_FAIL]
        s.deletes += t[base + L_DEL_OK] + t[base + L_DEL_FAIL]
        s.async_writes += t[base + L_ASYNC_OK] + t[base + L_ASYNC_FAIL]
        s.failed_writes += t[base + L_ASYNC_FAIL]
        s.circuit_rejected += t[base + L_REJECTED]
        s.evictions += t[base + L_EVICTIONS]
        n_err = len(ERROR_TYPES)
        for op in range(len(OPERATIONS)):
            for e, error_type in enumerate(ERROR_TYPES):
                n = t[base + L_ERRORS + op * n_err + e]
                if n:
                    s.errors[error_type] = s.errors.get(error_type, 0) + n
        for r, reason in enumerate(DROP_REASONS):
            n = t[base + L_DROPPED + r]
            if n:
                s.dropped[reason] = s.dropped.get(reason, 0) + n
        s.queue_depth += data.queue_depth.get(name, 0)
        s.queue_capacity += data.queue_capacity.get(name, 0)
        s.entries += data.entries.get(name, 0)
        s.circuit_state = max(s.circuit_state, data.circuit_state.get(name, 0))
        s.circuit_opens += data.transitions.get((name, 1), 0)
        get, set_ = data.layer_hist(name, "get"), data.layer_hist(name, "set")
        s.get = get if s.get is None else s.get + get
        s.set = set_ if s.set is None else s.set + set_

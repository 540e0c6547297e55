"""The lock-free accumulating engine shared by MemoryCollector and PrometheusCollector.

Recording must cost little next to an in-process cache hit (a few hundred ns), so no
lock and no shared counter is touched on the request path. Each thread records into
its own flat list of numbers (held in a ``threading.local``); the slots of every
series are resolved once, when a chain binds to the collector
(:meth:`AccumulatingCollector.bind_chain`), from the catalogue
(:mod:`cachechain.metrics._layout`, :mod:`cachechain.metrics._recorders`), so a hit is
one thread-local read, one bucket search and two list increments. Only the owning
thread writes its list, so every count is exact however many threads record at once.
Readers (a snapshot, a scrape, a flush) add the lists up under a lock; the lists of
threads that ended are folded into a per-chain total and dropped, so memory follows
the number of live threads, never the traffic. Keys are never recorded: memory is a
fixed set of numbers per chain and layer.

A read sees each thread's list at one instant; figures recorded by other threads
during the read may or may not be included, and each is exact once they stop.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import _fork
from .._logonce import LogOnce
from ._base import HitSampler, MetricsCollector, forward_records, stand_in
from ._catalogue import GAUGE, METRICS, RECORD_METHODS, RECORDS
from ._hooks import RefreshHooks
from ._layout import Layout
from ._recorders import install, sampler
from ._series import ViewData

__all__ = ["MAX_LAYERS", "AccumulatingCollector", "ChainView"]

log = logging.getLogger("cachechain.metrics")
_log_once = LogOnce(log)
_TOKENS = itertools.count()

#: Distinct layer names one chain may report; names past it are ignored (logged once).
MAX_LAYERS = 64
#: Positions a chain counts its gets by, at least (more if it has more layers).
MIN_INDEX_SLOTS = 8
#: The fused record a :class:`~cachechain.metrics.HitSampler` stands in for.
_SAMPLED = "record_first_layer_hit"
#: Records whose override by a subclass turns hit sampling off (it expects every hit).
_SAMPLING_FEEDS = frozenset((_SAMPLED, "record_get", "record_chain_get"))

Acc = list[Any]  # one thread's numbers for one chain: ints, and floats for sums and maxima


def _alive(thread: threading.Thread) -> bool:
    try:
        return thread.is_alive()
    except Exception:  # a _DummyThread after fork asserts
        return False


class ChainView(MetricsCollector):
    """What :meth:`AccumulatingCollector.bind_chain` returns: the collector as seen by
    one chain, with each series' slot resolved in advance.

    Its ``record_*`` methods are plain closures set on the instance (no lookups on the
    request path; see :mod:`cachechain.metrics._recorders`) and never raise for
    well-typed arguments. Layer names the chain was not built with are added on first
    use, up to :data:`MAX_LAYERS`.
    """

    def __init__(self, engine: AccumulatingCollector, chain: str, layers: Sequence[str]) -> None:
        self.engine = engine
        self.chain = chain
        self.layout = lay = engine.layout
        self.index_slots = max(len(layers), MIN_INDEX_SLOTS)
        self.block = lay.chain(self.index_slots)
        self.layers: list[str] = []
        self.bound = len(layers)
        self.offsets: dict[str, int] = {}
        self.size = self.block.size
        self.max_slots: list[int] = [h + lay.nb + 1 for h in self.block.histograms]
        self.accs: list[tuple[threading.Thread, Acc]] = []
        self.retired: Acc = [0] * self.size
        self.baseline: Acc = [0] * self.size
        self.tl = threading.local()
        #: The latest value of each gauge, by layer name.
        self.gauges: dict[str, dict[str, int]] = {
            m.name: {} for m in METRICS if m.kind == GAUGE and m.feeds
        }
        #: The label values (after ``chain``) of each info metric's series.
        self.info: dict[str, dict[tuple[str, ...], None]] = {m.name: {} for m in METRICS if m.info}
        self._key = ("too many layers", next(_TOKENS))
        #: The first layer's hits a HitSampler counted (read by its repr), the number
        #: of them read as zero (a reset, a forked child), and how many of them the
        #: samples so far stand for (see :func:`~cachechain.metrics._recorders.sampler`).
        self.hits = itertools.count()
        self.hits_base = 0
        self.sampled = 0
        for name in layers:
            self._add_layer_locked(str(name))
        install(self, engine.track_max, engine.track_sum)

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
            _log_once(
                self._key,
                "chain %r reported more than %d layer names; %r and later new names "
                "are not recorded",
                self.chain,
                MAX_LAYERS,
                name,
            )
            return None
        lay = self.layout
        base = self.size
        grow = [0] * lay.layer.size
        for _, acc in self.accs:
            acc.extend(grow)
        self.retired.extend(grow)
        self.baseline.extend(grow)
        self.size += lay.layer.size
        self.max_slots += [base + h + lay.nb + 1 for h in lay.layer.histograms]
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
        first = self.offsets[self.layers[0]] if self.bound else None
        sampled = {_SAMPLED: _counted(self.hits) - self.hits_base}
        self.layout.fold_fused(totals, self.block, first, sampled)
        return ViewData(
            chain=self.chain,
            layers=list(self.layers),
            bound=self.bound,
            offsets=dict(self.offsets),
            totals=totals,
            layout=self.layout,
            block=self.block,
            gauges={name: dict(values) for name, values in self.gauges.items()},
            info={name: list(values) for name, values in self.info.items()},
        )

    def _rebase_locked(self) -> None:
        """Make every figure read zero from now on (reset, or a forked child)."""
        self.hits_base = self.sampled = _counted(self.hits)
        self.baseline = self._raw_locked()
        for p in self.max_slots:
            self.baseline[p] = 0
            self.retired[p] = 0
            for _, acc in self.accs:
                acc[p] = 0

    def _use_overrides(self, overridden: Iterable[str]) -> None:
        """Route the methods a subclass of the engine overrides to the subclass (a fused
        method it does not override then makes the calls it stands for)."""
        names = set(overridden)
        for name in names:
            setattr(self, name, getattr(self.engine, name))
        for rec in RECORDS:
            calls = {target for target, _ in rec.stands_for}
            if rec.name not in names and calls & names:
                fused = stand_in(rec, lambda name: getattr(self, name))
                setattr(self, rec.name, fused)

    # -- the rest of the collector interface -------------------------------------------
    def hit_sampler(self, layer: str) -> HitSampler | None:
        """Count the hits of the chain's first layer ``layer`` in :attr:`hits` and
        take one in the engine's ``sample_hits`` as a weighted sample (see
        :meth:`MetricsCollector.hit_sampler`); ``None`` for another layer, an unbound
        view, a ``sample_hits`` of 1, or an engine whose subclass overrides a record
        the hits feed (it wants every hit)."""
        every = self.engine.sample_hits
        if every < 2 or not self.bound or layer != self.layers[0]:
            return None
        if _SAMPLING_FEEDS & set(self.engine._overridden):
            return None
        return HitSampler(self.hits.__next__, every, sampler(self, _SAMPLED))

    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        """Bind the underlying collector to another chain (see
        :meth:`AccumulatingCollector.bind_chain`)."""
        return self.engine.bind_chain(chain, layers)

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Register ``fn`` with the underlying collector (see
        :meth:`AccumulatingCollector.add_refresh_hook`)."""
        self.engine.add_refresh_hook(fn)

    def add_info(self, metric: str, labels: Sequence[str]) -> None:
        """Keep the series of the info metric ``metric`` with ``labels`` (see
        :meth:`MetricsCollector.add_info`); an unknown metric, a wrong number of labels
        or a layer past :data:`MAX_LAYERS` is ignored. Idempotent."""
        known = self.info.get(metric)
        if known is None:
            return
        m = next(m for m in METRICS if m.name == metric)
        values = tuple(str(v) for v in labels)
        if len(values) != len(m.labels) - 1:
            return
        if m.per_layer and self.add_layer(values[0]) is None:
            return
        with self.engine._lock:
            known[values] = None

    def __repr__(self) -> str:
        return f"<ChainView {self.chain!r} {self.layers} of {self.engine!r}>"


_ENGINES: weakref.WeakSet[AccumulatingCollector] = weakref.WeakSet()


@forward_records(lambda self: self._default, "the chain ``default``")
class AccumulatingCollector(MetricsCollector):
    """The common engine of :class:`MemoryCollector` and
    :class:`~cachechain.PrometheusCollector`: per-thread lock-free
    accumulators, merged on read.

    ``bounds`` are the latency histograms' bucket upper bounds (seconds, ascending);
    ``track_max`` keeps the largest duration of each histogram, ``track_sum`` the sum
    of the durations (each costs a little on every call; an untracked one reads 0). A
    chain reports to the view :meth:`bind_chain` returns; the ``record_*`` methods of the
    collector itself record for a chain named ``default``. Thread-safe; every method
    returns quickly and never raises for well-typed arguments. A subclass may override
    any ``record_*`` method: chains then call the override.

    ``sample_hits``: a chain's ``get`` times one first-layer hit in ``sample_hits``
    and counts its duration that many times in the latency histograms (the hit
    counters stay exact; see :meth:`ChainView.hit_sampler`); 1 times every hit.

    After ``os.fork()`` the child's figures start at zero. Raises ``ValueError`` when
    ``bounds`` are not ascending, positive and finite, or ``sample_hits`` is not an int
    of at least 1.
    """

    def __init__(
        self,
        bounds: Sequence[float],
        *,
        track_max: bool,
        track_sum: bool,
        sample_hits: int = 1,
    ) -> None:
        if type(sample_hits) is not int or sample_hits < 1:
            raise ValueError(f"sample_hits must be an int of at least 1, got {sample_hits!r}")
        self.sample_hits = sample_hits
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
        self._hooks = RefreshHooks(functools.partial(_hook_failed, next(_TOKENS)))
        self._default = ChainView(self, "default", ())
        cls = type(self)
        self._overridden = tuple(
            name
            for name in RECORD_METHODS
            if getattr(cls, name) is not getattr(AccumulatingCollector, name)
        )
        # Tracked (reset in a forked child) before it is locked around forks: in the
        # other order a fork between the two leaves the child's lock held for ever.
        _fork.track(self)
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
        self._hooks.add(fn)

    def refresh(self) -> None:
        """Run the refresh hooks now (readers do it themselves)."""
        self._hooks.run()

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
                for values in view.gauges.values():
                    values.clear()

    def _after_fork(self) -> None:
        """In a forked child: a new lock, and every figure from zero (the parent reports
        its own)."""
        self._lock = threading.Lock()
        with self._lock:
            self._fold_dead_locked()
            for view in self._all_views():
                view._rebase_locked()


def _counted(counter: itertools.count[int]) -> int:
    """The next value of ``counter`` (how many times it was called, from 0), read
    without advancing it: its repr is ``count(N)``."""
    return int(repr(counter)[6:-1])


def _hook_failed(token: int, fn: Callable[[], object], exc: Exception) -> None:
    _log_once(
        ("refresh hook", token),
        "metrics refresh hook %r raised %r; further failures are not logged",
        fn,
        exc,
        debug="metrics refresh hook %r raised %r",
    )


def _lock_engines() -> None:
    for engine in list(_ENGINES):
        engine._lock.acquire()


def _unlock_engines() -> None:
    for engine in list(_ENGINES):
        engine._lock.release()


# Hold every engine's lock across a fork, so that no list is copied half-merged; the
# child replaces the lock it inherited (held) in _after_fork.
_fork.at_fork(before=_lock_engines, after_in_parent=_unlock_engines)

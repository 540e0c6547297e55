"""The metrics contract: what the chain, the breakers and the writers report.

:class:`MetricsCollector` has one method per :class:`~cachechain.metrics.Record` of the
catalogue (:data:`~cachechain.metrics.RECORDS`, the seed's eight first; the tests check
that the two agree); every method is a no-op here, so a collector overrides what it
cares about. A collector written against the seed's eight methods alone (subclass or
not) keeps working: :func:`adapt` fills in the rest. Durations are seconds as ``float``.

Collectors must be quick and must not block: they are called on the request path. A
collector that raises never fails a cache operation; its errors are counted
(:attr:`CollectorGuard.failures`) and logged once.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .._logonce import LogOnce
from ._catalogue import RECORD_METHODS, RECORDS, SEED_METHODS, Arg, Record, find_record

__all__ = [
    "RECORD_METHODS",
    "SEED_METHODS",
    "DEFAULT_SAMPLE_HITS",
    "CollectorGuard",
    "HitSampler",
    "MetricsCollector",
    "NoOpCollector",
    "adapt",
    "forward_records",
    "never_raises",
    "stand_in",
]

log = logging.getLogger("cachechain.metrics")
_log_once = LogOnce(log)
_TOKENS = itertools.count()


#: How many first-layer hits a built-in collector counts for each one it has timed, by
#: default (issue 13: two clock reads and a record per hit cost ~300 ns, as much as the
#: hit itself); the hit counters stay exact, and each timed hit stands for the hits
#: since the one before in the latency histograms.
DEFAULT_SAMPLE_HITS = 64


@dataclass(frozen=True)
class HitSampler:
    """How a collector counts a chain's first-layer hits itself and has one in
    ``every`` timed (see :meth:`MetricsCollector.hit_sampler`).

    ``count()`` is called once per first-layer hit, timed or not, from any thread: it
    must be cheap (a C-level call such as ``itertools.count().__next__``), exact under
    concurrency, and never raise; it returns how many hits it counted before this one.
    ``timed(duration, n)`` receives the duration (seconds) of a timed hit and what
    ``count`` returned for it: that duration stands for the hits counted since the
    previous sample in the latency histograms (a weighted observation, as StatsD's
    sample rates). ``every`` is at least 2.
    """

    count: Callable[[], int]
    every: int
    timed: Callable[[float, int], None]


class MetricsCollector:
    """Receives cache metrics. Subclass it and override the methods you need.

    ``layer`` is a layer's configured name; ``state`` is a breaker state (0 closed, 1
    open, 2 half-open); ``layer_index`` is the position of the layer that served a get
    (0 = the first), or -1 when none did. Every method returns quickly and never raises
    on purpose.
    """

    # -- the seed's eight methods -------------------------------------------------
    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        """One ``get`` of one key on ``layer``: a hit or a clean miss, in ``duration`` s."""

    def record_set(self, layer: str, success: bool, duration: float) -> None:
        """One synchronous ``set`` on ``layer`` (or ``set_many``, once per call)."""

    def record_delete(self, layer: str, success: bool, duration: float) -> None:
        """One synchronous ``delete`` on ``layer`` (or ``delete_many``, once per call)."""

    def record_circuit_state(self, layer: str, state: int) -> None:
        """``layer``'s breaker changed to ``state``; called once per transition."""

    def record_queue_depth(self, layer: str, depth: int) -> None:
        """The async writer of ``layer`` holds ``depth`` pending writes."""

    def record_write_dropped(self, layer: str, reason: str = "queue_full") -> None:
        """The async writer of ``layer`` dropped a write; ``reason`` is ``queue_full``,
        ``circuit_open`` or ``closed`` (collectors with the seed's one-argument form
        are called without it)."""

    def record_async_write(self, layer: str, success: bool, duration: float) -> None:
        """The async writer of ``layer`` finished one write in ``duration`` s."""

    def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None:
        """One logical ``get`` of the chain: exactly one call per key asked for."""

    # -- beyond the seed ----------------------------------------------------------
    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        """Return the collector a chain named ``chain`` with ``layers`` reports to.

        Called once when the chain is built; the default returns ``self``. Collectors
        that label by chain return a view bound to it (and can pre-bind their series).
        """
        return self

    def record_first_layer_hit(self, layer: str, duration: float) -> None:
        """A logical get served by the first layer in ``duration`` s: the same as
        ``record_get(layer, True, duration)`` then ``record_chain_get(True, 0,
        duration)``, which is what this default does. The chain's hottest path makes
        this one call, so a collector can override it to do both in one step."""
        self.record_get(layer, True, duration)
        self.record_chain_get(True, 0, duration)

    def record_error(self, layer: str, operation: str, error_type: str) -> None:
        """A call to ``layer`` failed; ``error_type`` is one of
        :data:`cachechain._errors.ERROR_TYPES`. Not called for misses."""

    def record_circuit_rejected(self, layer: str) -> None:
        """``layer``'s open breaker refused a call without any I/O."""

    def record_queue_capacity(self, layer: str, capacity: int) -> None:
        """The async writer of ``layer`` holds at most ``capacity`` pending writes."""

    def record_load(self, success: bool, duration: float) -> None:
        """The loader of ``get_or_load`` ran once, for ``duration`` s."""

    def record_singleflight_shared(self) -> None:
        """A caller joined a load already in flight instead of running the loader."""

    def record_evictions(self, layer: str, count: int) -> None:
        """The in-process ``layer`` evicted ``count`` more entries to make room."""

    def record_entries(self, layer: str, entries: int) -> None:
        """The in-process ``layer`` holds ``entries`` entries."""

    def record_invalidations_published(self, count: int) -> None:
        """This process changed ``count`` keys in the shared layer and published them
        for the other processes to drop from their in-process layers."""

    def record_invalidations_applied(self, count: int, lag: float) -> None:
        """``count`` keys another process changed were dropped from this process's
        in-process layers, ``lag`` seconds after that process published them."""

    def record_coherence_lost(self, reason: str) -> None:
        """This process lost track of other processes' changes (``reason``: one of
        :data:`~cachechain.metrics.LOST_REASONS`) and dropped every in-process entry."""

    def record_fail_safe(self, reason: str) -> None:
        """``get_or_load`` served a fail-safe value (an expired copy) instead of a
        loaded one (``reason``: one of :data:`~cachechain.metrics.FAIL_SAFE_REASONS`)."""

    def record_background_load(self, outcome: str) -> None:
        """A load run on a background thread ended, or could not start (``outcome``:
        one of :data:`~cachechain.metrics.BACKGROUND_OUTCOMES`)."""

    def record_eager_refresh(self) -> None:
        """A hit past the eager-refresh share of its TTL started a background reload."""

    def record_lease(self, outcome: str) -> None:
        """A ``get_or_load`` miss asked the shared layer for the lease to load the key
        (``outcome``: one of :data:`~cachechain.metrics.LEASE_OUTCOMES`)."""

    def record_lease_wait(self, duration: float) -> None:
        """A ``get_or_load`` waited ``duration`` s for another process's load."""

    def record_backfill_skipped(self, layer: str, reason: str) -> None:
        """A backfill into ``layer`` (the copy of a value a lower layer had) was not made
        (``reason``: one of :data:`~cachechain.metrics.BACKFILL_SKIP_REASONS`)."""

    def record_repairs_pending(self, layer: str, repairs: int) -> None:
        """The async writer of ``layer`` holds ``repairs`` keys whose repair delete
        waits for a retry (polled: reported from the refresh hook)."""

    def record_nodes_down(self, layer: str, nodes: int) -> None:
        """``nodes`` servers of the remote ``layer`` are marked down (polled)."""

    def record_connections(self, layer: str, connections: int) -> None:
        """The remote ``layer`` has ``connections`` connections open (polled)."""

    def record_pool_exhausted(self, layer: str, count: int) -> None:
        """``count`` more calls to the remote ``layer`` were refused because no pooled
        connection became free in time (polled, as increments)."""

    def record_corrupt_values(self, layer: str, count: int) -> None:
        """``count`` more values read from the remote ``layer`` could not be decoded
        (polled, as increments)."""

    def add_info(self, metric: str, labels: Sequence[str]) -> None:
        """Report the constant series (value 1) of the info metric ``metric`` (its
        name in the catalogue, ``info`` or ``layer_info``) with these label values, in
        the catalogue's order after ``chain`` (``layer`` first for a metric of layers).
        A chain calls it once per metric and layer when it is built. Not a
        ``record_*`` method: the default ignores it, and a collector that does not
        have it is not asked."""

    def hit_sampler(self, layer: str) -> HitSampler | None:
        """Offer to count the hits of the chain's first layer ``layer`` without a call
        per hit: return a :class:`HitSampler`, and the chain's ``get`` then counts each
        first-layer hit with its ``count`` (exact), times one hit in ``every`` (the
        next one after ``count`` returned a multiple of ``every``), and reports that
        duration to its ``timed``, instead of calling :meth:`record_first_layer_hit` on
        every hit with two clock reads around it. ``None`` (the default) keeps one
        :meth:`record_first_layer_hit` per hit. Called once, when a chain is built; not
        a ``record_*`` method. The collector must fold the hits ``count`` counted into
        what :meth:`record_first_layer_hit` feeds: the hit counters exactly, the
        latency histograms by ``timed``'s weighted samples."""
        return None

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Ask the collector to call ``fn()`` before it reads its figures (each scrape,
        snapshot or flush), so that values polled rather than pushed (an in-process
        layer's entries and evictions) are current when read. ``fn`` reports through
        the ``record_*`` methods; whatever it raises is swallowed by the collector, and
        a hook that returns ``False`` is dropped (its chain is gone). The default does
        nothing: a collector that never reads needs no refresh."""


class NoOpCollector(MetricsCollector):
    """Records nothing. The default: a chain given it does not even read the clock."""


F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)


def never_raises(fn: F) -> F:
    """Mark a collector method (a plain function or closure) as one that never raises.

    :class:`CollectorGuard` then calls it directly instead of through its guard,
    saving a call per metric on the request path. Only mark code that catches its own
    errors; an unmarked method (a subclass override, say) stays guarded.
    """
    fn.__dict__["never_raises"] = True
    return fn


def _trusted(method: Callable[..., Any]) -> bool:
    return getattr(method, "never_raises", False) is True


def forward_records(
    target: Callable[[Any], Any], where: str = "the collector it forwards to"
) -> Callable[[C], C]:
    """Class decorator: give the class every ``record_*`` method of the catalogue
    (:data:`RECORD_METHODS`), each calling the same method of ``target(self)`` (the
    collector's own chain, say; ``where`` says what that is, in the methods' docs). A
    subclass may still override any of them and call ``super()``."""

    def forwarder(name: str) -> Callable[..., None]:
        def forward(self: Any, *args: Any) -> None:
            getattr(target(self), name)(*args)

        forward.__name__ = forward.__qualname__ = name
        forward.__doc__ = f"See :meth:`MetricsCollector.{name}`; recorded by {where}."
        return forward

    def decorate(cls: C) -> C:
        for name in RECORD_METHODS:
            setattr(cls, name, forwarder(name))
        return cls

    return decorate


# The guard is typed as the contract it implements, but is no subclass of it at run
# time: an instance attribute that shadows a method of its class is not specialised by
# CPython's interpreter, which costs about 90 machine instructions per call on the
# chain's hottest path (counted with callgrind).
if TYPE_CHECKING:
    _Contract = MetricsCollector
else:
    _Contract = object


class CollectorGuard(_Contract):
    """Resolves a collector's methods once and shields the caller from its failures.

    Each ``record_*`` attribute (one per :data:`RECORD_METHODS`) calls the collector
    and swallows (counts, logs once) whatever it raises; methods marked
    :func:`never_raises` are called directly. Methods a duck-typed collector lacks are
    no-ops (a missing fused method, ``record_first_layer_hit``, makes the calls it
    stands for); a seed-style ``record_write_dropped(layer)`` is called without the
    reason. Raises ``TypeError`` when the collector lacks one of :data:`SEED_METHODS`.
    """

    def __init__(self, collector: Any) -> None:
        self.collector = collector
        #: How many calls into the collector raised.
        self.failures = 0
        self._lock = threading.Lock()
        self._key = ("collector", next(_TOKENS))
        for rec in sorted(RECORDS, key=lambda r: bool(r.stands_for)):  # fused ones last
            method = getattr(collector, rec.name, None)
            if method is None and rec.seed:
                raise TypeError(f"metrics collector {collector!r} has no {rec.name}()")
            if method is None:
                fused = stand_in(rec, lambda name: getattr(self, name))  # guarded calls
                method = _noop if fused is None else never_raises(fused)
            elif rec.name == "record_write_dropped" and not _accepts_reason(method):
                method = _drop_reason(method)
            setattr(self, rec.name, method if _trusted(method) else self._guard(method))

    def hit_sampler(self, layer: str) -> HitSampler | None:
        """The collector's :class:`HitSampler` for the first layer ``layer`` (see
        :meth:`MetricsCollector.hit_sampler`): ``None`` when it has none, or when its
        ``hit_sampler`` raises (counted, logged once) or returns something else than a
        sampler with callables and an ``every`` of at least 2. An ``itertools.count``'s
        ``count`` is called as it is (it cannot raise); any other is wrapped, and one
        that raises is counted as a collector failure and that hit is not sampled. Its
        ``timed`` is guarded unless marked :func:`never_raises`."""
        offer = getattr(self.collector, "hit_sampler", None)
        if offer is None:
            return None
        try:
            sampler = offer(layer)
        except Exception as exc:
            self.failed(exc)
            return None
        if (
            not isinstance(sampler, HitSampler)
            or type(sampler.every) is not int
            or sampler.every < 2
            or not callable(sampler.count)
            or not callable(sampler.timed)
        ):
            return None
        count, timed = sampler.count, sampler.timed
        if not isinstance(getattr(count, "__self__", None), itertools.count):
            count = self._guard_count(count)
        if not _trusted(timed):
            timed = self._guard(timed)
        return HitSampler(count, sampler.every, timed)

    def _guard_count(self, count: Callable[[], int]) -> Callable[[], int]:
        def guarded_count() -> int:
            try:
                return int(count())
            except Exception as exc:
                self.failed(exc)
                return 1  # not a multiple of every (at least 2): no sample asked

        return guarded_count

    def _guard(self, method: Callable[..., Any]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            try:
                method(*args)
            except Exception as exc:
                self.failed(exc)

        guarded.__name__ = getattr(method, "__name__", "record")
        return guarded

    def failed(self, exc: BaseException) -> None:
        """Count a collector failure and log the first one (later ones at DEBUG)."""
        with self._lock:
            self.failures += 1
        _log_once(
            self._key,
            "metrics collector %r raised %r; cache operations are unaffected, and "
            "further collector errors are counted but not logged",
            self.collector,
            exc,
            debug="metrics collector %r raised %r (counted)",
        )

    def __repr__(self) -> str:
        return f"<CollectorGuard of {self.collector!r}>"


@never_raises
def _noop(*args: Any) -> None:
    return None


def stand_in(
    rec: Record, method: Callable[[str], Callable[..., None]]
) -> Callable[..., None] | None:
    """A function making the calls the fused record ``rec`` stands for (see
    :attr:`Record.stands_for`) through ``method(name)``, with the arguments they take
    from its own; ``None`` when ``rec`` is not fused. It raises what they raise."""
    if not rec.stands_for:
        return None
    names = rec.param_names
    calls: list[tuple[Callable[..., None], list[tuple[bool, Any]]]] = []
    for target, fixed in rec.stands_for:
        spec = []
        for p in find_record(target).param_names:
            source = fixed[p]
            spec.append(
                (True, names.index(source.name)) if isinstance(source, Arg) else (False, source)
            )
        calls.append((method(target), spec))

    def call(*args: Any) -> None:
        for fn, spec in calls:
            fn(*[args[v] if is_arg else v for is_arg, v in spec])

    return call


def _accepts_reason(method: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return True
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def _drop_reason(method: Callable[..., Any]) -> Callable[..., Any]:
    def call(layer: str, reason: str = "queue_full") -> Any:
        return method(layer)

    return call


def adapt(collector: Any, chain: str, layers: Sequence[str]) -> CollectorGuard | None:
    """Prepare ``collector`` for a chain: ``None`` for no metrics at all, else a guard.

    ``None`` and :class:`NoOpCollector` give ``None`` (the chain then skips timing
    entirely). A collector with ``bind_chain`` is bound to the chain first; if that
    raises, the collector is used unbound and the failure counted and logged like any
    other. Raises ``TypeError`` when a seed method is missing.
    """
    if collector is None or type(collector) is NoOpCollector:
        return None
    bind = getattr(collector, "bind_chain", None)
    failure: Exception | None = None
    if bind is not None:
        try:
            collector = bind(chain, tuple(layers))
        except Exception as exc:
            failure = exc
    guard = CollectorGuard(collector)
    if failure is not None:
        guard.failed(failure)
    return guard

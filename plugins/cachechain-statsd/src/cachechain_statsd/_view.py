"""The collector one chain reports to, derived from cachechain's metrics catalogue.

Each ``record_*`` call resolves, once per distinct label-choosing arguments, the StatsD
series its metrics' feeds name (:data:`cachechain.metrics.METRICS`): counters (exact
tallies), timers (every N-th duration of a series) and gauges; later calls with the
same arguments only bump a counter and, every N-th time, keep the duration. Label
values are sent as they come (sanitized), not folded into ``other``; the exporter
bounds the number of series instead (``MAX_SERIES``).
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cachechain.metrics import (
    COUNTER,
    DEFAULT_SAMPLE_HITS,
    GAUGE,
    HISTOGRAM,
    RECORDS,
    Arg,
    Feed,
    HitSampler,
    Metric,
    MetricsCollector,
    Record,
    feeds_of,
    find_record,
    never_raises,
    series_params,
    stand_in,
)

from ._wire import Samples, Tally

if TYPE_CHECKING:
    from .exporter import StatsdExporter

__all__ = ["ChainView"]

#: Distinct argument values whose series one record method of a view remembers.
MAX_PLANS = 1024

# The steps of a plan: count one (its number picks the durations kept), add an amount,
# keep a duration, set a gauge, count a change of the gauge before it.
INC, ADD, KEEP, SET, CHANGE = "inc", "add", "keep", "set", "change"

Step = tuple[str, Any, int]  # (kind; a Tally, Samples or gauge stat; index of its argument)
Recorder = Callable[..., None]
Action = Callable[[Sequence[Any]], None]


class ChainView(MetricsCollector):
    """The collector of one chain of a :class:`~cachechain_statsd.StatsdExporter`.

    The series of the layers the chain declared are resolved here, so that a record
    bumps a counter and, for every N-th event of a series, keeps the duration, and that
    is all; other layers' series are resolved on first use.

    Each record method is marked :func:`~cachechain.metrics.never_raises` (the chain
    calls it without a guard of its own): what one raises is caught here, counted in
    ``StatsdExporterStats.record_errors`` and logged once.
    """

    record_first_layer_hit: Callable[[str, float], None]  # type: ignore[assignment]

    def __init__(self, exporter: StatsdExporter, chain: str, layers: tuple[str, ...]) -> None:
        self._x = exporter
        self.chain = chain
        self.layer_names = layers
        self._period = exporter.sample_period
        self._cap = exporter.max_samples
        self._wake_at = exporter.wake_at
        self._wake = exporter._wake_thread
        self._last: dict[str, Any] = {}  # the latest value of each gauge, by stat
        self._lock = threading.Lock()
        for rec in sorted(RECORDS, key=lambda r: bool(r.stands_for)):  # fused ones last
            setattr(self, rec.name, self._recorder(rec))

    def __repr__(self) -> str:
        return f"<StatsdExporter view of chain {self.chain!r} {list(self.layer_names)}>"

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Have the exporter call ``fn()`` before each flush (see
        :meth:`StatsdExporter.add_refresh_hook`)."""
        self._x.add_refresh_hook(fn)

    # -- resolving series --------------------------------------------------------------
    def _served_by(self, value: Any) -> str:
        layers = self.layer_names
        if isinstance(value, int) and 0 <= value < len(layers):
            return layers[value]
        return str(value)

    def plan(self, rec: Record, args: Sequence[Any]) -> list[Step]:
        """The steps of a call of ``rec`` with ``args``: counts first, so that a kept
        duration follows the count of its event (a timer fed without a count gets a
        tally of its own, never sent); a gauge before the change it may count."""
        named = dict(zip(rec.param_names, args, strict=True))
        counts: list[Step] = []
        rest: list[Step] = []
        for m, feed in feeds_of(rec.name):
            if not feed.applies(named):
                continue
            stat = self._stat(m, feed, named)
            arg = rec.param_names.index(feed.value) if feed.value is not None else -1
            if m.kind == GAUGE:
                rest.insert(0, (SET, stat, arg))
            elif m.kind == HISTOGRAM:
                rest.append((KEEP, self._x._timer(stat), arg))
            elif feed.on_change:
                rest.append((CHANGE, self._x._tally(stat), arg))
            else:
                counts.append((INC if arg < 0 else ADD, self._x._tally(stat), arg))
        if any(k is KEEP for k, _, _ in rest) and not any(k is INC for k, _, _ in counts):
            counts.append((INC, Tally(()), -1))
        return counts + rest

    def _stat(self, m: Metric, feed: Feed, named: dict[str, Any]) -> str:
        """The stat key of the series of ``m`` a call with ``named`` arguments feeds."""
        values = m.cell(feed, named)
        labels = [
            (label, self._served_by(v) if label == m.positions else str(v))
            for label, v in zip(m.extra_labels, values, strict=True)
        ]
        layer = named["layer"] if m.per_layer else None
        return self._x.stat(m.statsd, self.chain, layer, labels)

    # -- the record methods ------------------------------------------------------------
    def _recorder(self, rec: Record) -> Recorder:
        """The method of ``rec``: the action of each distinct set of series-choosing
        arguments is resolved on its first call (or here, for the declared layers) and
        remembered (up to :data:`MAX_PLANS` of them)."""
        if rec.stands_for:
            return self._fused(rec)
        if _timed(rec):
            return self._timed(rec)
        names = rec.param_names
        defaults = tuple(p.default for p in rec.params)
        choosing = [names.index(n) for n in series_params(rec.name)]
        key_of: Callable[[Sequence[Any]], Any]
        key_of = operator.itemgetter(*choosing) if choosing else (lambda args: ())
        actions: dict[Any, Action] = {}
        for args in self._declared_calls(rec):  # the declared layers' series exist now
            actions[key_of(args)] = self._action(self.plan(rec, args))

        failed = self._failed

        @never_raises
        def record(*args: Any) -> None:
            try:
                if len(args) < len(names):
                    args = (*args, *defaults[len(args) :])
                key = key_of(args)
                act = actions.get(key)
                if act is None:
                    act = self._action(self.plan(rec, args))
                    if len(actions) < MAX_PLANS:
                        actions[key] = act
                act(args)
            except Exception as exc:
                failed(rec.name, exc)

        record.__name__ = rec.name
        return record

    def _failed(self, name: str, exc: Exception) -> None:
        """A record method raised ``exc``: count it, log the first (DEBUG after)."""
        self._x._record_errors.inc()
        self._x._warn(
            "record",
            "statsd exporter: %s raised %r; nothing recorded, cache operations are "
            "unaffected (counted in stats().record_errors)",
            name,
            exc,
        )

    def _timed(self, rec: Record) -> Recorder:
        """The method of a record whose arguments all choose its series but the last, a
        duration, and whose every call counts one and may keep the duration (a get, a
        write, a logical get): one lookup, one bump."""
        plans: dict[tuple[Any, ...], tuple[Callable[[], int], Samples]] = {}
        keep, failed = self._keep, self._failed

        def resolve(args: tuple[Any, ...]) -> tuple[Callable[[], int], Samples]:
            steps = self.plan(rec, args)
            found = (steps[0][1].inc, steps[1][1])
            if len(plans) < MAX_PLANS:
                plans[args[:-1]] = found
            return found

        for args in self._declared_calls(rec):
            resolve(args)

        @never_raises
        def record(*args: Any) -> None:
            try:
                found = plans.get(args[:-1]) or resolve(args)
                keep(found[0](), found[1], args[-1])
            except Exception as exc:
                failed(rec.name, exc)

        record.__name__ = rec.name
        return record

    def _declared_calls(self, rec: Record) -> list[tuple[Any, ...]]:
        """Calls of ``rec`` whose series are worth creating with the view: for each
        declared layer, each value of a bool that chooses the series (records whose
        other arguments are free values are left for their first call)."""
        if rec.param_names[:1] != ("layer",):
            return []
        choosing = [rec.param(n) for n in series_params(rec.name) if n != "layer"]
        if [p.type for p in choosing] not in ([], [bool]):
            return []
        filler = {bool: True, str: "", int: 0, float: 0.0}
        calls = []
        for layer in self.layer_names:
            for flag in (True, False) if choosing else (True,):
                args = [layer, *(filler[p.type] for p in rec.params[1:])]
                if choosing:
                    args[rec.param_names.index(choosing[0].name)] = flag
                calls.append(tuple(args))
        return calls

    def _action(self, steps: list[Step]) -> Action:
        """What a call with the series of ``steps`` does, as one function of the call's
        arguments (the usual shapes written out, any other walking the steps)."""
        kinds = [kind for kind, _, _ in steps]
        keep, gauge = self._keep, self._x._gauge
        if kinds == [INC, KEEP]:
            inc, samples, at = steps[0][1].inc, steps[1][1], steps[1][2]
            return lambda args: keep(inc(), samples, args[at])
        if kinds == [INC]:
            bump = steps[0][1].inc
            return lambda args: bump() and None
        if kinds == [SET]:
            stat, at = steps[0][1], steps[0][2]
            return lambda args: gauge(stat, args[at])
        return lambda args: self._run(steps, args)

    def _run(self, steps: list[Step], args: Sequence[Any]) -> None:
        """Walk ``steps`` for a call with ``args``."""
        count, gauge = 0, ""
        for kind, target, arg in steps:
            if kind is INC:
                count = target.inc()
            elif kind is KEEP:
                self._keep(count, target, args[arg])
            elif kind is ADD:
                if args[arg] > 0:
                    target.add(int(args[arg]))
            elif kind is SET:
                gauge = target
                self._x._gauge(gauge, args[arg])
            elif self._changed(gauge, args[arg]):  # CHANGE, after its gauge's SET
                target.inc()

    def _changed(self, gauge: str, value: Any) -> bool:
        """Whether ``value`` changes ``gauge`` from a value it had (its first does not)."""
        with self._lock:
            previous, self._last[gauge] = self._last.get(gauge), value
        return previous is not None and previous != value

    def _keep(self, count: int, samples: Samples, seconds: float) -> None:
        """Keep ``seconds`` in ``samples`` if ``count`` (the series' event number) is a
        multiple of the sample period and the buffer has room; count it as its overflow
        otherwise."""
        period = self._period
        if period and not count % period:
            values = samples.values
            n = len(values)
            if n < self._cap:
                values.append(seconds)
                if n == self._wake_at:
                    self._wake()
            else:
                samples.overflow.inc()

    def _fused(self, rec: Record) -> Recorder:
        """The chain's hottest call as a closure: for the first layer, one counter bump
        that stands for every count of the calls it stands for, and one kept duration
        (for all their timers) every ``sample_period`` hits; any other layer makes those
        calls."""
        fallback = stand_in(rec, lambda name: getattr(self, name))
        assert fallback is not None
        if not self.layer_names:
            return fallback
        first = self.layer_names[0]
        counters, timers = self._fused_stats(rec, first)
        key = ("first", self.chain, first)
        inc = self._x._tally(*counters, key=key).inc
        samples = self._x._timer(*timers, key=key)
        values = samples.values
        period, cap, wake_at, wake, drop = (
            self._period,
            self._cap,
            self._wake_at,
            self._wake,
            samples.overflow.inc,
        )
        failed = self._failed
        if not period:

            @never_raises
            def count_only(layer: str, duration: float) -> None:
                try:
                    if layer == first:
                        inc()
                    else:
                        fallback(layer, duration)
                except Exception as exc:
                    failed(rec.name, exc)

            return count_only

        append = values.append

        @never_raises
        def record_first_layer_hit(layer: str, duration: float) -> None:
            try:
                if layer == first:
                    if not inc() % period:
                        n = len(values)
                        if n < cap:
                            append(duration)
                            if n == wake_at:
                                wake()
                        else:
                            drop()
                else:
                    fallback(layer, duration)
            except Exception as exc:
                failed(rec.name, exc)

        return record_first_layer_hit

    def hit_sampler(self, layer: str) -> HitSampler | None:
        """Count the hits of the chain's first layer ``layer`` in the tally
        ``record_first_layer_hit`` bumps, and keep the duration of one hit in
        ``max(sample_period, DEFAULT_SAMPLE_HITS)`` (64 by default: the chain times
        only that one, see :meth:`cachechain.metrics.MetricsCollector.hit_sampler`; its
        values are sent with that rate). With timers off (``sample_period`` 0) the chain
        times none. ``None`` for another layer, or a ``sample_period`` of 1 (every
        duration is sent: every hit is timed)."""
        if not self.layer_names or layer != self.layer_names[0] or self._period == 1:
            return None
        rec = find_record("record_first_layer_hit")
        counters, timers = self._fused_stats(rec, layer)
        inc = self._x._tally(*counters, key=("first", self.chain, layer)).inc
        if not self._period:
            return HitSampler(inc, _NEVER, _ignore)
        every = max(self._period, DEFAULT_SAMPLE_HITS)
        # A buffer of its own: its values stand for ``every`` hits each, the fused
        # record's (get_or_load's hits) for ``sample_period``.
        samples = self._x._timer(*timers, key=("first sampled", self.chain, layer))
        samples.period = every
        values, append, cap = samples.values, samples.values.append, self._cap
        wake_at, wake, drop, failed = self._wake_at, self._wake, samples.overflow.inc, self._failed

        @never_raises
        def timed(duration: float, count: int) -> None:
            try:
                n = len(values)
                if n < cap:
                    append(duration)
                    if n == wake_at:
                        wake()
                else:
                    drop()
            except Exception as exc:
                failed(rec.name, exc)

        return HitSampler(inc, every, timed)

    def _fused_stats(self, rec: Record, first: str) -> tuple[list[str], list[str]]:
        """The counter and timer stats of the calls ``rec`` stands for, made for the
        layer ``first``."""
        counters: list[str] = []
        timers: list[str] = []
        own = {"layer": first, "duration": 0.0}
        for target, fixed in rec.stands_for:
            spec = find_record(target)
            args = [fixed[p] for p in spec.param_names]
            args = [own[a.name] if isinstance(a, Arg) else a for a in args]
            for kind, obj, _ in self.plan(spec, args):
                if kind is INC:
                    counters += obj.targets
                elif kind is KEEP:
                    timers += obj.targets
        return counters, timers


#: A sampling period the chain never reaches: with timers off, no hit is timed.
_NEVER = 1 << 62


@never_raises
def _ignore(duration: float, count: int) -> None:
    return None


def _timed(rec: Record) -> bool:
    """Whether every call of ``rec`` counts one and keeps a duration (its last argument)
    in series chosen by all the others (see :meth:`ChainView._timed`)."""
    kinds = sorted((m.kind, f.value is None) for m, f in feeds_of(rec.name))
    counted = (COUNTER, True) in kinds and (HISTOGRAM, False) in kinds
    chosen = series_params(rec.name) == rec.param_names[:-1]
    gauges = any(kind == GAUGE for kind, _ in kinds)
    return counted and chosen and rec.params[-1].type is float and not gauges

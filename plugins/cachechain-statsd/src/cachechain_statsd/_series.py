"""The series one exporter keeps between flushes, and what one flush makes of them.

A flush packs, in this order: every counter's increase (exact; an increase a refused
datagram carried is added back), every gauge, then as many kept timer values as the
flush's datagram budget allows. Timer values beyond the budget, like those a full
buffer could not keep, are not sent; each value sent carries ``|@rate`` with
``rate = values sent / events they stand for``, so that StatsD's count of each timer
stays right when values are left out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._wire import RATE_TEXT_MAX, Samples, Tally, Transport

__all__ = ["MAX_SERIES", "Packed", "SeriesTable", "share"]

T = TypeVar("T")
#: A buffer's drained values, and how many kept values they stand for.
Kept = tuple[Samples, list[float], int]

#: Most distinct series (counters, timers or gauges) one exporter keeps; more are dropped.
MAX_SERIES = 10_000

# The longest text of a timer value: "%0.6f" milliseconds of a duration below 1,000 s.
_VALUE_TEXT_MAX = len("999999.999999|ms")


@dataclass
class Packed:
    """What one flush packed: ``datagrams`` to send in order (counters, then gauges,
    then timers); ``counted`` how many of them hold counters and gauges; ``timer_values``
    values sent; ``dropped`` timer values left out (a full buffer, or over budget)."""

    datagrams: list[str]
    counted: int
    timer_values: int
    dropped: int


def share(sizes: list[int], costs: list[int], budget: int) -> list[int]:
    """How many of each timer's ``sizes[i]`` values to send, each costing ``costs[i]``
    bytes, within ``budget`` bytes: all of a timer's values when they fit, otherwise the
    same number of values of every timer that has more (water-filling: a rare timer
    keeps all of its values while a hot one gives way)."""
    out = [0] * len(sizes)
    left, cost_left = max(budget, 0), sum(costs)
    for i in sorted(range(len(sizes)), key=sizes.__getitem__):
        each = left // cost_left if cost_left > 0 else 0
        out[i] = min(sizes[i], each)
        left -= out[i] * costs[i]
        cost_left -= costs[i]
    return out


def _spread(values: list[float], k: int) -> list[float]:
    """``k`` of ``values``, evenly spaced (in the order they were kept)."""
    n = len(values)
    if k >= n:
        return values
    return [values[i * n // k] for i in range(k)]


class SeriesTable:
    """The series one exporter keeps between flushes: exact counters (:class:`Tally`),
    kept timer values (:class:`Samples`) and the latest gauge values, at most
    :data:`MAX_SERIES` counters and timers together, and as many gauges (a record past
    that is dropped and counted in ``dropped_series``). ``own`` are the exporter's
    counters of its own drops, sent like the others."""

    def __init__(self, prefix: str) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[Any, Tally] = {}
        self._samples: dict[Any, Samples] = {}
        self._gauges: dict[str, float] = {}
        self._discard_tally = Tally(())
        self._discard_samples = Samples(())
        #: Records dropped because the table was full.
        self.dropped_series = 0
        #: Timer values left out by earlier flushes (a full buffer, or over budget).
        self.dropped = Tally((f"{prefix}statsd_exporter.dropped_samples",))
        #: Datagrams the socket refused.
        self.send_errors = Tally((f"{prefix}statsd_exporter.send_errors",))
        #: Increases of counters whose datagram was refused, to send again.
        self.carry: dict[str, int] = {}

    def tally(self, *targets: str, key: Any = None) -> Tally:
        """The counter feeding the stats ``targets`` (one per ``key``, by default the
        first target), created if new."""
        return self._find(self._tallies, Tally, self._discard_tally, targets, key)

    def timer(self, *targets: str, key: Any = None) -> Samples:
        """The buffer of kept values of the timers ``targets`` (one per ``key``, by
        default the first target), created if new."""
        return self._find(self._samples, Samples, self._discard_samples, targets, key)

    def _find(
        self,
        held: dict[Any, T],
        make: Callable[[tuple[str, ...]], T],
        discard: T,
        targets: tuple[str, ...],
        key: Any,
    ) -> T:
        key = targets[0] if key is None else key
        found = held.get(key)
        if found is None:
            with self._lock:
                found = held.get(key)
                if found is None:
                    if len(self._tallies) + len(self._samples) >= MAX_SERIES:
                        self.dropped_series += 1
                        return discard
                    found = held[key] = make(targets)
        return found

    def gauge(self, stat: str, value: float) -> None:
        """Set the gauge ``stat`` to ``value``."""
        gauges = self._gauges
        if stat not in gauges and len(gauges) >= MAX_SERIES:
            self.dropped_series += 1
            return
        gauges[stat] = value

    def pending_drops(self) -> int:
        """Timer values dropped so far: by earlier flushes, and since the last one
        because a buffer was full."""
        with self._lock:
            samples = list(self._samples.values())
        pending = sum(s.overflow.value() - s.overflow.sent for s in samples)
        return self.dropped.value() + pending

    def pack(self, transport: Transport, period: int, budget: int) -> Packed:
        """Pack into ``transport``'s datagrams every counter's increase since the last
        call (the increases of one stat summed), every gauge, then the kept timer values
        (milliseconds, each series sent with the ``|@rate`` of what it stands for) that
        fit in ``budget`` datagrams in all, fewer counters' and gauges' (those are
        always sent). ``period``: every N-th event of a series was kept."""
        with self._lock:
            tallies = [*self._tallies.values(), self.dropped, self.send_errors]
            samples = list(self._samples.values())
            gauges = dict(self._gauges)
        kept, overflow = self._take_samples(samples)
        if overflow:
            self.dropped.add(overflow)  # sent now, with the other counters
        totals, self.carry = self.carry, {}
        for tally in tallies:
            value = tally.value()
            delta = value - tally.sent
            if delta:
                tally.sent = value
                for stat in tally.targets:
                    totals[stat] = totals.get(stat, 0) + delta
        batch = transport.pipeline()
        for stat, delta in totals.items():
            batch.incr(stat, delta)
        for stat, gauge in gauges.items():
            batch.gauge(stat, gauge)
        batch.send()
        counted = len(transport.datagrams)
        sent, left_out = self._pack_timers(transport, kept, period, budget - counted)
        if left_out:
            self.dropped.add(left_out)  # sent by the next flush
        return Packed(transport.take(), counted, sent, overflow + left_out)

    @staticmethod
    def _take_samples(samples: list[Samples]) -> tuple[list[Kept], int]:
        """Drain the buffers: the values of each (with the number of kept values they
        stand for, theirs and those a full buffer dropped), and how many were dropped."""
        kept: list[Kept] = []
        dropped = 0
        for s in samples:
            values = s.drain()
            overflow = s.overflow.value() - s.overflow.sent
            s.overflow.sent += overflow
            dropped += overflow
            if values:
                kept.append((s, values, len(values) + overflow))
        return kept, dropped

    def _pack_timers(
        self, transport: Transport, kept: list[Kept], period: int, room: int
    ) -> tuple[int, int]:
        """Pack the timer values that fit in ``room`` datagrams; return how many values
        were sent and how many were left out."""
        if not kept:
            return 0, 0
        dropped = 0
        size = transport._maxudpsize
        line_max = [max(len(t) for t in s.targets) + 1 + _VALUE_TEXT_MAX for s, _, _ in kept]
        line_max = [n + RATE_TEXT_MAX for n in line_max]
        per_datagram = size - max(line_max)  # bytes a datagram surely holds (see below)
        if per_datagram > 0:
            costs = [(n + 1) * len(s.targets) for n, (s, _, _) in zip(line_max, kept, strict=True)]
            budget = max(room, 0) * per_datagram
        else:  # lines longer than a datagram: one line each
            costs = [len(s.targets) for s, _, _ in kept]
            budget = max(room, 0)
        # A datagram is closed only when the next line would not fit, so each but the
        # last holds more than size - line_max bytes: lines of at most budget bytes in
        # all take at most ``room`` datagrams.
        counts = share([len(v) for _, v, _ in kept], costs, budget)
        batch = transport.pipeline()
        sent = 0
        for (s, values, stands_for), k in zip(kept, counts, strict=True):
            dropped += len(values) - k
            if not k:
                continue
            sent += k
            rate = k / (stands_for * max(s.period or period, 1))
            for seconds in _spread(values, k):
                ms = max(0.0, seconds) * 1000.0
                for stat in s.targets:
                    batch.timing(stat, ms, rate)
        batch.send()
        return sent, dropped

    def forget(self) -> None:
        """Count everything as sent already (a forked child: its parent sends it)."""
        self._lock = threading.Lock()
        self.carry = {}
        for tally in [*self._tallies.values(), self.dropped, self.send_errors]:
            tally.sent = tally.value()
        for samples in self._samples.values():
            samples.drain()
            samples.overflow.sent = samples.overflow.value()

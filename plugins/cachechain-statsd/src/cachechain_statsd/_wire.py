"""What the exporter keeps between flushes and how it hands lines to the ``statsd`` package.

:class:`Tally` is an exact counter that threads bump without a lock, :class:`Samples` a
buffer of kept timer values; :class:`Transport` and :class:`Batch` let the ``statsd``
package's pipeline pack lines into datagrams that the exporter sends, paced, on its own
socket.
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
from collections.abc import Callable

from cachechain.metrics import at_fork
from statsd.client.base import StatsClientBase
from statsd.client.udp import Pipeline

__all__ = ["RATE_TEXT_MAX", "Batch", "Samples", "Tally", "Transport", "clean", "rate_text"]

_GIL = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
_ADD_LOCK = threading.Lock()
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def clean(part: object) -> str:
    """A name component or tag value in ``[A-Za-z0-9_]`` (anything else becomes ``_``)."""
    return _UNSAFE.sub("_", str(part)) or "_"


def _new_add_lock() -> None:  # pragma: no cover - runs in a forked child
    global _ADD_LOCK
    _ADD_LOCK = threading.Lock()  # the sending thread may have held it (evictions)


at_fork(after_in_child=_new_add_lock)


class Tally:
    """An exact counter that many threads increment without taking a lock.

    ``inc()`` adds one and returns the count before it: ``next()`` of an
    ``itertools.count`` runs entirely in C while holding the GIL, so no increment is
    lost (free-threaded builds take a lock instead). ``add(n)`` (rare) takes a lock.
    ``targets`` are the stat keys this tally feeds; ``sent`` is its value at the last
    flush.
    """

    __slots__ = ("_extra", "_it", "inc", "sent", "targets")

    def __init__(self, targets: tuple[str, ...]) -> None:
        self._it = itertools.count()
        self._extra = 0
        self.inc: Callable[[], int] = self._it.__next__ if _GIL else self._locked_inc
        self.sent = 0
        self.targets = targets

    def _locked_inc(self) -> int:
        with _ADD_LOCK:
            return next(self._it)

    def add(self, n: int) -> None:
        """Add ``n`` (may be called from any thread)."""
        with _ADD_LOCK:
            self._extra += n

    def value(self) -> int:
        """The total so far."""
        # repr(count(41)) == "count(41)": the only public view of a count's state.
        return int(repr(self._it)[6:-1]) + self._extra


class Samples:
    """Kept timer values (seconds) of one or more timers, waiting for the next flush.

    Threads ``append`` to ``values`` (atomic under the GIL); :meth:`drain` removes the
    ones present when it starts, so a value appended meanwhile waits for the next flush.
    ``overflow`` counts the values that were to be kept but found the buffer full: the
    flush still knows how many events the values it sends stand for. ``period``: one
    event in how many had its value kept (0: the exporter's ``sample_period``).
    """

    __slots__ = ("overflow", "period", "targets", "values")

    def __init__(self, targets: tuple[str, ...]) -> None:
        self.values: list[float] = []
        self.targets = targets
        self.overflow = Tally(())
        self.period = 0

    def drain(self) -> list[float]:
        """Remove and return the values kept so far."""
        values = self.values
        n = len(values)
        taken = values[:n]
        del values[:n]
        return taken


class Transport(StatsClientBase):  # type: ignore[misc]
    """The ``statsd`` client the pipeline hands its datagrams to: it keeps them for the
    exporter, which sends them, paced, on its own socket."""

    def __init__(self, max_udp_size: int) -> None:
        self._prefix = None
        self._maxudpsize = max_udp_size
        #: The datagrams packed so far, waiting to be sent (paced) by the exporter.
        self.datagrams: list[str] = []

    def _send(self, data: str) -> None:
        self.datagrams.append(data)

    def take(self) -> list[str]:
        """Remove and return the datagrams packed so far."""
        taken, self.datagrams = self.datagrams, []
        return taken

    def pipeline(self) -> Batch:
        """A new batch of lines."""
        return Batch(self)

    def close(self) -> None:
        """Nothing to release: the exporter owns the socket."""


class Batch(Pipeline):  # type: ignore[misc]
    """statsd's UDP pipeline (it packs lines into datagrams of at most ``max_udp_size``
    bytes), formatting lines for values that were sampled already and may carry tags.

    A stat is ``name`` or ``name|#tags``; ``rate`` < 1 is written as ``|@rate`` without
    sampling again (the exporter sampled when the value was recorded)."""

    def _prepare(self, stat: str, value: str, rate: float) -> str:
        name, _, tags = stat.partition("|#")
        line = f"{name}:{value}"
        if rate < 1:
            line += f"|@{rate_text(rate)}"
        if tags:
            line += f"|#{tags}"
        return line


#: The longest ``|@rate`` text :func:`rate_text` writes, ``|@`` included.
RATE_TEXT_MAX = 14


def rate_text(rate: float) -> str:
    """``rate`` (in (0, 1)) in plain decimals, as StatsD daemons parse it (no exponent),
    with at least 3 significant digits down to 1e-7, and never ``0``."""
    return format(max(rate, 1e-10), ".10f").rstrip("0").rstrip(".")
